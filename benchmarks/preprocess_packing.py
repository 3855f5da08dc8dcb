"""Packing efficiency (real tokens / token slots) of best-fit-decreasing on a realistic MetaMorph-like mix.

No tokenizer or encoder: document lengths are drawn from the families' typical shapes, with images counted as
their 66-token blocks (<image_start>, 64 slots, <image_end>). Shards are packed independently, as `build`
does (--samples-per-shard).

    python benchmarks/preprocess_packing.py [--seq-length 4096] [--samples 200000] [--samples-per-shard 10000]
"""

from __future__ import annotations

import argparse
import random
import time

from preprocess.packing import pack_best_fit_decreasing

IMAGE_BLOCK = 66
HEADER = 12  # BOS + role headers of a 2-turn llama3 conversation, roughly


def sample_length(rng: random.Random, seq_length: int) -> tuple[str, int]:
    family = rng.choices(["vqa", "vqa-multiturn", "caption", "t2i", "video", "thinking", "edit", "text"],
                         weights=[30, 15, 12, 15, 5, 5, 5, 13])[0]
    if family == "vqa":
        length = IMAGE_BLOCK + HEADER + rng.randint(8, 40) + int(rng.lognormvariate(3.0, 0.9))
    elif family == "vqa-multiturn":
        length = IMAGE_BLOCK + HEADER + sum(rng.randint(10, 40) + int(rng.lognormvariate(3.5, 0.8))
                                            for _ in range(rng.randint(2, 8)))
    elif family == "caption":  # long captions: the detailed-description sets
        length = IMAGE_BLOCK + HEADER + 20 + int(rng.lognormvariate(5.2, 0.6))
    elif family == "t2i":
        length = IMAGE_BLOCK + HEADER + rng.randint(8, 80)
    elif family == "video":
        length = rng.randint(4, 16) * IMAGE_BLOCK + HEADER + int(rng.lognormvariate(4.0, 0.7))
    elif family == "thinking":
        length = 2 * IMAGE_BLOCK + HEADER + int(rng.lognormvariate(4.5, 0.6))
    elif family == "edit":
        length = 2 * IMAGE_BLOCK + HEADER + rng.randint(8, 60)
    else:
        length = HEADER + int(rng.lognormvariate(5.8, 1.0))
    return family, min(length, seq_length)  # over-long ones are truncated to the sequence by `build`


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    lengths = [sample_length(rng, args.seq_length)[1] for _ in range(args.samples)]
    start = time.perf_counter()
    sequences = 0
    for first in range(0, len(lengths), args.samples_per_shard):
        sequences += len(pack_best_fit_decreasing(lengths[first:first + args.samples_per_shard], args.seq_length))
    seconds = time.perf_counter() - start
    tokens = sum(lengths)
    print(f"mix: {args.samples} samples, mean {tokens / len(lengths):.0f} tokens, "
          f"{sum(length == args.seq_length for length in lengths)} at the sequence limit")
    print(f"best-fit-decreasing, shards of {args.samples_per_shard}, seq_length {args.seq_length}: "
          f"{sequences} sequences, efficiency {tokens / (sequences * args.seq_length):.2%} "
          f"(lower bound on sequences {-(-tokens // args.seq_length)}), packed in {seconds:.2f}s "
          f"({args.samples / seconds:,.0f} docs/s)")


if __name__ == "__main__":
    main()
