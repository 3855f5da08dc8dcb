"""Where a decode step's time goes: torch.profiler over text-only greedy decoding, ours vs Hugging Face
`generate()` on the same weights (the setup of benchmarks/generate_kv_cache.py), grouped by kind of op.

    python benchmarks/generate_profile.py --threads 1 --batch 1 --new-tokens 128
    python benchmarks/generate_profile.py --threads 1 --batch 32 --new-tokens 512 --top 15

Reported per decode step (profiler self CPU time, so another job's load inflates it much less than wall time):
matrix products (aten::mm/addmm/bmm and oneDNN's linear: the blocks' linears and the LM head), attention (the sdpa kernels),
concatenation (aten::cat: how Hugging Face's dynamic cache grows), copies (copy_/index_copy_/fill_: our in-place
cache writes), everything else (norms, RoPE, activations, selection, views), and the number of aten calls.
The profiler adds a few microseconds per op; compare the two columns, not the totals with the benchmark's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_kv_cache import (
    MODELS,
    TextOnly,
    hf_from_ours,
    hf_generate,
    make_generator,
    make_prompts,
    special_ids,
)

from engine.generation import SamplingConfig
from engine.model.vpit import build_model

KINDS = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_efficient_attention",
                  "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_attention_math"),
    "concatenation": ("aten::cat",),
    "copies": ("aten::copy_", "aten::index_copy_", "aten::fill_", "aten::index_fill_"),
}


def breakdown(fn, steps: int) -> tuple[dict[str, float], float, list]:
    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    ms: dict[str, float] = {kind: 0.0 for kind in [*KINDS, "everything else"]}
    calls = 0
    for e in events:
        if not e.key.startswith(("aten::", "mkldnn::")):
            continue
        calls += e.count
        kind = next((k for k, names in KINDS.items() if e.key in names), "everything else")
        ms[kind] += e.self_cpu_time_total / 1e3 / steps
    return ms, calls / steps, events


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="58m")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--top", type=int, default=0, help="also print the top ops of each side")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()}, "
          f"{args.model}, batch {args.batch}, {args.new_tokens} new tokens")
    model = build_model(MODELS[args.model](), seed=0).eval().requires_grad_(False)
    hf = hf_from_ours(model, torch.device("cpu"), torch.float32)
    prompts = make_prompts(args.batch, args.prompt_length, model.config)
    ours = make_generator(TextOnly, model)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    suppress = list(special_ids(model.config))
    with torch.no_grad():
        sides = {"ours": breakdown(lambda: ours.generate(prompts, sampling), args.new_tokens),
                 "HF generate()": breakdown(lambda: hf_generate(hf, prompts, args.new_tokens, suppress),
                                            args.new_tokens)}
    print(f"\n| per decode step (profiler self CPU ms) | {' | '.join(sides)} |")
    print(f"|---|{'---|' * len(sides)}")
    for kind in [*KINDS, "everything else"]:
        print(f"| {kind} | " + " | ".join(f"{ms[kind]:.2f}" for ms, _, _ in sides.values()) + " |")
    print("| **total** | " + " | ".join(f"**{sum(ms.values()):.2f}**" for ms, _, _ in sides.values()) + " |")
    print("| aten calls per step | " + " | ".join(f"{calls:.0f}" for _, calls, _ in sides.values()) + " |")
    print(f"\n# load after: {os.getloadavg()}")
    if args.top:
        for name, (_, _, events) in sides.items():
            print(f"\n## {name}\n" + events.table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
