"""The layout planner: which TP/PP/DP/micro-batch/recompute/FP8 layout to run a model with on a given cluster.

`python -m engine.plan` is the command line (engine/plan.py); docs/cluster.md explains the models and their
validation. Everything here is arithmetic on the model config: no GPU, no process group, no model is built.
"""

from engine.planning.hardware import GPUS, Calibration, GpuSpec, gpu_spec, load_calibration
from engine.planning.layout import Layout, TrainerSupport, enumerate_layouts, launch_flags, padded_model_config
from engine.planning.memory import MemoryBreakdown, RankState, peak_memory, rank_state
from engine.planning.timing import StepTime, step_time

__all__ = ["GPUS", "Calibration", "GpuSpec", "Layout", "MemoryBreakdown", "RankState", "StepTime", "TrainerSupport",
           "enumerate_layouts", "gpu_spec", "launch_flags", "load_calibration", "padded_model_config", "peak_memory",
           "rank_state", "step_time"]
