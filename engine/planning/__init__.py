"""The layout planner: which TP/PP/DP/micro-batch/recompute/FP8 layout to run a model with on a given cluster.

`python -m engine.plan` is the command line (engine/plan.py); docs/cluster.md explains the models and their
validation. Everything here is arithmetic on the model config: no GPU, no process group, no model is built.
"""

import importlib

# Names resolve on first use (PEP 562), so `python -m engine.plan --help` and `engine.planning.hardware` need no
# torch import (layout/memory/timing read the trainer's parallel validation, which imports torch).
_EXPORTS = {
    "GPUS": "hardware", "Calibration": "hardware", "GpuSpec": "hardware", "gpu_spec": "hardware",
    "load_calibration": "hardware", "Layout": "layout", "TrainerSupport": "layout", "enumerate_layouts": "layout",
    "launch_flags": "layout", "padded_model_config": "layout", "MemoryBreakdown": "memory", "RankState": "memory",
    "peak_memory": "memory", "rank_state": "memory", "StepTime": "timing", "step_time": "timing",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"engine.planning.{_EXPORTS[name]}"), name)
