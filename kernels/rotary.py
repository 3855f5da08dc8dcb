"""Fused rotary position embedding for Q and K in Triton, with positions that restart at each packed document.

`apply_rotary(q, k, inv_freq, position_ids=... | document_ids=... | cu_seqlens=...)` rotates q [B, S, Hq, D] and
k [B, S, Hkv, D] (or THD [T, H, D]) in one launch: one program per token computes cos/sin of
`position * inv_freq` in fp32 from the position alone (no [B, S, D] cos/sin tables are read or stored), and
rotates every query and key head of that token in the Hugging Face rotate-half layout
(out[:D/2] = x1 cos - x2 sin, out[D/2:] = x2 cos + x1 sin). Positions come from `position_ids`, or are derived
in-kernel as `token index - document start` from document ids / cu_seqlens, so they restart at every document.
`inv_freq` is the engine's (Llama-3.1 scaling included, `engine.model.llama.rope_inverse_frequencies`).

Backward: the same kernel rotating the output gradients by -angle (the transpose of a rotation).

`apply_rotary_reference` is the pure-torch (fp32) reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from chrysalis_kernels.runtime import check_tensors, next_power_of_2


def positions_from_documents(document_ids: torch.Tensor | None = None, *, cu_seqlens: torch.Tensor | None = None,
                             tokens: int | None = None) -> torch.Tensor:
    """[B, S] (or [T] with cu_seqlens) position of each token within its document (a run of equal ids)."""
    from chrysalis_kernels.attention import document_bounds

    if document_ids is not None:
        start = document_bounds(document_ids).start
        return torch.arange(document_ids.shape[1], device=document_ids.device)[None] - start
    bounds = document_bounds(cu_seqlens=cu_seqlens, seq_len=tokens)
    return (torch.arange(bounds.start.shape[1], device=cu_seqlens.device)[None] - bounds.start)[0]


def apply_rotary_reference(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D] (or [T, H, D] with position_ids [T]) rotated in fp32, returned in x's dtype."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # [.., D/2]
    cos, sin = freqs.cos()[..., None, :], freqs.sin()[..., None, :]  # [.., 1, D/2]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


@triton.jit
def _rotate_heads(X, OUT, x_base, out_base, stride_h, stride_oh, n_heads, cos, sin,
                  HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    for h0 in range(0, n_heads, BLOCK_H):
        hh = h0 + heads
        mask = (hh[:, None] < n_heads) & (d[None, :] < HALF)
        ptr = x_base + hh[:, None] * stride_h + d[None, :]
        x1 = tl.load(X + ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        optr = out_base + hh[:, None] * stride_oh + d[None, :]
        tl.store(OUT + optr, (x1 * cos[None, :] - x2 * sin[None, :]).to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + optr + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(Q, K, QO, KO, POS, DOC_START, INV_FREQ, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks,
                   stride_kh, stride_qob, stride_qos, stride_qoh, stride_kob, stride_kos, stride_koh, S, HQ, HKV,
                   sign, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                   FROM_DOCUMENTS: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    b = token // S
    s = token % S
    if FROM_DOCUMENTS:
        pos = (s - tl.load(DOC_START + token)).to(tl.float32)
    else:
        pos = tl.load(POS + token).to(tl.float32)
    d = tl.arange(0, BLOCK_HALF)
    angle = pos * tl.load(INV_FREQ + d, mask=d < HALF, other=0.0)
    cos = tl.cos(angle)
    sin = tl.sin(angle) * sign
    _rotate_heads(Q, QO, b * stride_qb + s * stride_qs, b * stride_qob + s * stride_qos, stride_qh, stride_qoh, HQ,
                  cos, sin, HALF, BLOCK_HALF, BLOCK_H)
    _rotate_heads(K, KO, b * stride_kb + s * stride_ks, b * stride_kob + s * stride_kos, stride_kh, stride_koh, HKV,
                  cos, sin, HALF, BLOCK_HALF, BLOCK_H)


def _rotate(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None, doc_start: torch.Tensor | None,
            inv_freq: torch.Tensor, sign: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, S, H, D] (last dim contiguous) -> rotated copies."""
    b, s, hq, d = q.shape
    half = d // 2
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    index = positions if positions is not None else doc_start
    block_h = min(16, next_power_of_2(max(hq, k.shape[2])))
    _rotary_kernel[(b * s,)](
        q, k, qo, ko, index, index, inv_freq, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2), s, hq,
        k.shape[2], sign, HALF=half, BLOCK_HALF=max(2, next_power_of_2(half)), BLOCK_H=block_h,
        FROM_DOCUMENTS=positions is None, num_warps=4 if d >= 128 else 2)
    return qo, ko


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, positions, doc_start, inv_freq):
        ctx.save_for_backward(positions, doc_start, inv_freq)
        return _rotate(q, k, positions, doc_start, inv_freq, 1.0)

    @staticmethod
    def backward(ctx, dq, dk):
        positions, doc_start, inv_freq = ctx.saved_tensors
        dq = dq if dq.stride(-1) == 1 else dq.contiguous()
        dk = dk if dk.stride(-1) == 1 else dk.contiguous()
        dq, dk = _rotate(dq, dk, positions, doc_start, inv_freq, -1.0)
        return dq, dk, None, None, None


def apply_rotary(q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor, *,
                 position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                 cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [B, S, Hq, D] and k [B, S, Hkv, D] (or [T, H, D] THD), out of place.

    Give exactly one of `position_ids` ([B, S] or [T]), `document_ids` ([B, S]: positions restart at each run of
    equal ids, computed in-kernel) or `cu_seqlens` (THD). `inv_freq` is fp32 [D/2]. Differentiable in q and k.
    """
    check_tensors("chrysalis_kernels.rotary", q, k, inv_freq)
    if sum(x is not None for x in (position_ids, document_ids, cu_seqlens)) != 1:
        raise ValueError("give exactly one of position_ids, document_ids, cu_seqlens")
    thd = q.dim() == 3
    if thd:
        q, k = q.unsqueeze(0), k.unsqueeze(0)  # [T, H, D] -> [1, T, H, D]
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, S, heads, D] with equal B, S, D")
    b, s, _, d = q.shape
    if d % 2 or inv_freq.shape != (d // 2,):
        raise ValueError(f"head dim {d} must be even and inv_freq [{d // 2}], got {tuple(inv_freq.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        q, k = q.contiguous(), k.contiguous()
    positions = doc_start = None
    if position_ids is not None:
        positions = position_ids.reshape(b, s).contiguous()
    else:
        from chrysalis_kernels.attention import document_bounds

        bounds = document_bounds(document_ids) if document_ids is not None else \
            document_bounds(cu_seqlens=cu_seqlens, seq_len=s)
        doc_start = bounds.start.reshape(b, s)
    qo, ko = _Rotary.apply(q, k, positions, doc_start, inv_freq.float().contiguous())
    if thd:
        return qo[0], ko[0]
    return qo, ko
