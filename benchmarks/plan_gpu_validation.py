"""GPU validation of the layout planner on one GPU: predicted peak memory and step time against measured, for a few
single-GPU layouts of an 8B-shaped model (LLaMA-3.1-8B layers, fewer of them so that fp32 master weights and AdamW
fit), and a calibration file (`efficiency`) for `python -m engine.plan --calibration`.

    python benchmarks/plan_gpu_validation.py [--model-preset llama3.1-8b --num-layers 8 --seq-length 4096] \
        [--gpu h100-80gb] --out plan_gpu.json --calibration-out plan_calibration.json

Every run trains through `engine.training.Trainer` (the real CLI's config, --mock-data, --bf16) for --warmup + --steps
steps; step time is the median over the timed steps (CUDA-synchronised at each optimizer step); peak memory is
`torch.cuda.max_memory_allocated` (compared with the prediction less the fixed CUDA-context overhead) and
`max_memory_reserved` (compared with the full prediction). The calibrated efficiency is the assumed one scaled by
predicted / measured compute time of the no-recompute run. Load average, versions and device are printed and saved.
`--allow-cpu` runs the same code on CPU at tiny sizes (a dry run for the test suite; no memory figures).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def _environment() -> dict:
    info = {"torch": torch.__version__, "load_avg": os.getloadavg(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    total_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)
    return info


def run_one(args, recompute: str, micro_batch: int) -> dict:
    from engine.planning import Calibration, Layout, gpu_spec, peak_memory, step_time
    from engine.planning.hardware import GiB
    from engine.training import Trainer, build_device_mesh, parse_training_config

    on_gpu = torch.cuda.is_available()
    flags = ["--mock-data", "--mock-data-sequences", str(64 * micro_batch), "--model-preset", args.model_preset,
             "--seq-length", str(args.seq_length), "--micro-batch-size", str(micro_batch), "--global-batch-size",
             str(micro_batch), "--train-iters", str(args.warmup + args.steps), "--lr", "1e-5", "--num-workers", "0",
             "--log-interval", "1000", "--seed", "1"]
    if args.num_layers:
        flags += ["--num-layers", str(args.num_layers)]
    if args.vocab_size:
        flags += ["--vocab-size", str(args.vocab_size)]
    if on_gpu:
        flags.append("--bf16")
    if recompute == "full":
        flags += ["--recompute-num-layers", "-1"]
    elif recompute == "selective":
        flags += ["--recompute-granularity", "selective"]
    config = parse_training_config(flags)
    trainer = Trainer(config, build_device_mesh(), log=lambda message: None)
    stamps: list[float] = []
    step = trainer.optimizer.step

    def timed_step() -> None:
        step()
        if on_gpu:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    trainer.optimizer.step = timed_step
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    times = [b - a for a, b in itertools.pairwise(stamps[max(0, args.warmup - 1):])]
    measured_step = statistics.median(times)

    cfg = trainer.model_config
    layout = Layout(tp=1, pp=1, dp=1, micro_batch_size=micro_batch, global_batch_size=micro_batch,
                    recompute=recompute, bf16=on_gpu)
    gpu = gpu_spec(args.gpu)
    calibration = Calibration()
    memory = peak_memory(cfg, layout, calibration)
    timing = step_time(cfg, layout, gpu, calibration)
    result = {"recompute": recompute, "micro_batch": micro_batch, "layers": cfg.num_layers,
              "seq_length": cfg.seq_length, "vocab": cfg.vocab_size, "measured_step_s": measured_step,
              "step_times_s": times, "predicted_step_s": timing.step_s, "predicted_compute_s": timing.compute_s,
              "predicted_memory_gib": memory.gib(), "assumed_efficiency": calibration.efficiency}
    if on_gpu:
        allocated = torch.cuda.max_memory_allocated() / GiB
        reserved = torch.cuda.max_memory_reserved() / GiB
        predicted_tensors = memory.gib()["total"] - calibration.fixed_overhead_gib
        result.update(measured_allocated_gib=allocated, measured_reserved_gib=reserved,
                      allocated_error=(predicted_tensors - allocated) / allocated,
                      reserved_error=(memory.gib()["total"] - reserved) / reserved)
    result["time_error"] = (timing.step_s - measured_step) / measured_step
    del trainer
    if on_gpu:
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-preset", default="llama3.1-8b")
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--gpu", default="h100-80gb", help="planner GPU spec to predict with")
    parser.add_argument("--recompute", nargs="+", default=["none", "full", "selective"])
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[1])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="plan_gpu_validation.json")
    parser.add_argument("--calibration-out", default="plan_calibration.json")
    parser.add_argument("--allow-cpu", action="store_true", help="dry run on CPU (tiny sizes)")
    args = parser.parse_args(argv)
    from engine.config import PRESETS

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.allow_cpu:
        parser.error("no CUDA device (use --allow-cpu for a dry run)")
    if args.vocab_size is None:
        args.vocab_size = PRESETS[args.model_preset]["vocab_size"]
    if not on_gpu:
        args.num_layers = min(args.num_layers or 2, 2)
        args.recompute = args.recompute[:1]
    before = _environment()
    print(f"environment: {before}", flush=True)
    runs = []
    for recompute in args.recompute:
        for micro_batch in args.micro_batch:
            run = run_one(args, recompute, micro_batch)
            runs.append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "step_times_s"}), flush=True)
    after = _environment()
    print(f"load average after: {after['load_avg']}", flush=True)
    result = {"device": before.get("device", "cpu"), "environment_before": before, "load_avg_after": after["load_avg"],
              "gpu_spec": args.gpu, "runs": runs}
    base = next((r for r in runs if r["recompute"] == "none"), runs[0])
    efficiency = base["assumed_efficiency"] * base["predicted_compute_s"] / base["measured_step_s"]
    result["calibrated_efficiency"] = efficiency
    Path(args.out).write_text(json.dumps(result, indent=1))
    if on_gpu:
        Path(args.calibration_out).write_text(json.dumps(
            {"efficiency": min(1.0, efficiency), "source": f"plan_gpu_validation on {result['device']}, "
                                                            f"{args.model_preset} x {args.num_layers} layers"}))
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
