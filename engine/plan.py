"""Layout planner: rank every parallel layout the trainer accepts by predicted step time, within GPU memory.

    python -m engine.plan --model-preset llama3.1-8b --gpus 64 --gpu h100-80gb --seq-length 4096 \
        --global-batch-size 1536

Prints a ranked table (memory per GPU, step time, pipeline bubble, MFU, tokens/s per GPU) and the exact launch
command of the best layout. Models and assumptions: engine/planning/ and docs/cluster.md; the efficiency is an
assumption until calibrated with benchmarks/plan_gpu_validation.py (`--calibration`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from engine.config import add_model_args, model_config_from_args
from engine.planning.hardware import GPUS, Calibration, GiB, gpu_spec, load_calibration

# The layout, memory and timing models import torch (through the trainer's parallel validation): they are
# imported in `evaluate`, after argument parsing, so that --help answers at once.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine.plan", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    add_model_args(parser)  # --model-preset and Megatron's shape flags (incl. --seq-length)
    parser.add_argument("--gpus", type=int, required=True, help="total GPUs of the job")
    parser.add_argument("--gpu", choices=sorted(GPUS), required=True)
    parser.add_argument("--global-batch-size", type=int, required=True, help="packed sequences per step")
    parser.add_argument("--stage", type=int, choices=[1, 2], default=2, help="1: projector + new rows trainable")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="default 8")
    parser.add_argument("--memory-gib", type=float, default=None, help="usable memory per GPU (default: the GPU's)")
    parser.add_argument("--memory-margin", type=float, default=0.05,
                        help="keep this fraction of GPU memory free (default 0.05)")
    parser.add_argument("--intra-node-bw", type=float, default=None, help="effective NVLink busbw per GPU, GB/s")
    parser.add_argument("--inter-node-bw", type=float, default=None, help="effective network busbw per GPU, GB/s")
    parser.add_argument("--efficiency", type=float, default=None,
                        help="fraction of peak the model's FLOPs reach (overrides --calibration)")
    parser.add_argument("--calibration", default=None, help="JSON from benchmarks/plan_gpu_validation.py")
    parser.add_argument("--loss-token-fraction", type=float, default=1.0,
                        help="fraction of tokens with a text label (LM-head work and logits memory); 1 = upper bound")
    parser.add_argument("--tokenizer-vocab", type=int, default=None,
                        help="tokenizer ids incl. <image_start>/<image_end> (default: preset vocabulary + 2)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    parser.add_argument("--max-micro-batch", type=int, default=16)
    parser.add_argument("--top", type=int, default=15, help="rows of the table")
    parser.add_argument("--json", default=None, help="also write every evaluated layout here")
    return parser


def evaluate(args: argparse.Namespace) -> tuple[list[dict], dict]:
    from engine.planning.layout import TrainerSupport, enumerate_layouts
    from engine.planning.memory import peak_memory
    from engine.planning.timing import step_time
    from engine.training.metrics import flops_per_token

    model = model_config_from_args(args)
    gpu = gpu_spec(args.gpu, intra_node_gbs=args.intra_node_bw, inter_node_gbs=args.inter_node_bw,
                   gpus_per_node=args.gpus_per_node, memory_gib=args.memory_gib)
    calibration = load_calibration(args.calibration) if args.calibration else Calibration()
    if args.efficiency is not None:
        calibration = replace(calibration, efficiency=args.efficiency, source="--efficiency")
    if args.gpus < 1 or args.global_batch_size < 1:
        raise ValueError("--gpus and --global-batch-size must be positive")
    if args.gpus > gpu.gpus_per_node and args.gpus % gpu.gpus_per_node:
        # torchrun (and examples/slurm/train.sbatch) start the same number of ranks on every node
        raise ValueError(f"--gpus {args.gpus} spans several nodes of {gpu.gpus_per_node} GPUs but is not a multiple "
                         f"of {gpu.gpus_per_node}: every node runs the same number of ranks; use a multiple, or "
                         "--gpus-per-node for nodes of another size")
    support = TrainerSupport.current()
    budget = gpu.memory_gib * GiB * (1 - args.memory_margin)
    rows = []
    for layout, cfg in enumerate_layouts(model, args.gpus, args.global_batch_size, gpu, support,
                                         max_micro_batch=args.max_micro_batch,
                                         make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                                         tokenizer_vocab=args.tokenizer_vocab):
        memory = peak_memory(cfg, layout, calibration, stage=args.stage, loss_token_fraction=args.loss_token_fraction)
        timing = step_time(cfg, layout, gpu, calibration, loss_token_fraction=args.loss_token_fraction)
        tokens = args.global_batch_size * cfg.seq_length
        mfu = flops_per_token(cfg) * tokens / timing.step_s / (args.gpus * gpu.bf16_tflops * 1e12)
        rows.append({"layout": layout, "cfg": cfg, "memory": memory, "time": timing, "fits": memory.total <= budget,
                     "tokens_per_s_per_gpu": tokens / timing.step_s / args.gpus, "mfu": mfu})
    rows.sort(key=lambda r: (not r["fits"], r["time"].step_s, r["memory"].total))
    context = {"model": model, "gpu": gpu, "calibration": calibration, "budget_gib": budget / GiB}
    return rows, context


def _row_line(rank: int, row: dict) -> str:
    layout, mem, t = row["layout"], row["memory"].gib(), row["time"]
    return (f"{rank:>3} {layout.describe():<26} {layout.micro_batch_size:>3} {layout.num_microbatches:>4} "
            f"{layout.recompute:<9} {'fp8' if layout.fp8 else ('bf16' if layout.bf16 else 'fp32'):<4} "
            f"{'fce' if layout.fused_ce else '-':<3} "
            f"{mem['params']:>6.1f} {mem['grads']:>6.1f} {mem['optimizer']:>6.1f} {mem['activations']:>6.1f} "
            f"{mem['transient'] + mem['overhead']:>6.1f} {mem['total']:>6.1f} {t.step_s:>8.2f} "
            f"{100 * t.bubble_fraction:>5.1f} {100 * row['mfu']:>5.1f} {row['tokens_per_s_per_gpu']:>8.0f}")


HEADER = ("  # layout                     mbs    m recompute prec ce  params  grads  optim   acts  other  total   step s "
          "bubbl   MFU tok/s/gpu\n" + " " * 66 + "(GiB per GPU, worst pipeline rank)" + " " * 10 + "%     %")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows, ctx = evaluate(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    gpu, cal, model = ctx["gpu"], ctx["calibration"], ctx["model"]
    fitting = [r for r in rows if r["fits"]]
    print(f"{args.model_preset or 'custom'} ({model.num_layers} layers, hidden {model.hidden_size}), seq "
          f"{model.seq_length}, global batch {args.global_batch_size}, stage {args.stage} on {args.gpus} x {gpu.name} "
          f"({gpu.gpus_per_node} per node, {gpu.memory_gib:.1f} GiB, budget {ctx['budget_gib']:.1f} GiB)")
    print(f"assumptions: efficiency {cal.efficiency:.2f} of peak ({cal.source}), NVLink {gpu.intra_node_gbs:.0f} GB/s, "
          f"network {gpu.inter_node_gbs:.0f} GB/s per GPU, labelled-token fraction {args.loss_token_fraction}")
    print(f"{len(rows)} layouts the trainer accepts, {len(fitting)} fit in memory\n")
    print(HEADER)
    shown = fitting[:args.top] if fitting else rows[:0]
    for i, row in enumerate(shown, 1):
        print(_row_line(i, row))
    if not fitting:
        least = sorted(rows, key=lambda r: r["memory"].total)[:5]
        print("no layout fits; the five smallest:")
        for i, row in enumerate(least, 1):
            print(_row_line(i, row))
    if args.json:
        out = [{"layout": asdict(r["layout"]), "memory_gib": r["memory"].gib(), "fits": r["fits"],
                "step_s": r["time"].step_s, "bubble_fraction": r["time"].bubble_fraction, "mfu": r["mfu"],
                "tokens_per_s_per_gpu": r["tokens_per_s_per_gpu"]} for r in rows]
        Path(args.json).write_text(json.dumps(out, indent=1))
    if not fitting:
        return 1
    from engine.planning.layout import launch_flags

    best = fitting[0]["layout"]
    flags = launch_flags(best, model_preset=args.model_preset, seq_length=model.seq_length)
    if args.stage == 1:
        flags += ["--stage", "1"]
    nodes = max(1, args.gpus // gpu.gpus_per_node)
    per_node = min(args.gpus, gpu.gpus_per_node)
    print(f"\nbest: {best.describe()}, micro-batch {best.micro_batch_size}, recompute {best.recompute}, "
          f"{'FP8' if best.fp8 else ('bf16' if best.bf16 else 'fp32')}"
          f"{', fused LM head + cross-entropy' if best.fused_ce else ''}")
    print(f"  torchrun --nnodes {nodes} --nproc-per-node {per_node} pretrain_gpt_vision.py " + " ".join(flags)
          + " --data-path ... --train-iters ...")
    if nodes > 1:
        print(f"  sbatch --nodes {nodes} examples/slurm/train.sbatch " + " ".join(flags)
              + " --data-path ... --train-iters ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
