"""Where the Triton kernels run: on a CUDA GPU (compiled), or on CPU under Triton's interpreter.

Triton decides at decoration time (`@triton.jit`) whether a kernel is compiled or interpreted, from the
`TRITON_INTERPRET` environment variable, so the choice is fixed when a kernel module is first imported:
set `TRITON_INTERPRET=1` before importing `chrysalis_kernels.<module>` to run the kernels on CPU tensors (slow,
exact; this is how CI checks them). Every public entry point calls `check_tensors` so that a CPU tensor given to
a compiled kernel fails with an error that says what to do, instead of a segfault or a pointer error.
"""

from __future__ import annotations

import os

import torch
import triton.language as tl

# Read once, like triton.jit does when the kernel modules are imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def check_tensors(name: str, *tensors: torch.Tensor) -> None:
    """Raises a clear error when `tensors` are not on a device these kernels can use."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{name}: tensors are on different devices {sorted(map(str, devices))}")
    device = next(iter(devices))
    if device.type == "cuda":
        if INTERPRET:
            raise RuntimeError(f"{name}: chrysalis_kernels was imported with TRITON_INTERPRET=1 (CPU interpreter) but "
                               "got CUDA tensors; unset TRITON_INTERPRET to compile the kernels for the GPU")
        return
    if device.type == "cpu" and INTERPRET:
        return
    raise RuntimeError(f"{name}: Triton kernels need CUDA tensors (got {device}); for CPU, set TRITON_INTERPRET=1 "
                       "before importing chrysalis_kernels (Triton's interpreter: exact but slow, meant for tests)")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
              torch.float8_e4m3fn: tl.float8e4nv}


def dot_config(dtype: torch.dtype) -> dict:
    """The `DOT` (operand dtype) and `PRECISION` constexprs for `tl.dot(a.to(DOT), b.to(DOT), acc,
    input_precision=PRECISION)` on operands of `dtype` (the cast is a no-op when DOT is the operands' dtype).

    fp32 operands are multiplied exactly ("ieee"), not in TF32, so an fp32 run is a reference-quality run;
    16-bit and FP8 operands use the tensor cores as they are. Under the interpreter, bf16 operands are upcast to
    fp32: Triton 3.9's interpreter stores bf16 as raw uint16 and its `tl.dot` multiplies those bit patterns
    (garbage), so it multiplies the (exactly representable) bf16 values in fp32 instead, which is what a GPU's
    bf16 MMA computes: exact products, fp32 accumulation.
    """
    if dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16):
        return {"DOT": tl.float32, "PRECISION": "ieee"}
    return {"DOT": _TL_DTYPES[dtype], "PRECISION": "tf32"}
