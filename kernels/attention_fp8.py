"""FP8 (e4m3) packed-document attention forward with per-block scaling, and a 16-bit backward.

Scaling recipe (FlashAttention-3's FP8 path, with finer scales):

- Q, K and V are quantized per (batch, head, block of `block` tokens; 128 by default): for each block,
  scale = max(amax(|x_block|), 1e-12) / 448 (448 = e4m3's largest finite value) and x8 = e4m3(x / scale), so
  every block uses the full e4m3 range and one outlier token only coarsens its own block.
- S = Q K^T is one FP8 MMA with fp32 accumulation; the Q and K scales are applied to the fp32 scores as a row and a
  column vector (scale_q[i] * scale_k[j] * softmax_scale), so the K/Q scale blocks need not match the tiles.
- The online softmax runs in fp32 as in the 16-bit kernel. P (in [0, 1] after subtracting the running row max)
  is cast to e4m3 without a scale, as FlashAttention-3 does, and P V is an FP8 MMA with fp32 accumulation; the V
  scale of the tile's block multiplies the fp32 result (a key tile never straddles two V scale blocks: the tile
  size divides `block`). V is stored transposed ([B, H, D, S], tokens contiguous) because Hopper's FP8 MMA reads
  its B operand K-major.
- The row sum l uses the fp32 P; the output and the log-sum-exp are written as in the 16-bit kernel.

Backward: the straight-through estimator. The gradients are those of 16-bit attention at the saved 16-bit
Q, K, V (`chrysalis_kernels.attention`'s backward kernels), with P recomputed from the FP8 forward's saved
log-sum-exp and D = rowsum(dO * O) from its output: no second forward pass. Because the forward's statistics are
the FP8 ones, the gradients carry the forward's quantization error (tests: <= 6e-2 relative).

`attention_fp8_reference` simulates the same quantization in torch (fp32 math on the dequantized values).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from chrysalis_kernels.attention import (
    _INTERPRET_TILES,
    LOG2E,
    DocumentBounds,
    _check_inputs,
    _query_block_ranges,
    _strides,
    attention_backward,
    attention_reference,
    autocast_inputs,
    document_bounds,
)
from chrysalis_kernels.runtime import INTERPRET, next_power_of_2

E4M3_MAX = 448.0
DEFAULT_BLOCK = 128


# ------------------------------------------------------------------------------------------------ quantization
def quantize_blocks(x: torch.Tensor, block: int, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(batch, head, token block) e4m3 quantization of x [B, H, S, D].

    Returns (x8 viewed as [B, H, S, D] in float8_e4m3fn, scales [B, H, ceil(S / block)] fp32) with
    x ~= x8 * scale[token // block]. With `transpose`, x8's storage is [B, H, D, S] (tokens contiguous).
    """
    b, h, s, d = x.shape
    nblocks = -(-s // block)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, nblocks * block - s))  # [B, H, nb * block, D]
    amax = padded.reshape(b, h, nblocks, block * d).abs().amax(dim=-1)  # [B, H, nb]
    scales = amax.clamp_min(1e-12) / E4M3_MAX
    per_token = scales.repeat_interleave(block, dim=2)[:, :, :s, None]  # [B, H, S, 1]
    scaled = (x.float() / per_token).clamp(-E4M3_MAX, E4M3_MAX)
    if transpose:
        x8 = scaled.transpose(2, 3).contiguous().to(torch.float8_e4m3fn).transpose(2, 3)
    else:
        x8 = scaled.to(torch.float8_e4m3fn)
    return x8, scales.contiguous()


def dequantize_blocks(x8: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    s = x8.shape[2]
    return x8.float() * scales.repeat_interleave(block, dim=2)[:, :, :s, None]


def attention_fp8_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor | None = None,
                            *, softmax_scale: float | None = None, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """The FP8 recipe simulated in torch: Q, K, V quantized per block, then fp32 attention (P is not quantized)."""
    deq = [dequantize_blocks(*quantize_blocks(t, block), block) for t in (q, k, v)]
    return attention_reference(*deq, document_ids, softmax_scale=softmax_scale).to(q.dtype)


# ------------------------------------------------------------------------------------------------ kernel
@triton.jit
def _round_to_e4m3(x):
    """Rounds x in [0, 448] to the nearest e4m3 value in fp32 (3 mantissa bits; subnormal step 2^-9).

    Interpreter only: Triton 3.9's interpreter converts fp32 -> fp8 with round-to-nearest but drops the carry
    when the mantissa rounds up (1.97 -> 1.0 instead of 2.0), so it is given exactly representable values.
    """
    exponent = tl.floor(tl.math.log2(tl.maximum(x, 0.015625)))  # 2^-6: e4m3's smallest normal
    ulp = tl.math.exp2(exponent - 3.0)
    return tl.floor(x / ulp + 0.5) * ulp


@triton.jit
def _fp8_fwd_inner(acc, l_i, m_i, q8, row_scale, k_base, v_base, ks_base, vs_base, stride_ks, stride_kd, stride_vs,
                   stride_vd, offs_m, q_doc_start, start, end, S, QUANT_BLOCK,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                   EVEN_D: tl.constexpr, ROUND_FIRST: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in tl.range(start, end, BLOCK_N):
        cols = start_n + offs_n
        tile = tl.cast(start_n, tl.int64)  # token offsets in int64 (see attention.py)
        kt_ptrs = k_base + tile * stride_ks + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd  # [D, BLOCK_N]
        v_ptrs = v_base + tile * stride_vs + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd  # [BLOCK_N, D]
        if MASK:
            kt = tl.load(kt_ptrs, mask=(cols[None, :] < S) & (offs_d[:, None] < HEAD_DIM), other=0.0)
            v = tl.load(v_ptrs, mask=(cols[:, None] < S) & (offs_d[None, :] < HEAD_DIM), other=0.0)
            k_scale = tl.load(ks_base + cols // QUANT_BLOCK, mask=cols < S, other=0.0)
        else:
            if EVEN_D:
                kt = tl.load(kt_ptrs)
                v = tl.load(v_ptrs)
            else:
                kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
                v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            k_scale = tl.load(ks_base + cols // QUANT_BLOCK)
        v_scale = tl.load(vs_base + start_n // QUANT_BLOCK)
        # FP8 MMA, fp32 accumulation; the per-block scales become a row and a column factor (log2 domain).
        qk = tl.dot(q8, kt) * row_scale[:, None] * k_scale[None, :]
        if MASK:
            visible = (cols[None, :] <= offs_m[:, None]) & (cols[None, :] >= q_doc_start[:, None])
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        # P in [0, 1] times 2^8 (exact) leaves e4m3's subnormal range (< 2^-6) for probabilities down to 2^-14.
        p = p * 256.0
        if ROUND_FIRST:
            p = _round_to_e4m3(p)
        p8 = p.to(v.dtype)
        acc = acc * alpha[:, None] + tl.dot(p8, v) * (v_scale * 0.00390625)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fp8_fwd_kernel(Q, K, V, QS, KS, VS, O, LSE, DOC_START,
                         stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                         stride_vb, stride_vh, stride_vs, stride_vd, stride_ob, stride_oh, stride_os, stride_od,
                         S, HQ, HKV, GROUP, NUM_QUANT_BLOCKS, QUANT_BLOCK, qk_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         EVEN_D: tl.constexpr, ROUND_FIRST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = (pid_bh % HQ).to(tl.int64)
    hk = h // GROUP
    m_start = pid_m * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < S
    io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows = tl.arange(0, BLOCK_M)[:, None]
    tile = tl.cast(m_start, tl.int64)
    q8 = tl.load(Q + b * stride_qb + h * stride_qh + tile * stride_qs + rows * stride_qs + offs_d[None, :] * stride_qd,
                 mask=io_mask, other=0.0)
    q_scale = tl.load(QS + pid_bh.to(tl.int64) * NUM_QUANT_BLOCKS + offs_m // QUANT_BLOCK, mask=row_ok, other=0.0)
    row_scale = q_scale * qk_scale
    ds_row = DOC_START + b * S
    q_doc_start = tl.load(ds_row + offs_m, mask=row_ok, other=S)
    lo, full_lo, full_hi, hi = _query_block_ranges(ds_row, m_start, S, BLOCK_M, BLOCK_N)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kv_head = b * HKV + hk
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    ks_base = KS + kv_head * NUM_QUANT_BLOCKS
    vs_base = VS + kv_head * NUM_QUANT_BLOCKS
    acc, l_i, m_i = _fp8_fwd_inner(acc, l_i, m_i, q8, row_scale, k_base, v_base, ks_base, vs_base, stride_ks,
                                   stride_kd, stride_vs, stride_vd, offs_m, q_doc_start, lo, full_lo, S, QUANT_BLOCK,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, True, EVEN_D, ROUND_FIRST)
    acc, l_i, m_i = _fp8_fwd_inner(acc, l_i, m_i, q8, row_scale, k_base, v_base, ks_base, vs_base, stride_ks,
                                   stride_kd, stride_vs, stride_vd, offs_m, q_doc_start, full_lo, full_hi, S,
                                   QUANT_BLOCK, HEAD_DIM, BLOCK_D, BLOCK_N, False, EVEN_D, ROUND_FIRST)
    acc, l_i, m_i = _fp8_fwd_inner(acc, l_i, m_i, q8, row_scale, k_base, v_base, ks_base, vs_base, stride_ks,
                                   stride_kd, stride_vs, stride_vd, offs_m, q_doc_start, full_hi, hi, S, QUANT_BLOCK,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, True, EVEN_D, ROUND_FIRST)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + tile * stride_os + rows * stride_os + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=io_mask)
    tl.store(LSE + pid_bh.to(tl.int64) * S + offs_m, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, mask=row_ok)


# ------------------------------------------------------------------------------------------------ host side
# An FP8 tl.dot needs a reduction dimension of at least 32 on NVIDIA GPUs (Triton's `min_dot_size`: the kernel
# does not compile otherwise). Both FP8 MMAs reduce over one of these: S = Q8 K8^T over the head dim (BLOCK_D), and
# P8 V8 over the key tile (BLOCK_N), which must also divide the scale block. Hence BLOCK_D >= 32 (head dims <= 32
# are zero-padded in the tile) and scale blocks >= 32 tokens, under the interpreter too, so that what the CPU tests
# accept is what a GPU compiles.
MIN_FP8_DOT_K = 32


def _tiles(block: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_N >= 32 divides the (power-of-two) quantization block."""
    if INTERPRET:
        return _INTERPRET_TILES["BLOCK_M"], min(max(MIN_FP8_DOT_K, _INTERPRET_TILES["BLOCK_N"]), block), 1, 1
    block_n = min(128, block)  # pragma: no cover - GPU
    return 128, block_n, 8, 3  # pragma: no cover - GPU


def _head_block(d: int) -> int:
    """BLOCK_D: the head dim padded to a power of two, at least the FP8 MMA's minimum reduction size."""
    return max(MIN_FP8_DOT_K, next_power_of_2(d))


def attention_fp8_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: DocumentBounds,
                          sm_scale: float, block: int = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw FP8 forward: (out [B, Hq, S, D] in q's dtype, lse [B, Hq, S] fp32)."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    if block < MIN_FP8_DOT_K or block & (block - 1):
        raise ValueError(f"the FP8 scale block must be a power of two >= {MIN_FP8_DOT_K} tokens (a key tile divides "
                         f"it, and FP8 MMAs reduce over at least {MIN_FP8_DOT_K}), got {block}")
    block_m, block_n, warps, stages = _tiles(block)
    q8, qs = quantize_blocks(q, block)
    k8, ks = quantize_blocks(k, block)
    v8, vs = quantize_blocks(v, block, transpose=True)
    block_d = _head_block(d)
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, s, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(s, block_m), b * hq)
    _attn_fp8_fwd_kernel[grid](q8, k8, v8, qs, ks, vs, out, lse, bounds.start, *_strides(q8), *_strides(k8),
                               *_strides(v8), *_strides(out), s, hq, hkv, hq // hkv, qs.shape[-1], block,
                               sm_scale * LOG2E, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
                               EVEN_D=block_d == d, ROUND_FIRST=INTERPRET, num_warps=warps,
                               num_stages=stages)
    return out, lse


class _DocumentAttentionFP8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_start, doc_end, sm_scale, block):
        out, lse = attention_fp8_forward(q, k, v, DocumentBounds(doc_start, doc_end), sm_scale, block)
        ctx.save_for_backward(q, k, v, out, lse, doc_start, doc_end)
        ctx.sm_scale = sm_scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, doc_start, doc_end = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, DocumentBounds(doc_start, doc_end), ctx.sm_scale)
        return dq, dk, dv, None, None, None, None


def attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor | None = None, *,
                  cu_seqlens: torch.Tensor | None = None, bounds: DocumentBounds | None = None,
                  softmax_scale: float | None = None, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Document-causal attention with an FP8 e4m3 forward and a 16-bit backward.

    Same arguments and layouts as `chrysalis_kernels.attention.attention`: q/k/v in bf16 or fp16 (fp32 is accepted,
    for CPU test runs of fp32 models) are quantized here, the output and the backward are in their dtype; `block`
    is the scaling block in tokens (a power of two >= 32).
    """
    thd = q.dim() == 3
    if thd:
        if cu_seqlens is None and bounds is None:
            raise ValueError("[T, H, D] inputs need cu_seqlens (or bounds)")
        q, k, v = (t.permute(1, 0, 2).unsqueeze(0) for t in (q, k, v))  # [T, H, D] -> [1, H, T, D]
    b, _, s, d = q.shape
    if bounds is None:
        bounds = document_bounds(document_ids, cu_seqlens=cu_seqlens, batch=b, seq_len=s, device=q.device)
    q, k, v = autocast_inputs(q, k, v)
    _check_inputs(q, k, v, bounds)
    if q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 9):
        raise RuntimeError("attention_fp8 needs FP8 tensor cores (compute capability >= 8.9: Ada, Hopper or newer); "
                           "use --attention-backend triton on this GPU")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    out, _ = _DocumentAttentionFP8.apply(q, k, v, bounds.start, bounds.end, scale, block)
    return out.squeeze(0).permute(1, 0, 2) if thd else out
