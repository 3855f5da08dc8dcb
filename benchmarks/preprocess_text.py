"""Text-only JSONL -> shards, in documents/s; side by side with Megatron-LM's tools/preprocess_data.py.

    python benchmarks/preprocess_text.py [--docs 20000] [--workers 2] [--megatron-lm /path/to/Megatron-LM]

Both sides get the same corpus (synthetic multi-turn conversations), the same tokenizer (a byte-level BPE
`tokenizer.json` trained here, or --hf-tokenizer DIR) and the same worker count. Ours reads LLaVA-style
records and applies the chat template, loss masks and packing; Megatron's reads {"text": ...} lines (the
turns joined) and appends EOD. Megatron-LM's tools are not in the megatron-core wheel: pass a local checkout
with --megatron-lm (its code is run, never copied); without it only our side is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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


def run(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"command failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--megatron-lm", type=Path, help="local Megatron-LM checkout (for tools/preprocess_data.py)")
    parser.add_argument("--hf-tokenizer", type=Path, help="directory with tokenizer.json (default: a tiny one)")
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
    print(f"corpus: {args.docs} conversations, {words} words ({corpus.stat().st_size / 1e6:.1f} MB); "
          f"workers {args.workers}; machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    out = work / "ours"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    ours = run([sys.executable, "-m", "preprocess", "build", "--input", str(corpus), "--tokenizer-type", "huggingface",
                "--tokenizer-model", str(tokenizer_dir / "tokenizer.json"), "--chat-template", "plain",
                "--vision-encoder", "tiny-random", "--seq-length", str(args.seq_length),
                "--samples-per-shard", str(max(1, args.docs // (4 * args.workers))), "--workers", str(args.workers),
                "--output", str(out), "--no-progress"], env)
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"chrysalis preprocess build: {ours:.1f}s wall (process start included) = {args.docs / ours:,.0f} docs/s, "
          f"{manifest['counts']['tokens'] / ours:,.0f} tokens/s, packing efficiency {manifest['packing_efficiency']:.2%}")

    if args.megatron_lm is None:
        print("Megatron-LM comparison: SKIPPED - it needs a local Megatron-LM checkout: --megatron-lm PATH "
              "(tools/preprocess_data.py is not part of the megatron-core wheel)")
        return
    tool = args.megatron_lm / "tools" / "preprocess_data.py"
    if not tool.is_file():
        sys.exit(f"--megatron-lm {args.megatron_lm}: {tool} not found")
    env["PYTHONPATH"] = str(args.megatron_lm) + os.pathsep + env["PYTHONPATH"]
    theirs = run([sys.executable, str(tool), "--input", str(megatron_corpus), "--output-prefix", str(work / "megatron"),
                  "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer_dir),
                  "--workers", str(args.workers), "--append-eod"], env)
    print(f"Megatron-LM tools/preprocess_data.py: {theirs:.1f}s wall = {args.docs / theirs:,.0f} docs/s")
    print(f"speed-up: {theirs / ours:.2f}x (goal >= 2x)")


if __name__ == "__main__":
    main()
