"""Fused continuous-token head loss: Linear -> GELU -> Linear -> (1 - cosine) on the rows with visual targets.

`visual_head_loss_sum(x, targets, fc1_weight, fc1_bias, fc2_weight, fc2_bias)` returns sum over rows of
1 - cos(head(x_row), target_row) in fp32, for x [M, H] holding only the hidden states that predict a visual token
(the caller gathers them: prompt tokens never reach the head) and SigLIP targets [M, 1152].

What is fused, and what is not:
- The two GEMMs are cuBLAS (`torch.mm`): a Triton GEMM would not beat it at these shapes.
- Triton kernels fuse the elementwise work around them: bias + exact-erf GELU in one pass (in place), and the
  fc2 bias + cosine loss + its per-row statistics in one pass; in the backward, the cosine gradient (bias added on
  the fly) in one pass and the GELU derivative applied to dA in place.
- Nothing of size [M, H] or [M, 1152] is saved for the backward: only x (the input), the weights and three fp32
  numbers per row. The backward recomputes z = x W1^T, a = gelu(z + b1), y = a W2^T (two GEMMs) instead of
  keeping z, a and y (an unfused autograd graph keeps all three plus the cosine's inputs: ~3H + 2 x 1152 values a
  row). That is the trade: +2 GEMMs (the head's forward again) for that activation memory.

Mixed precision: under `torch.autocast` the GEMMs run in the autocast dtype (weights cast once per call) with fp32
accumulation; the GELU, the norms and the cosine are fp32; weight gradients are returned in the weights' dtype.
Zero rows give an exact 0 loss and zero gradients (the parameters still get a gradient, as DDP needs).

`visual_head_loss_reference` is the pure-torch reference (the engine's ContinuousTokenHead + cosine loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from chrysalis_kernels.runtime import INTERPRET, check_tensors, next_power_of_2


def visual_head_loss_reference(x: torch.Tensor, targets: torch.Tensor, fc1_weight: torch.Tensor,
                               fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor | None,
                               eps: float = 1e-8) -> torch.Tensor:
    """sum(1 - cos(fc2(gelu(fc1(x))), targets)) in torch."""
    predicted = F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
    cos = F.cosine_similarity(predicted.float(), targets.detach().float(), dim=-1, eps=eps)
    return (1.0 - cos).sum()


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _bias_gelu_kernel(Z, B, OUT, stride_z, stride_o, n_rows, n_cols, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK: tl.constexpr):
    """OUT = gelu(Z + B) (exact erf GELU), BLOCK_R rows per program (OUT may be Z)."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < n_rows
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = row_ok[:, None] & (cols[None, :] < n_cols)
        z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
        a = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
        tl.store(OUT + rows[:, None] * stride_o + cols[None, :], a.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _gelu_grad_kernel(DA, Z, B, stride_da, stride_z, n_rows, n_cols, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK: tl.constexpr):
    """DA *= gelu'(Z + B), in place."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < n_rows
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = row_ok[:, None] & (cols[None, :] < n_cols)
        z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        ptr = DA + rows[:, None] * stride_da + cols[None, :]
        da = tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
        tl.store(ptr, (da * (cdf + z * pdf)).to(DA.dtype.element_ty), mask=ok)


@triton.jit
def _cosine_loss_kernel(Y, B, T, LOSS, STATS, stride_y, stride_t, n_rows, n_cols, eps, HAS_BIAS: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """Per row: y = Y + B; stats = (y.t, |y|^2, |t|^2); loss = 1 - y.t / (max(|y|, eps) max(|t|, eps))."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < n_rows
    dot = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32)
    yy = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32)
    tt = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = row_ok[:, None] & (cols[None, :] < n_cols)
        y = tl.load(Y + rows[:, None] * stride_y + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.where(ok, tl.load(B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :], 0.0)
        t = tl.load(T + rows[:, None] * stride_t + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dot += y * t
        yy += y * y
        tt += t * t
    dot_s = tl.sum(dot, axis=1)
    yy_s = tl.sum(yy, axis=1)
    tt_s = tl.sum(tt, axis=1)
    denom = tl.maximum(tl.sqrt(yy_s), eps) * tl.maximum(tl.sqrt(tt_s), eps)
    tl.store(LOSS + rows, 1.0 - dot_s / denom, mask=row_ok)
    tl.store(STATS + rows * 3, dot_s, mask=row_ok)
    tl.store(STATS + rows * 3 + 1, yy_s, mask=row_ok)
    tl.store(STATS + rows * 3 + 2, tt_s, mask=row_ok)


@triton.jit
def _cosine_grad_kernel(Y, B, T, STATS, GRAD_OUT, DY, stride_y, stride_t, stride_dy, n_rows, n_cols, eps,
                        HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """DY = grad_out * d(1 - cos)/dy = -grad_out * (t / (ny nt) - [|y| > eps] cos y / |y|^2)."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < n_rows
    dot = tl.load(STATS + rows * 3, mask=row_ok, other=0.0)
    yy = tl.load(STATS + rows * 3 + 1, mask=row_ok, other=1.0)
    tt = tl.load(STATS + rows * 3 + 2, mask=row_ok, other=1.0)
    denom = tl.maximum(tl.sqrt(yy), eps) * tl.maximum(tl.sqrt(tt), eps)
    cos = dot / denom
    y_term = tl.where(tl.sqrt(yy) > eps, cos / tl.maximum(yy, 1e-30), 0.0)
    scale = -tl.load(GRAD_OUT).to(tl.float32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = row_ok[:, None] & (cols[None, :] < n_cols)
        y = tl.load(Y + rows[:, None] * stride_y + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
        t = tl.load(T + rows[:, None] * stride_t + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dy = scale * (t / denom[:, None] - y_term[:, None] * y)
        tl.store(DY + rows[:, None] * stride_dy + cols[None, :], dy.to(DY.dtype.element_ty), mask=ok)


# ------------------------------------------------------------------------------------------------ host side
def _block(n_cols: int) -> int:
    return min(1024 if not INTERPRET else 2048, max(16, next_power_of_2(n_cols)))


# Rows per program: two on a GPU; 16 under the interpreter, whose cost is per operation, not per element.
_BLOCK_R = 16 if INTERPRET else 2


def _grid(rows: int) -> tuple[int]:
    return (triton.cdiv(rows, _BLOCK_R),)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _bias_gelu_(z: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    if z.shape[0]:
        _bias_gelu_kernel[_grid(z.shape[0])](z, bias if bias is not None else z, out, z.stride(0), out.stride(0),
                                             z.shape[0], z.shape[1], HAS_BIAS=bias is not None, BLOCK_R=_BLOCK_R,
                                             BLOCK=_block(z.shape[1]))
    return out


class _VisualHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, targets, w1, b1, w2, b2, eps):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc, w1c, w2c = x.to(dtype), w1.to(dtype), w2.to(dtype)
            m = x.shape[0]
            a = xc @ w1c.t()  # [M, H]: z, then gelu(z + b1) in place
            _bias_gelu_(a, b1, a)
            y = a @ w2c.t()  # [M, Dv] without bias (added in the cosine kernel)
            del a
            loss_rows = torch.empty(m, dtype=torch.float32, device=x.device)
            stats = torch.empty(m, 3, dtype=torch.float32, device=x.device)
            if m:
                _cosine_loss_kernel[_grid(m)](y, b2 if b2 is not None else y, targets, loss_rows, stats,
                                              y.stride(0), targets.stride(0), m, y.shape[1], eps,
                                              HAS_BIAS=b2 is not None, BLOCK_R=_BLOCK_R, BLOCK=_block(y.shape[1]))
        ctx.save_for_backward(x, targets, w1, b1, w2, b2, stats)
        ctx.eps, ctx.dtype = eps, dtype
        return loss_rows.sum()

    @staticmethod
    def backward(ctx, grad_out):
        x, targets, w1, b1, w2, b2, stats = ctx.saved_tensors
        dtype, eps = ctx.dtype, ctx.eps
        m = x.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            xc, w1c, w2c = x.to(dtype), w1.to(dtype), w2.to(dtype)
            # Recompute: z = x W1^T, a = gelu(z + b1), y = a W2^T (the forward kept none of them).
            z = xc @ w1c.t()
            a = _bias_gelu_(z, b1, torch.empty_like(z))
            y = a @ w2c.t()
            dy = torch.empty_like(y)
            if m:
                grad = grad_out.detach().float().reshape(1).contiguous()
                _cosine_grad_kernel[_grid(m)](y, b2 if b2 is not None else y, targets, stats, grad, dy,
                                              y.stride(0), targets.stride(0), dy.stride(0), m, y.shape[1], eps,
                                              HAS_BIAS=b2 is not None, BLOCK_R=_BLOCK_R, BLOCK=_block(y.shape[1]))
            del y
            need_x, _, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
            dw2 = (dy.t() @ a).to(w2.dtype) if need_w2 else None
            db2 = dy.float().sum(0).to(b2.dtype) if need_b2 else None
            del a
            dx = dw1 = db1 = None
            if need_x or need_w1 or need_b1:
                da = dy @ w2c  # [M, H]
                if m:
                    _gelu_grad_kernel[_grid(m)](da, z, b1 if b1 is not None else z, da.stride(0), z.stride(0), m,
                                                z.shape[1], HAS_BIAS=b1 is not None, BLOCK_R=_BLOCK_R,
                                                BLOCK=_block(z.shape[1]))
                dw1 = (da.t() @ xc).to(w1.dtype) if need_w1 else None
                db1 = da.float().sum(0).to(b1.dtype) if need_b1 else None
                dx = (da @ w1c).to(x.dtype) if need_x else None
        return dx, None, dw1, db1, dw2, db2, None


def visual_head_loss_sum(x: torch.Tensor, targets: torch.Tensor, fc1_weight: torch.Tensor,
                         fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor | None,
                         eps: float = 1e-8) -> torch.Tensor:
    """sum over rows of 1 - cos(fc2(gelu(fc1(x))), targets), fp32 scalar; targets get no gradient.

    Args:
        x: [M, H] hidden states of the rows that predict a visual token (M may be 0).
        targets: [M, Dv] SigLIP tokens (any float dtype).
        fc1_weight [H1, H], fc1_bias [H1] | None, fc2_weight [Dv, H1], fc2_bias [Dv] | None: the head's Linears.
    """
    check_tensors("chrysalis_kernels.visual_head_loss", x, targets, fc1_weight, fc2_weight)
    if x.dim() != 2 or targets.dim() != 2 or targets.shape[0] != x.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and targets {tuple(targets.shape)} must be [M, H] and [M, Dv]")
    if fc1_weight.shape[1] != x.shape[1] or fc2_weight.shape != (targets.shape[1], fc1_weight.shape[0]):
        raise ValueError(f"head weights {tuple(fc1_weight.shape)}, {tuple(fc2_weight.shape)} do not map "
                         f"{x.shape[1]} -> {targets.shape[1]}")
    targets = targets.detach()
    if targets.stride(-1) != 1:
        targets = targets.contiguous()
    # The kernels read the biases with unit stride (a no-op for nn.Linear's own biases).
    fc1_bias, fc2_bias = (b.contiguous() if b is not None else None for b in (fc1_bias, fc2_bias))
    return _VisualHeadLoss.apply(x, targets, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps)
