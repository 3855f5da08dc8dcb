"""Shared by the kernel benchmarks: environment record, interleaved timing, and the `--smoke` switch.

`--smoke` runs the scripts at tiny sizes on CPU under Triton's interpreter (TRITON_INTERPRET=1 must be set before
Triton is imported, hence `setup_smoke` runs before any kernel import): it checks that every code path of the
script runs and writes its JSON; its times measure the interpreter, not the kernels.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def setup_smoke(argv: list[str] | None = None) -> bool:
    """Sets TRITON_INTERPRET=1 when `--smoke` is among the arguments (before torch/triton are imported)."""
    smoke = "--smoke" in (sys.argv[1:] if argv is None else argv)
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return smoke


def environment(device) -> dict:
    import torch
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "load_average_before": os.getloadavg(),
            "threads": torch.get_num_threads(), "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}


def time_call(fn: Callable[[], object], device) -> float:
    """Seconds of one call (CUDA events on a GPU)."""
    import torch

    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def interleaved(fns: dict[str, Callable[[], object]], device, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Runs A B C ... A B C ... after `warmup` calls of each; returns every round's seconds per name."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_call(fn, device))
    return times


def summarize(times: dict[str, list[float]], baseline: str | None = None) -> dict[str, dict]:
    """Median seconds per name, and the median (min, max) of the per-round ratios name / baseline."""
    out = {}
    for name, ts in times.items():
        entry = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "rounds": len(ts)}
        if baseline is not None and baseline in times and name != baseline:
            ratios = [t / b for t, b in zip(ts, times[baseline])]
            entry[f"ratio_vs_{baseline}"] = {"median": statistics.median(ratios), "min": min(ratios),
                                             "max": max(ratios)}
        out[name] = entry
    return out


def write_json(out_dir: str, name: str, results: dict) -> Path:
    results["environment"]["load_average_after"] = os.getloadavg()
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
    return path
