"""The docs say what the code does: every `--flag` a command in README.md, docs/*.md or examples/**/README* passes
to one of our programs is in that program's --help; the Megatron-LM flag table in docs/training.md sorts every flag
as engine/training/megatron_flags.py does; the MetaQuery optimizer defaults in docs/metaquery.md and in
`--recipe metaquery --help` are the code's; relative links and #anchors resolve. One subprocess renders every
--help (no torch import for the main CLIs), so this runs in seconds."""

import fnmatch
import json
import os
import re
import subprocess
import sys

import pytest
from distributed_launch import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted(REPO.glob("examples/**/README*"))]
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*[a-z0-9])")

# name -> argv of `python ARGV --help`. The name is how a command line is recognised (see _programs_in).
PROGRAMS = {
    "pretrain": ["pretrain_gpt_vision.py"],
    "pretrain-metaquery": ["pretrain_gpt_vision.py", "--recipe", "metaquery"],
    "generate": ["-m", "engine.generate"],
    "generate-metaquery": ["-m", "engine.generate", "--recipe", "metaquery"],
    "engine.plan": ["-m", "engine.plan"],
    "engine.plot": ["-m", "engine.plot"],
    "engine.training.export": ["-m", "engine.training.export"],
    "convert hf-to-chrysalis": ["-m", "engine.convert", "hf-to-chrysalis"],
    "convert chrysalis-to-hf": ["-m", "engine.convert", "chrysalis-to-hf"],
    "preprocess build": ["-m", "preprocess", "build"],
    "preprocess verify": ["-m", "preprocess", "verify"],
    "preprocess inspect": ["-m", "preprocess", "inspect"],
    **{f"engine.visualizer.{m}": ["-m", f"engine.visualizer.{m}"] for m in ("train", "render", "autoencoder",
                                                                          "similarity")},
    **{f"recipe.py {s}": ["examples/metamorph/recipe.py", s] for s in ("blend", "command", "lr")},
    **{f"benchmarks/{p.name}": [f"benchmarks/{p.name}"] for p in sorted((REPO / "benchmarks").glob("*.py"))
       if "__main__" in p.read_text()},
}

