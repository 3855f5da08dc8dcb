"""Accelerator and interconnect figures the layout planner uses.

Peak rates are vendor datasheet figures (dense, no sparsity). Bandwidths are *effective* bus bandwidths of NCCL
collectives (what nccl-tests reports as busbw), which sit below the link rates; the defaults are assumptions, not
measurements of ours: replace them with your cluster's nccl-tests figures (`--intra-node-bw`, `--inter-node-bw`).
`efficiency` (the fraction of peak that the model's FLOPs run at, all non-matmul work folded in) is the planner's one
calibrated constant: `benchmarks/plan_gpu_validation.py` measures it on one GPU and writes a calibration file for
`--calibration`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

GiB = 2**30


@dataclass(frozen=True, kw_only=True)
class GpuSpec:
    """Args:
        memory_gib: usable device memory (`torch.cuda.get_device_properties(0).total_memory`).
        bf16_tflops / fp8_tflops / fp32_tflops: dense peak matmul rates; fp8 None = no FP8 tensor cores;
            fp32 is the non-tensor-core rate (torch's default for fp32 matmuls, TF32 off).
        hbm_tbs: memory bandwidth (optimizer step, a memory-bound pass over the states).
        intra_node_gbs / inter_node_gbs: effective collective bandwidth per GPU inside a node (NVLink/NVSwitch)
            and across nodes (one NIC per GPU).
    """

    name: str
    memory_gib: float
    bf16_tflops: float
    fp8_tflops: float | None
    fp32_tflops: float
    hbm_tbs: float
    intra_node_gbs: float
    inter_node_gbs: float
    gpus_per_node: int = 8


GPUS: dict[str, GpuSpec] = {
    # NVLink4 450 GB/s per direction, 8 x 400 Gb/s ConnectX-7 per node.
    "h100-80gb": GpuSpec(name="h100-80gb", memory_gib=79.6, bf16_tflops=989.0, fp8_tflops=1979.0, fp32_tflops=67.0,
                         hbm_tbs=3.35, intra_node_gbs=360.0, inter_node_gbs=40.0),
    "h200-141gb": GpuSpec(name="h200-141gb", memory_gib=139.8, bf16_tflops=989.0, fp8_tflops=1979.0,
                          fp32_tflops=67.0, hbm_tbs=4.8, intra_node_gbs=360.0, inter_node_gbs=40.0),
    # NVLink3 300 GB/s per direction, 8 x 200 Gb/s HDR per node.
    "a100-80gb": GpuSpec(name="a100-80gb", memory_gib=79.2, bf16_tflops=312.0, fp8_tflops=None, fp32_tflops=19.5,
                         hbm_tbs=2.0, intra_node_gbs=230.0, inter_node_gbs=20.0),
    "a100-40gb": GpuSpec(name="a100-40gb", memory_gib=39.4, bf16_tflops=312.0, fp8_tflops=None, fp32_tflops=19.5,
                         hbm_tbs=1.55, intra_node_gbs=230.0, inter_node_gbs=20.0),
    # NVLink5 900 GB/s per direction, 8 x 400 Gb/s per node.
    "b200-180gb": GpuSpec(name="b200-180gb", memory_gib=178.0, bf16_tflops=2250.0, fp8_tflops=4500.0,
                          fp32_tflops=75.0, hbm_tbs=8.0, intra_node_gbs=720.0, inter_node_gbs=40.0),
}

# Fraction of peak the model's FLOPs reach when nothing was measured (an assumption: typical dense-LLaMA MFU of
# well-tuned bf16 training on H100-class GPUs is 0.35-0.5). FP8 GEMMs reach a lower fraction of their (2x) peak
# because of the scaling/cast kernels around them.
DEFAULT_EFFICIENCY = 0.40
DEFAULT_FP8_RELATIVE_EFFICIENCY = 0.6
# Collective latency per call (ring start-up, kernel launch); matters only for tiny messages.
COLLECTIVE_LATENCY_S = 20e-6


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Args:
        efficiency: achieved fraction of `bf16_tflops` for the model's FLOPs (measured: see module docstring).
        source: where the figure comes from ("assumed" when it is the default).
        fixed_overhead_gib: memory a process holds beyond tensors (CUDA context, NCCL and cuBLAS workspaces).
        fragmentation: extra fraction of the activation memory lost to allocator fragmentation.
    """

    efficiency: float = DEFAULT_EFFICIENCY
    fp8_relative_efficiency: float = DEFAULT_FP8_RELATIVE_EFFICIENCY
    source: str = "assumed"
    fixed_overhead_gib: float = 2.0
    fragmentation: float = 0.10


def load_calibration(path: str | Path) -> Calibration:
    """A calibration file written by benchmarks/plan_gpu_validation.py (JSON)."""
    data = json.loads(Path(path).read_text())
    known = {"efficiency", "fp8_relative_efficiency", "fixed_overhead_gib", "fragmentation"}
    values = {k: float(v) for k, v in data.items() if k in known}
    if "efficiency" not in values or not 0 < values["efficiency"] <= 1:
        raise ValueError(f"{path}: needs an 'efficiency' in (0, 1]")
    return Calibration(**values, source=str(data.get("source", path)))


def gpu_spec(name: str, *, intra_node_gbs: float | None = None, inter_node_gbs: float | None = None,
             gpus_per_node: int | None = None, memory_gib: float | None = None) -> GpuSpec:
    if name not in GPUS:
        raise ValueError(f"unknown --gpu {name!r}; choose one of {', '.join(GPUS)}")
    spec = GPUS[name]
    given = {"intra_node_gbs": intra_node_gbs, "inter_node_gbs": inter_node_gbs, "gpus_per_node": gpus_per_node,
             "memory_gib": memory_gib}
    changes = {k: v for k, v in given.items() if v is not None}
    return replace(spec, **changes)
