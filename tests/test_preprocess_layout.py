"""Dependencies point one way: the shard format lives in the engine, `preprocess` is a tool on top of it."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_engine_imports_nothing_from_preprocess():
    offenders = {str(path.relative_to(REPO)): sorted(n for n in _imported_modules(path)
                                                     if n == "preprocess" or n.startswith("preprocess."))
                 for path in sorted((REPO / "engine").rglob("*.py"))}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_no_preprocess_file_passes_about_400_lines():
    lengths = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in (REPO / "preprocess").glob("*.py")}
    assert lengths and {path: n for path, n in lengths.items() if n > 420} == {}


def test_the_public_reader_stays_importable_from_preprocess():
    import engine.data.shards
    import preprocess.shards

    assert preprocess.shards.ShardReader is engine.data.shards.ShardReader
    assert preprocess.shards.PackedSequence is engine.data.shards.PackedSequence


def test_a_text_only_build_never_imports_torch_nor_builds_the_encoder(tmp_path):
    """The encoder's fingerprint comes from its description (config + weight files), so text costs no torch."""
    import json
    import os
    import subprocess
    import sys

    records = [{"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"},
                                                {"from": "gpt", "value": "a"}]} for i in range(3)]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    script = (
        "import sys\n"
        "from preprocess.cli import main\n"
        f"code = main(['build', '--input', {str(tmp_path / 'text.jsonl')!r}, '--tokenizer-type', 'tiktoken',\n"
        f"             '--tokenizer-model', {str(REPO / 'examples/data/tokenizer/tokenizer.model')!r},\n"
        f"             '--vision-encoder', 'tiny-random', '--output', {str(tmp_path / 'out')!r}, '--no-progress'])\n"
        "print(code, sorted(m for m in ('torch', 'transformers', 'megatron') if m in sys.modules))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stdout + done.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["vision_encoder"]["name"] == "tiny-random" and len(manifest["vision_encoder"]["fingerprint"]) == 64
