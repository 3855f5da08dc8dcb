"""Training-loader throughput: packed 4096-token sequences with 10 images each, per second, on one CPU core, with
the shards in the page cache.

    python benchmarks/loader_throughput.py --work /tmp/loader_bench [--records 256] [--seconds 10]

Step 1 (once, cached in --work): writes `--records` conversations of ~3.9k text tokens and 10 distinct PNG images
each (5 prompt, 5 response) and builds them with `python -m preprocess build --vision-encoder tiny-random
--seq-length 4096` (one record per packed sequence). Step 2: pins this process to one core (1 torch thread), reads
the whole build once to warm the page cache, then times the training path exactly as the trainer runs it:
`BlendedSamples` (blend lookup, shuffled order) -> `ShardReader` (memory-mapped tokens, side streams, 10 embedding
rows of 147 KB each) -> `collate_packed` (labels, positions, slots; the [640, 1152] bf16 visual tokens per
sequence) in micro-batches, num_workers=0 so the one core does everything.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the a red blue cat dog house tree river mountain picture shows small large green bright dark image "
         "scene left right above below near far person holding looking standing sitting").split()


def make_inputs(work: Path, records: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = random.Random(seed)
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in range(records):
        paths = []
        for i in range(10):
            name = f"{r:05d}_{i}.png"
            if not (images / name).exists():
                pixels = bytes(rng.getrandbits(8) for _ in range(24 * 24 * 3))
                Image.frombytes("RGB", (24, 24), pixels).save(images / name)
            paths.append(name)
        words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
        prompt = "<image>" * 5 + "\n" + words(560)
        answer = words(560) + " " + "<image>" * 5
        lines.append(json.dumps({"id": f"r{r}", "image": paths, "conversations": [
            {"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}))
    path = work / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def build(work: Path, records: int) -> Path:
    out = work / "build"
    if (out / "manifest.json").is_file():
        return out
    inputs = make_inputs(work, records)
    cmd = [sys.executable, "-m", "preprocess", "build", "--input", str(inputs), "--image-root", str(work / "images"),
           "--tokenizer-type", "tiktoken", "--tokenizer-model", str(ROOT / "examples/data/tokenizer/tokenizer.model"),
           "--chat-template", "llama3", "--vision-encoder", "tiny-random", "--seq-length", "4096",
           "--overlong", "truncate", "--workers", "2", "--output", str(out), "--no-progress"]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/chrysalis_loader_bench")
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = build(work, args.records)

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from engine.training.data import BlendedSamples, build_loader
    from preprocess.shards import ShardReader

    reader = ShardReader(out)
    images = [len(reader[i].image_rows) for i in range(len(reader))]
    real = [int(np.asarray(reader[i].document_ids >= 0).sum()) for i in range(len(reader))]
    for f in out.rglob("*"):  # warm the page cache
        if f.is_file():
            f.read_bytes()
    samples = BlendedSamples([(1.0, reader)], (1.0, 0.0, 0.0), 0, 1_000_000, seed=1)
    mbs = args.micro_batch_size
    loader = build_loader(samples, global_batch_size=mbs, micro_batch_size=mbs, dp_rank=0, dp_size=1,
                          consumed_samples=0, seq_length=reader.seq_length, num_workers=0, pin_memory=False)
    batches = iter(loader)
    for _ in range(5):
        next(batches)
    count, start = 0, time.perf_counter()
    visual = 0
    while time.perf_counter() - start < args.seconds:
        batch = next(batches)
        count += batch.tokens.shape[0]
        visual += batch.visual_tokens.shape[0]
    elapsed = time.perf_counter() - start
    result = {"sequences": len(reader), "seq_length": reader.seq_length, "images_per_sequence_mean": float(np.mean(images)),
              "real_tokens_per_sequence_mean": float(np.mean(real)), "micro_batch_size": mbs,
              "sequences_per_sec": count / elapsed, "visual_tokens_per_sec": visual / elapsed,
              "cores": 1, "torch_threads": torch.get_num_threads()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
