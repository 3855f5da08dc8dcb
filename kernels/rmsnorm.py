"""Fused residual add + RMSNorm in Triton (forward and backward).

`add_rms_norm(x, residual, weight, eps)` returns (y, h) with h = x + residual (the new residual stream, in the
inputs' dtype) and y = weight * h / rms(h), computed in fp32 from the rounded h, as the engine's `RMSNorm` does. One
pass over the rows reads x, residual and weight and writes h, y and the fp32 1/rms of each row (4 bytes a row,
all the backward keeps besides h).

Backward (one pass, several rows per program): with n = h * rstd and dn = dy * weight,
dh = rstd * (dn - n * mean(dn * n)) + dh_out (the gradient reaching h through the residual path), which is also
the gradient of x and of residual; d(weight) = sum over rows of dy * n, reduced per program in fp32 and summed
across programs in torch (deterministic, no atomics).

`add_rms_norm_reference` is the pure-torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from chrysalis_kernels.runtime import INTERPRET, check_tensors, next_power_of_2


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                           eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h) in torch, fp32 math: h = x + residual (rounded to x's dtype), y = weight * h / rms(h)."""
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype), h


@triton.jit
def _add_rms_norm_fwd_kernel(X, R, W, Y, H, RSTD, stride_x, stride_r, stride_y, stride_h, n_rows, n_cols, eps,
                             BLOCK: tl.constexpr, ROWS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    for i in range(ROWS):
        row = tl.program_id(0) * ROWS + i
        if row < n_rows:
            r64 = row.to(tl.int64)
            x = tl.load(X + r64 * stride_x + cols, mask=col_ok, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                res = tl.load(R + r64 * stride_r + cols, mask=col_ok, other=0.0).to(tl.float32)
                h = (x + res).to(H.dtype.element_ty)
                tl.store(H + r64 * stride_h + cols, h, mask=col_ok)
                hf = h.to(tl.float32)
            else:
                hf = x
            rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / n_cols + eps)
            tl.store(RSTD + row, rstd)
            tl.store(Y + r64 * stride_y + cols, (hf * rstd * w).to(Y.dtype.element_ty), mask=col_ok)


@triton.jit
def _add_rms_norm_bwd_kernel(DY, DH_OUT, H, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_dho, stride_h, stride_dx,
                             n_rows, n_cols, BLOCK: tl.constexpr, ROWS: tl.constexpr, HAS_DH_OUT: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ROWS):
        row = tl.program_id(0) * ROWS + i
        if row < n_rows:
            r64 = row.to(tl.int64)
            dy = tl.load(DY + r64 * stride_dy + cols, mask=col_ok, other=0.0).to(tl.float32)
            h = tl.load(H + r64 * stride_h + cols, mask=col_ok, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            n = h * rstd
            dn = dy * w
            dh = rstd * (dn - n * (tl.sum(dn * n, axis=0) / n_cols))
            if HAS_DH_OUT:
                dh += tl.load(DH_OUT + r64 * stride_dho + cols, mask=col_ok, other=0.0).to(tl.float32)
            tl.store(DX + r64 * stride_dx + cols, dh.to(DX.dtype.element_ty), mask=col_ok)
            dw += dy * n
    tl.store(DW_PARTIAL + tl.program_id(0) * n_cols + cols, dw, mask=col_ok)


def _launch_shape(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS per program, num_warps)."""
    block = max(16, next_power_of_2(n_cols))
    if INTERPRET:
        return block, max(1, min(8, n_rows)), 1
    warps = min(16, max(1, block // 256))  # pragma: no cover - GPU
    rows = max(1, min(16, n_rows // (132 * 4)))  # pragma: no cover - GPU: ~4 programs per SM, rows amortise dw
    return block, rows, warps  # pragma: no cover - GPU


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [N, C] with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        shape = x.shape
        x2 = _rows(x)
        r2 = _rows(residual) if residual is not None else None
        n_rows, n_cols = x2.shape
        block, rows, warps = _launch_shape(n_rows, n_cols)
        y = torch.empty_like(x2)
        h = torch.empty_like(x2) if residual is not None else x2
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        _add_rms_norm_fwd_kernel[(triton.cdiv(n_rows, rows),)](
            x2, r2 if r2 is not None else x2, weight, y, h, rstd, x2.stride(0),
            (r2 if r2 is not None else x2).stride(0), y.stride(0), h.stride(0), n_rows, n_cols, eps,
            BLOCK=block, ROWS=rows, HAS_RESIDUAL=residual is not None, num_warps=warps)
        ctx.save_for_backward(h, weight, rstd)
        ctx.has_residual = residual is not None
        ctx.shape = shape
        if residual is None:
            return y.view(shape)
        return y.view(shape), h.view(shape)

    @staticmethod
    def backward(ctx, dy, dh_out=None):
        h, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = h.shape
        block, rows, warps = _launch_shape(n_rows, n_cols)
        dy2 = _rows(dy)
        dho = _rows(dh_out) if dh_out is not None else None
        dx = torch.empty_like(h)
        programs = triton.cdiv(n_rows, rows)
        dw_partial = torch.empty(programs, n_cols, dtype=torch.float32, device=h.device)
        _add_rms_norm_bwd_kernel[(programs,)](
            dy2, dho if dho is not None else dy2, h, weight, rstd, dx, dw_partial, dy2.stride(0),
            (dho if dho is not None else dy2).stride(0), h.stride(0), dx.stride(0), n_rows, n_cols,
            BLOCK=block, ROWS=rows, HAS_DH_OUT=dho is not None, num_warps=warps)
        dw = dw_partial.sum(0).to(weight.dtype)
        dx = dx.view(ctx.shape)
        return dx, (dx if ctx.has_residual else None), dw, None


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float = 1e-5):
    """Fused `h = x + residual; y = weight * h / rms(h)`.

    Args:
        x, residual: [..., C] in one dtype (bf16/fp16/fp32); residual None normalises x alone.
        weight: [C].
    Returns:
        (y, h) with residual, else y; differentiable in x, residual and weight.
    """
    check_tensors("chrysalis_kernels.rmsnorm", x, residual, weight)
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},)")
    return _AddRMSNorm.apply(x, residual, weight.contiguous(), eps)  # the kernels read weight with unit stride


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Fused RMSNorm without a residual: weight * x / rms(x)."""
    return add_rms_norm(x, None, weight, eps)
