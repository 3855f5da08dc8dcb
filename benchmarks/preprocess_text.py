"""Text-only JSONL -> shards: docs/s and MB/s, side by side with Megatron-LM's tools/preprocess_data.py, and
the scaling with workers and MPI ranks.

    python benchmarks/preprocess_text.py --megatron-lm /path/to/Megatron-LM [--docs 20000] [--workers 1 2]
                                         [--pairs 3] [--mpi]

Both sides get the same corpus (synthetic multi-turn conversations), the same tokenizer (a byte-level BPE
`tokenizer.json` trained here, or --hf-tokenizer DIR) and the same worker count. Ours reads LLaVA-style records
and applies the chat template, loss masks and packing; Megatron's reads {"text": ...} lines (the turns joined)
and appends EOD. Megatron-LM's tools are not in the megatron-core wheel: pass a checkout with --megatron-lm (its
code is run, never copied); without it only our side is measured.

Method (shared/BENCHMARKING.md): one warm-up run of each side, then --pairs interleaved pairs (ours, Megatron's)
per worker count; the speed-up is the median of the per-pair ratios (min-max shown). Wall time includes process
start; CPU time (user + sys of the whole process tree) is printed too, being less sensitive to other jobs. The
load average is printed before and after every run. With --mpi, `mpirun -n 2` (1 worker per rank) is
interleaved with one process of 1 worker and its output is checked byte for byte against it; both run with
RAYON_NUM_THREADS=1 so that a rank is one core (Hugging Face `tokenizers` spreads a batch call over every core by
default, which the side-by-side runs keep: that is how a user runs either tool).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a of to and in is it that for on with as was at by be this from or have an they which one you "
         "were her all she there would their we him been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such "
         "like our over man me even most made after also did many before must through back years where much "
         "image picture colour river mountain butterfly chrysalis caterpillar model train token sequence").split()


def make_corpus(path: Path, megatron_path: Path, docs: int, seed: int) -> int:
    rng = random.Random(seed)
    total_words = 0
    with open(path, "w") as ours, open(megatron_path, "w") as theirs:
        for index in range(docs):
            turns = []
            for turn in range(2 * rng.randint(1, 3)):
                words = [rng.choice(WORDS) for _ in range(int(rng.lognormvariate(3.6, 0.8)) + 3)]
                total_words += len(words)
                turns.append({"from": "human" if turn % 2 == 0 else "gpt", "value": " ".join(words) + "."})
            ours.write(json.dumps({"id": f"doc-{index}", "conversations": turns}) + "\n")
            theirs.write(json.dumps({"text": "\n".join(t["value"] for t in turns)}) + "\n")
    return total_words


def load() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


def run(command: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process tree) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"command failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu


def tree_digest(out: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(out)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def megatron_tokens(prefix: Path) -> int:
    import numpy as np

    with open(f"{prefix}.idx", "rb") as handle:
        header = handle.read(9 + 8 + 1 + 8 + 8)
        count = int.from_bytes(header[18:26], "little")
        return int(np.frombuffer(handle.read(count * 4), dtype="<i4").sum())


def summarize(name: str, ratios: list[float]) -> str:
    return f"{name}: median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, max {max(ratios):.2f}x, " \
           f"{len(ratios)} pairs)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--megatron-lm", type=Path, help="local Megatron-LM checkout (for tools/preprocess_data.py)")
    parser.add_argument("--hf-tokenizer", type=Path, help="directory with tokenizer.json (default: a tiny one)")
    parser.add_argument("--mpi", action="store_true", help="also time mpirun -n 2 against one process")
    parser.add_argument("--keep", type=Path, help="keep the corpus and outputs here")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-text-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus, megatron_corpus = work / "corpus.jsonl", work / "megatron_corpus.jsonl"
    words = make_corpus(corpus, megatron_corpus, args.docs, seed=0)
    tokenizer_dir = args.hf_tokenizer
    if tokenizer_dir is None:
        from engine.tokenizer.tiny import train_tiny_hf_tokenizer

        tokenizer_dir = work / "tokenizer"
        train_tiny_hf_tokenizer([" ".join(WORDS)] * 20, tokenizer_dir, vocab_size=600)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    repo = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
    ours_mb, theirs_mb = corpus.stat().st_size / 1e6, megatron_corpus.stat().st_size / 1e6
    import tokenizers

    print(f"corpus: {args.docs} conversations, {words} words ({ours_mb:.1f} MB as records, {theirs_mb:.1f} MB as "
          f"Megatron text lines); tokenizer {tokenizer_dir} (tokenizers {tokenizers.__version__})")
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, load average {load()}")

    def ours(workers: int, out: Path, launcher: tuple = (), env=env) -> tuple[float, float]:
        shutil.rmtree(out, ignore_errors=True)
        command = [*launcher, sys.executable, "-m", "preprocess", "build", "--input", str(corpus),
                   "--tokenizer-type", "huggingface", "--tokenizer-model", str(tokenizer_dir / "tokenizer.json"),
                   "--chat-template", "plain", "--vision-encoder", "tiny-random", "--seq-length",
                   str(args.seq_length), "--samples-per-shard", str(max(1, args.docs // 8)), "--workers",
                   str(workers), "--output", str(out), "--no-progress"]
        return run(command, env)

    megatron_env = dict(env)
    tool = None
    if args.megatron_lm is not None:
        tool = args.megatron_lm / "tools" / "preprocess_data.py"
        if not tool.is_file():
            sys.exit(f"--megatron-lm {args.megatron_lm}: {tool} not found")
        megatron_env["PYTHONPATH"] = str(args.megatron_lm) + os.pathsep + env["PYTHONPATH"]

    def theirs(workers: int) -> tuple[float, float]:
        return run([sys.executable, str(tool), "--input", str(megatron_corpus), "--output-prefix",
                    str(work / "megatron"), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                    str(tokenizer_dir), "--workers", str(workers), "--append-eod"], megatron_env)

    out = work / "ours"
    ours(max(args.workers), out)  # warm-up (page cache, .pyc files)
    if tool:
        theirs(max(args.workers))
    manifest = json.loads((out / "manifest.json").read_text())
    reference = tree_digest(out)
    print(f"same work: ours {manifest['counts']['tokens']:,} tokens (chat template, loss masks, packed into "
          f"{manifest['counts']['sequences']} x {args.seq_length}, efficiency {manifest['packing_efficiency']:.2%})"
          + (f"; Megatron {megatron_tokens(work / 'megatron_text_document'):,} tokens (joined turns + EOD)"
             if tool else "") + f"; our output digest {reference}")

    for workers in args.workers:
        ratios, cpu_ratios = [], []
        print(f"\n--workers {workers}")
        for pair in range(args.pairs):
            load_before = load()
            wall, cpu = ours(workers, out)
            assert tree_digest(out) == reference, "output bytes changed between runs"
            line = f"  pair {pair + 1}: ours {wall:5.1f} s wall {cpu:5.1f} CPU-s = {args.docs / wall:7,.0f} docs/s " \
                   f"{ours_mb / wall:5.2f} MB/s"
            if tool:
                their_wall, their_cpu = theirs(workers)
                ratios.append(their_wall / wall)
                cpu_ratios.append(their_cpu / cpu)
                line += f" | Megatron {their_wall:5.1f} s {their_cpu:5.1f} CPU-s = {args.docs / their_wall:7,.0f} " \
                        f"docs/s {theirs_mb / their_wall:5.2f} MB/s | {ratios[-1]:.2f}x"
            print(line + f"  (load {load_before} -> {load()})")
        if ratios:
            print("  " + summarize("speed-up, wall", ratios) + "; " + summarize("CPU time", cpu_ratios))

    if args.mpi:
        mpirun = shutil.which("mpirun")
        if mpirun is None:
            sys.exit("--mpi: mpirun not found (apt-get install openmpi-bin libopenmpi-dev; pip install mpi4py)")
        launcher = (mpirun, "-n", "2", "--oversubscribe", "--allow-run-as-root")
        print("\nmpirun -n 2 (1 worker per rank) vs one process with 1 worker (RAYON_NUM_THREADS=1)")
        one_core = dict(env, RAYON_NUM_THREADS="1")
        scaling = []
        for pair in range(args.pairs):
            load_before = load()
            one, _ = ours(1, work / "one", env=one_core)
            two, _ = ours(1, work / "mpi", launcher + ("-x", "RAYON_NUM_THREADS"), env=one_core)
            assert tree_digest(work / "mpi") == tree_digest(work / "one") == reference, "MPI output differs"
            scaling.append(one / two)
            print(f"  pair {pair + 1}: 1 process {args.docs / one:7,.0f} docs/s, mpirun -n 2 {args.docs / two:7,.0f} "
                  f"docs/s ({ours_mb / two:.2f} MB/s): {scaling[-1]:.2f}x  (load {load_before} -> {load()})")
        print("  " + summarize("scaling with 2 ranks", scaling) + "; output byte-identical")
    print(f"\nload average at the end: {load()}")


if __name__ == "__main__":
    main()