# Renders every program's --help in one interpreter (imports are shared, so the whole set takes a few seconds).
_PROBE = """
import contextlib, io, json, runpy, sys
out = {}
for name, argv in json.loads(sys.argv[1]).items():
    buf = io.StringIO()
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:], "--help"]
        run = lambda: runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = [argv[0], *argv[1:], "--help"]
        run = lambda: runpy.run_path(argv[0], run_name="__main__")
    code = 0
    with contextlib.redirect_stdout(buf):
        try:
            run()
        except SystemExit as exit:
            code = exit.code
    out[name] = {"code": code, "help": buf.getvalue()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def helps():
    result = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(PROGRAMS)], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "COLUMNS": "200"}, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for name, item in out.items():
        assert item["code"] in (0, None) and "usage:" in item["help"], (name, item)
    return {name: item["help"] for name, item in out.items()}


def _commands():
    """(doc:line, command) for every line of a fenced block (continuations joined) and every inline code span."""
    for doc in DOCS:
        rel = doc.relative_to(REPO)
        in_fence, pending, start = False, "", 0
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_fence, pending = not in_fence, ""
                continue
            if in_fence:
                start = start if pending else number
                if line.rstrip().endswith("\\"):
                    pending += line.rstrip()[:-1] + " "
                    continue
                yield f"{rel}:{start}", pending + line
                pending = ""
            else:
                for span in re.findall(r"`([^`]+)`", line):
                    yield f"{rel}:{number}", span


_RECOGNISE = [  # (pattern, program name or a function of the match and the rest of the line)
    (r"pretrain_gpt_vision\.py|examples/slurm/train\.sbatch",
     lambda m, rest: "pretrain-metaquery" if re.search(r"--recipe[ =]metaquery", rest) else "pretrain"),
    (r"-m engine\.generate\b",
     lambda m, rest: "generate-metaquery" if re.search(r"--recipe[ =]metaquery", rest) else "generate"),
    (r"-m engine\.convert (hf-to-chrysalis|chrysalis-to-hf)", lambda m, rest: f"convert {m.group(1)}"),
    (r"(?:-m |examples/slurm/)preprocess(?: |\.sbatch)(build|verify|inspect)?",
     lambda m, rest: f"preprocess {m.group(1) or 'build'}"),
    (r"-m (engine\.(?:plan|plot|training\.export|visualizer\.(?:train|render|autoencoder|similarity)))\b",
     lambda m, rest: m.group(1)),
    (r"recipe\.py (blend|command|lr)\b", lambda m, rest: f"recipe.py {m.group(1)}"),
    (r"(benchmarks/\w+\.py)", lambda m, rest: m.group(1)),
]


def _programs_in(command):
    """[(start, end, program)] of every program invocation in a command line."""
    found = []
    for pattern, name in _RECOGNISE:
        for m in re.finditer(pattern, command):
            found.append((m.start(), m.end(), name(m, command[m.end():])))
    return sorted(found)


def documented_flags():
    """{program: {flag: [doc:line, ...]}}: the flags written after a program's name, up to the next program, a shell
    separator or a comment; after `recipe.py command ... --` they are training flags."""
    flags: dict[str, dict[str, list[str]]] = {}
    for where, command in _commands():
        for part in re.split(r"&&|\|\||;|\|\s|\s#\s", command):
            programs = _programs_in(part)
            for i, (_, end, program) in enumerate(programs):
                stop = programs[i + 1][0] if i + 1 < len(programs) else len(part)
                segment = part[end:stop]
                if program == "recipe.py command" and " -- " in segment + " ":
                    segment, training = (segment + " ").split(" -- ", 1)
                    for flag in FLAG.findall(training):
                        flags.setdefault("pretrain", {}).setdefault(flag, []).append(where)
                for flag in FLAG.findall(segment):
                    flags.setdefault(program, {}).setdefault(flag, []).append(where)
    return flags


def test_every_documented_flag_is_in_its_programs_help(helps):
    documented = documented_flags()
    # The scanner must see the main programs' commands at all (a regex that stops matching would pass vacuously).
    for program, at_least in [("pretrain", 10), ("preprocess build", 10), ("generate", 8), ("engine.plan", 4),
                              ("pretrain-metaquery", 5), ("generate-metaquery", 2), ("recipe.py command", 3)]:
        assert len(documented.get(program, {})) >= at_least, (program, sorted(documented.get(program, {})))
    missing = []
    for program, flags in sorted(documented.items()):
        known = set(FLAG.findall(helps[program])) | {"--help"}
        missing += [f"{program} {flag} ({', '.join(sorted(set(where))[:3])})" for flag, where in sorted(flags.items())
                    if flag not in known]
    assert not missing, "documented flags the program does not have:\n  " + "\n  ".join(missing)


@pytest.mark.parametrize("doc, section, program", [("training.md", "## Flags", "pretrain"),
                                                   ("metaquery.md", "## Training flags", "pretrain-metaquery")])
def test_flag_tables_name_real_flags(helps, doc, section, program):
    """The flag tables list flags without a command around them: each must be one of the program's."""
    text = (REPO / "docs" / doc).read_text().split(section + "\n")[1].split("\n## ")[0]
    text = text.split("## Megatron-LM flags")[0]
    table = [line for line in text.splitlines() if line.startswith("|")]
    flags = set(_expand(re.findall(r"`([^`]+)`", "\n".join(table))))
    assert len(flags) > 10, flags
    known = set(FLAG.findall(helps[program]))
    assert not sorted(flags - known), f"{doc} {section}: not flags of {program}: {sorted(flags - known)}"


