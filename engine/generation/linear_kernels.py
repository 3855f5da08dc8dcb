"""CPU decoding through oneDNN's linear kernel instead of ATen's default (MKL sgemm).

On the 2-core AMD EPYC machine we measure on, fp32 `F.linear` goes to MKL, whose small-M GEMMs are slow there:
with weights streamed from memory, oneDNN's `mkldnn::_linear_pointwise` on the same (unpacked) weights took
135 vs 190 us for a [1, 512] x [512, 1408] product, 223 vs 350 us at 8 rows and 393 vs 698 us at 32 rows (one
thread). It is the kernel inductor's CPU backend calls for linears; the weights are used as they are (no packed
copy, no extra memory), and the result is the same fp32 product up to summation order (~1e-5 relative).

oneDNN costs ~10 us more per call, so small matrices stay on ATen: below `MIN_WEIGHT_ELEMENTS` (2^17, a
256 x 512 matrix) oneDNN was slower (measured crossover between 176 x 64, 5x slower, and 256 x 512, 1.1x faster).

`onednn_linears(model)` routes the forward of every plain `nn.Linear` with a dense fp32 CPU weight of at least that
size through it for the duration of a `with` block (instance-level forwards, restored on exit; modules that
already override their forward, subclasses such as FP8 linears and tensor-parallel DTensor weights are left
alone). Used by `VPiTGenerator` on CPU; not thread-safe against another thread running the same model meanwhile.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn

MIN_WEIGHT_ELEMENTS = 1 << 17


def onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # Inputs of any rank [..., in]; the op flattens the leading dimensions itself.
    return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _eligible(module: nn.Module) -> bool:
    weight = module.weight
    return (type(module) is nn.Linear and "forward" not in module.__dict__ and type(weight) is nn.Parameter
            and weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous()
            and weight.numel() >= MIN_WEIGHT_ELEMENTS)


@contextlib.contextmanager
def onednn_linears(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, eligible linears of `model` run oneDNN's kernel; yields how many were switched."""
    modules = [m for m in model.modules() if isinstance(m, nn.Linear) and _eligible(m)] \
        if enabled and onednn_linear_available() else []
    for module in modules:
        module.forward = types.MethodType(_onednn_forward, module)
    try:
        yield len(modules)
    finally:
        for module in modules:
            module.__dict__.pop("forward", None)
