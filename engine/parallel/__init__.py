"""Tensor, sequence, pipeline and data parallelism applied from outside the single-device model."""

from engine.parallel.config import ParallelConfig, validate_parallel_config
from engine.parallel.mesh import build_device_mesh, describe_mesh

__all__ = ["ParallelConfig", "build_device_mesh", "describe_mesh", "validate_parallel_config"]