def _expand(spans):
    """Flags written in a table cell, with its shorthands: `--adam-beta1/2`, `--start-/--end-weight-decay`."""
    out = []
    for span in spans:
        span = re.sub(r"(--[a-z0-9-]+?)(\d)/(\d)\b", r"\1\2 \1\3", span)
        m = re.fullmatch(r"(--[a-z-]+-)/(--[a-z0-9-]+)", span)
        if m:  # the first name lacks the tail of the second: as many leading words of the second as it has
            head, second = m.group(1), m.group(2)
            tail = second[2:].split("-")[len(head[2:-1].split("-")):]
            span = f"{head}{'-'.join(tail)} {second}"
        out += re.findall(r"(?<![\w-])(--[a-z*][a-z0-9*-]*[a-z0-9*])", span)
    return out


def test_megatron_flag_table_matches_the_code():
    from engine.training import megatron_flags as mf
    from engine.training.config import build_parser

    ours = {flag for action in build_parser()._actions for flag in action.option_strings}
    table = (REPO / "docs" / "training.md").read_text().split("## Megatron-LM flags -> ours")[1].split("\n## ")[0]
    kinds = {"refused": mf.UNSUPPORTED, "accepted": mf.ACCEPTED, "accepted, checked": mf.ACCEPTED}
    seen, wrong = set(), []
    rows = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in table.splitlines()
            if line.startswith("| `--")]
    assert len(rows) > 40, len(rows)
    for first, kind, *rest in rows:
        for flag in _expand(re.findall(r"`([^`]+)`", first)):
            seen.add(flag)
            if "*" in flag:
                names = fnmatch.filter(list(mf.ACCEPTED) + list(mf.UNSUPPORTED), flag)
                assert names, flag
                seen.update(names)
                continue
            if kind.startswith("alias of"):
                ok = flag in mf.ALIASES or flag in mf.DEFAULTING_ALIASES
            elif kind == "same":
                ok = flag in ours and flag not in mf.ALIASES and flag not in mf.ACCEPTED
            elif kind in kinds:
                ok = flag in kinds[kind]
            else:  # a value-translation row (`--attention-backend flash|fused|...`): our own flag
                ok = flag in ours
            if not ok:
                wrong.append(f"{flag}: the table says {kind!r}")
        for clause in "; ".join(rest).split(";"):  # "`--a`, `--b` refused" in the notes column
            if "` refused" in clause:
                for flag in _expand(re.findall(r"`([^`]+)`", clause.split("` refused")[0] + "`")):
                    seen.add(flag)
                    if flag not in mf.UNSUPPORTED:
                        wrong.append(f"{flag}: the table says refused")
    assert not wrong, "\n".join(wrong)
    undocumented = [f for f in [*mf.UNSUPPORTED, *mf.ACCEPTED, *mf.ALIASES, *mf.DEFAULTING_ALIASES] if f not in seen]
    assert not undocumented, f"Megatron flags handled in megatron_flags.py but missing from the table: {undocumented}"


def test_metaquery_optimizer_defaults_are_documented_and_shown(helps):
    from engine.metaquery.config import REFERENCE_OPTIMIZER

    text = " ".join((REPO / "docs" / "metaquery.md").read_text().split())
    sentence = text.split("Optimizer defaults become the reference's")[1].split(".\n")[0][:400]
    documented = dict(re.findall(r"(--[a-z0-9-]+) (\S+?)[ `]", sentence))
    assert documented == REFERENCE_OPTIMIZER, (documented, REFERENCE_OPTIMIZER)
    shown = " ".join(helps["pretrain-metaquery"].split())
    assert " ".join(f"{flag} {value}" for flag, value in REFERENCE_OPTIMIZER.items()) in shown


def _anchors(markdown):
    anchors, text = set(), re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)
    for heading in re.findall(r"^#+\s+(.*)$", text, re.MULTILINE):
        base = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, n = base, 1
        while anchor in anchors:
            anchor, n = f"{base}-{n}", n + 1
        anchors.add(anchor)
    return anchors


def test_relative_links_and_anchors_resolve():
    broken = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.DOTALL)
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", link):
                continue
            path, _, anchor = link.partition("#")
            target = (doc.parent / path).resolve() if path else doc
            if not target.exists():
                broken.append(f"{doc.relative_to(REPO)}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target.read_text()):
                broken.append(f"{doc.relative_to(REPO)}: {link} (no such heading)")
    assert not broken, "\n".join(broken)
