"""Packed-document causal attention in Triton: forward and backward, GQA/MQA, bf16/fp16 (and fp32).

Query i attends to key j iff both lie in the same document and j <= i. Documents are contiguous runs of tokens,
given per row as `document_ids` [B, S] (the engine's packed layout) or as flash-attn's `cu_seqlens` over a
[T, H, D] token-major ("THD") tensor. Neither path builds an S x S mask: the kernels read two int32 vectors,
`doc_start[b, s]` (first token of s's document) and `doc_end[b, s]` (one past its last token).

Forward (one program per (query block, batch x query head)), FlashAttention-2 style: online softmax in the
base-2 domain with fp32 running max/sum and fp32 accumulator; the log-sum-exp of each row (natural log, fp32) is
saved for the backward. A query block only visits key blocks in [doc_start(first query), last query]: blocks
that are fully masked (earlier documents, the future) are never loaded, so the cost scales with the documents'
lengths, not the packed length. Inside that range, blocks that are fully visible to every query of the block
(past the last query's document start, before the first query) run without the mask arithmetic; only the
diagonal block(s) and blocks straddling a document boundary are masked.

Backward: dK/dV with one program per (key block, batch x KV head) that loops over the query heads of its group
(no atomics: GQA/MQA gradients are summed in registers), and dQ with one program per (query block, query head);
both recompute P from the saved log-sum-exp and visit only the unmasked range (queries [key, doc_end(key))).
Deterministic: no atomics anywhere.

`attention_reference` is the pure-torch (fp32, dense mask) reference the tests compare against.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from chrysalis_kernels.runtime import INTERPRET, check_tensors, dot_config, next_power_of_2

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ------------------------------------------------------------------------------------------------ document bounds
class DocumentBounds(NamedTuple):
    """Per-token document bounds, [B, S] int32 each: a token's document is [start, end)."""

    start: torch.Tensor
    end: torch.Tensor


def document_bounds(document_ids: torch.Tensor | None = None, *, cu_seqlens: torch.Tensor | None = None,
                    batch: int | None = None, seq_len: int | None = None,
                    device: torch.device | None = None) -> DocumentBounds:
    """Document bounds from `document_ids` [B, S] (a document is a maximal run of equal ids), from `cu_seqlens`
    [N + 1] (flash-attn's cumulative lengths over T tokens: B = 1, S = T), or, with neither, one causal
    document per row of `seq_len` tokens. Build once per forward and pass to every layer's `attention` call."""
    if document_ids is not None:
        if document_ids.dim() != 2:
            raise ValueError(f"document_ids must be [batch, seq], got shape {tuple(document_ids.shape)}")
        b, s = document_ids.shape
        index = torch.arange(s, device=document_ids.device, dtype=torch.int32).expand(b, s)
        first = torch.ones(b, s, dtype=torch.bool, device=document_ids.device)
        first[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]  # [B, S] token starts a run
        last = torch.ones_like(first)
        last[:, :-1] = first[:, 1:]  # [B, S] token ends a run
        start = torch.where(first, index, 0).cummax(dim=1).values
        end = torch.where(last, index + 1, s).flip(1).cummin(dim=1).values.flip(1)
        return DocumentBounds(start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous())
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be a 1-D tensor [documents + 1], got shape {tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.to(torch.int64)
        total = int(cu[-1])
        if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError("cu_seqlens must start at 0 and be non-decreasing")
        if seq_len is not None and total != seq_len:
            raise ValueError(f"cu_seqlens ends at {total} but the packed tensor has {seq_len} tokens")
        tokens = torch.arange(total, device=cu.device)
        doc = torch.searchsorted(cu[1:], tokens, right=True)  # [T] document of each token
        return DocumentBounds(cu[doc].to(torch.int32)[None].contiguous(),
                              cu[doc + 1].to(torch.int32)[None].contiguous())
    if batch is None or seq_len is None:
        raise ValueError("give document_ids, cu_seqlens, or batch and seq_len")
    start = torch.zeros(batch, seq_len, dtype=torch.int32, device=device)
    return DocumentBounds(start, torch.full_like(start, seq_len))


# ------------------------------------------------------------------------------------------------ reference
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor | None = None,
                        *, cu_seqlens: torch.Tensor | None = None, softmax_scale: float | None = None,
                        return_lse: bool = False):
    """Pure-torch fp32 document-causal attention (dense mask), the reference for the kernels.

    q [B, Hq, S, D], k/v [B, Hkv, S, D] (or [T, H, D] with `cu_seqlens`). Returns the output in q's dtype
    (and the fp32 log-sum-exp [B, Hq, S] with `return_lse`).
    """
    thd = q.dim() == 3
    if thd:
        q, k, v = (t.permute(1, 0, 2).unsqueeze(0) for t in (q, k, v))  # [T, H, D] -> [1, H, T, D]
        if cu_seqlens is None:
            raise ValueError("[T, H, D] inputs need cu_seqlens")
    b, hq, s, d = q.shape
    bounds = document_bounds(document_ids, cu_seqlens=cu_seqlens, batch=b, seq_len=s, device=q.device)
    keys = torch.arange(s, device=q.device)
    # [B, S, S]: key j visible to query i iff start(i) <= j <= i
    visible = (keys[None, None, :] >= bounds.start[:, :, None]) & (keys[None, None, :] <= keys[None, :, None])
    group = hq // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), kf) * scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores, dim=-1), vf).to(q.dtype)
    if thd:
        out = out.squeeze(0).permute(1, 0, 2)
        lse = lse.squeeze(0)
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, offs_m, q_doc_start,
               start, end, S, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
               EVEN_D: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in tl.range(start, end, BLOCK_N):
        cols = start_n + offs_n
        tile = tl.cast(start_n, tl.int64)  # token offsets in int64: T x stride passes 2^31 at long packed rows
        kt_ptrs = k_base + tile * stride_ks + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd  # [D, BLOCK_N]
        v_ptrs = v_base + tile * stride_vs + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd  # [BLOCK_N, D]
        if MASK:
            kt = tl.load(kt_ptrs, mask=(cols[None, :] < S) & (offs_d[:, None] < HEAD_DIM), other=0.0)
            v = tl.load(v_ptrs, mask=(cols[:, None] < S) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        elif EVEN_D:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        # [BLOCK_M, BLOCK_N] scores in the log2 domain
        qk = tl.dot(q.to(DOT), kt.to(DOT), None, input_precision=PRECISION) * qk_scale
        if MASK:
            visible = (cols[None, :] <= offs_m[:, None]) & (cols[None, :] >= q_doc_start[:, None])
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype).to(DOT), v.to(DOT), acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_block_ranges(DS_ROW, m_start, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key-block ranges of a query block: masked [lo, full_lo), unmasked [full_lo, full_hi), masked [full_hi, hi)."""
    last = tl.minimum(m_start + BLOCK_M, S) - 1
    first_start = tl.load(DS_ROW + m_start)
    last_start = tl.load(DS_ROW + last)
    lo = first_start // BLOCK_N * BLOCK_N
    hi = last + 1
    # Key block [n, n + BLOCK_N) is visible to every query iff n >= start(last query) and n + BLOCK_N <= m_start + 1.
    full_lo = (last_start + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    full_hi = (m_start + 1) // BLOCK_N * BLOCK_N
    no_full = full_lo >= full_hi
    full_lo = tl.where(no_full, hi, full_lo)
    full_hi = tl.where(no_full, hi, full_hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, DOC_START, COUNTS,
                     stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                     stride_vb, stride_vh, stride_vs, stride_vd, stride_ob, stride_oh, stride_os, stride_od,
                     S, HQ, GROUP, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     EVEN_D: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, COUNT_BLOCKS: tl.constexpr):
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
    q = tl.load(Q + b * stride_qb + h * stride_qh + tile * stride_qs + rows * stride_qs + offs_d[None, :] * stride_qd,
                mask=io_mask, other=0.0)
    ds_row = DOC_START + b * S
    q_doc_start = tl.load(ds_row + offs_m, mask=row_ok, other=S)  # padding rows see no key
    lo, full_lo, full_hi, hi = _query_block_ranges(ds_row, m_start, S, BLOCK_M, BLOCK_N)

    # A finite initial max: a row whose keys are all masked in a block keeps p = 0 and alpha = 1 (never NaN).
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, offs_m,
                               q_doc_start, lo, full_lo, S, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, EVEN_D,
                               DOT, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, offs_m,
                               q_doc_start, full_lo, full_hi, S, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, EVEN_D,
                               DOT, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, offs_m,
                               q_doc_start, full_hi, hi, S, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, EVEN_D,
                               DOT, PRECISION)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + tile * stride_os + rows * stride_os + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=io_mask)
    tl.store(LSE + pid_bh.to(tl.int64) * S + offs_m, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, mask=row_ok)
    if COUNT_BLOCKS:
        visited = (full_lo - lo + BLOCK_N - 1) // BLOCK_N + (full_hi - full_lo) // BLOCK_N \
            + (hi - full_hi + BLOCK_N - 1) // BLOCK_N
        tl.store(COUNTS + pid_bh * tl.num_programs(0) + pid_m, visited)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, ds_row, stride_qs, stride_qd,
                    stride_dos, stride_dod, offs_n, start, end, S, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr,
                    EVEN_D: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in tl.range(start, end, BLOCK_M):
        rows = tl.arange(0, BLOCK_M)
        offs_m = start_m + rows
        tile = tl.cast(start_m, tl.int64)
        qt_ptrs = q_base + tile * stride_qs + rows[None, :] * stride_qs + offs_d[:, None] * stride_qd  # [D, BLOCK_M]
        do_ptrs = do_base + tile * stride_dos + rows[:, None] * stride_dos + offs_d[None, :] * stride_dod  # [M, D]
        if MASK:
            row_ok = offs_m < S
            qt = tl.load(qt_ptrs, mask=row_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            if EVEN_D:
                qt = tl.load(qt_ptrs)
                do = tl.load(do_ptrs)
            else:
                qt = tl.load(qt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
                do = tl.load(do_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        qkt = tl.dot(k.to(DOT), qt.to(DOT), None, input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        pt = tl.math.exp2(qkt - lse[None, :] * 1.4426950408889634)
        if MASK:
            q_doc_start = tl.load(ds_row + offs_m, mask=offs_m < S, other=S)
            visible = (offs_m[None, :] >= offs_n[:, None]) & (offs_n[:, None] >= q_doc_start[None, :])
            pt = tl.where(visible, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype).to(DOT), do.to(DOT), dv, input_precision=PRECISION)
        dpt = tl.dot(v.to(DOT), tl.trans(do).to(DOT), None, input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype).to(DOT), tl.trans(qt).to(DOT), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DOC_START, DOC_END,
                          stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                          stride_vb, stride_vh, stride_vs, stride_vd, stride_dob, stride_doh, stride_dos, stride_dod,
                          stride_dkb, stride_dkh, stride_dks, stride_dkd, stride_dvb, stride_dvh, stride_dvs,
                          stride_dvd, S, HQ, HKV, GROUP, qk_scale, sm_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    n_start = pid_n * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = (offs_n[:, None] < S) & (offs_d[None, :] < HEAD_DIM)
    rows = tl.arange(0, BLOCK_N)[:, None]
    tile = tl.cast(n_start, tl.int64)
    k = tl.load(K + b * stride_kb + hk * stride_kh + tile * stride_ks + rows * stride_ks + offs_d[None, :] * stride_kd,
                mask=io_mask, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + tile * stride_vs + rows * stride_vs + offs_d[None, :] * stride_vd,
                mask=io_mask, other=0.0)
    ds_row = DOC_START + b * S
    de_row = DOC_END + b * S
    # Queries that see key j are [j, doc_end(j)); over the block: [n_start, doc_end(last key)).
    n_last = tl.minimum(n_start + BLOCK_N, S) - 1
    q_lo = n_start // BLOCK_M * BLOCK_M
    q_hi = tl.load(de_row + n_last)
    # Query block [m, m + BLOCK_M) sees every key iff m >= n_last and m + BLOCK_M <= doc_end(first key).
    full_lo = (n_last + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    full_hi = tl.load(de_row + n_start) // BLOCK_M * BLOCK_M
    no_full = full_lo >= full_hi
    full_lo = tl.where(no_full, q_hi, full_lo)
    full_hi = tl.where(no_full, q_hi, full_hi)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):  # the query heads sharing this KV head: GQA gradients summed here, without atomics
        h = hk * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row = (b * HQ + h) * S
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row, DELTA + row, ds_row, stride_qs,
                                 stride_qd, stride_dos, stride_dod, offs_n, q_lo, full_lo, S, qk_scale, HEAD_DIM,
                                 BLOCK_D, BLOCK_M, True, EVEN_D, DOT, PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row, DELTA + row, ds_row, stride_qs,
                                 stride_qd, stride_dos, stride_dod, offs_n, full_lo, full_hi, S, qk_scale, HEAD_DIM,
                                 BLOCK_D, BLOCK_M, False, EVEN_D, DOT, PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row, DELTA + row, ds_row, stride_qs,
                                 stride_qd, stride_dos, stride_dod, offs_n, full_hi, q_hi, S, qk_scale, HEAD_DIM,
                                 BLOCK_D, BLOCK_M, True, EVEN_D, DOT, PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + tile * stride_dks + rows * stride_dks
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=io_mask)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + tile * stride_dvs + rows * stride_dvs
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=io_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, offs_m,
                  q_doc_start, start, end, S, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                  EVEN_D: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in tl.range(start, end, BLOCK_N):
        cols = start_n + offs_n
        tile = tl.cast(start_n, tl.int64)
        kt_ptrs = k_base + tile * stride_ks + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd  # [D, BLOCK_N]
        vt_ptrs = v_base + tile * stride_vs + offs_n[None, :] * stride_vs + offs_d[:, None] * stride_vd  # [D, BLOCK_N]
        if MASK:
            kv_mask = (cols[None, :] < S) & (offs_d[:, None] < HEAD_DIM)
            kt = tl.load(kt_ptrs, mask=kv_mask, other=0.0)
            vt = tl.load(vt_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            kt = tl.load(kt_ptrs)
            vt = tl.load(vt_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            vt = tl.load(vt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        qk = tl.dot(q.to(DOT), kt.to(DOT), None, input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        if MASK:
            visible = (cols[None, :] <= offs_m[:, None]) & (cols[None, :] >= q_doc_start[:, None])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do.to(DOT), vt.to(DOT), None, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype).to(DOT), tl.trans(kt).to(DOT), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DOC_START,
                        stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                        stride_vb, stride_vh, stride_vs, stride_vd, stride_dob, stride_doh, stride_dos, stride_dod,
                        stride_dqb, stride_dqh, stride_dqs, stride_dqd, S, HQ, GROUP, qk_scale, sm_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        EVEN_D: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
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
    q = tl.load(Q + b * stride_qb + h * stride_qh + tile * stride_qs + rows * stride_qs + offs_d[None, :] * stride_qd,
                mask=io_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + tile * stride_dos + rows * stride_dos
                 + offs_d[None, :] * stride_dod, mask=io_mask, other=0.0)
    row = pid_bh.to(tl.int64) * S
    lse = tl.load(LSE + row + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row + offs_m, mask=row_ok, other=0.0)
    ds_row = DOC_START + b * S
    q_doc_start = tl.load(ds_row + offs_m, mask=row_ok, other=S)
    lo, full_lo, full_hi, hi = _query_block_ranges(ds_row, m_start, S, BLOCK_M, BLOCK_N)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, offs_m,
                       q_doc_start, lo, full_lo, S, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, EVEN_D, DOT, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, offs_m,
                       q_doc_start, full_lo, full_hi, S, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, EVEN_D,
                       DOT, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, offs_m,
                       q_doc_start, full_hi, hi, S, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, EVEN_D, DOT, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + tile * stride_dqs + rows * stride_dqs
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=io_mask)


# ------------------------------------------------------------------------------------------------ launch configs
# The interpreter runs each program in Python, at a cost per operation rather than per element: 16 x 16 tiles
# give small test sequences many blocks (masked, unmasked and skipped ones); the CLI training test raises the
# tile with CHRYSALIS_INTERPRET_TILE to run fewer programs. On a GPU the tile shapes are autotuned per (head dim,
# sequence length) among configurations that fit Hopper's and Ampere's shared memory.
_INTERPRET_TILE = int(os.environ.get("CHRYSALIS_INTERPRET_TILE", "16"))
_INTERPRET_TILES = {"BLOCK_M": _INTERPRET_TILE, "BLOCK_N": _INTERPRET_TILE}


def _configs(pairs):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


if INTERPRET:
    _fwd, _bwd_dkdv, _bwd_dq = _attn_fwd_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel
else:  # pragma: no cover - needs a GPU
    _fwd = triton.autotune(_configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4),
                                     (64, 64, 4, 3), (64, 32, 4, 4)]),
                           key=["HEAD_DIM", "S"])(_attn_fwd_kernel)
    _bwd_dkdv = triton.autotune(_configs([(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3),
                                          (16, 64, 4, 4)]),
                                key=["HEAD_DIM", "S", "GROUP"])(_attn_bwd_dkdv_kernel)
    _bwd_dq = triton.autotune(_configs([(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3),
                                        (64, 16, 4, 4)]),
                              key=["HEAD_DIM", "S"])(_attn_bwd_dq_kernel)


def _launch(kernel, grid_blocks, *args, **kwargs):
    """grid_blocks(BLOCK_M, BLOCK_N) -> grid; the interpreter uses fixed small tiles, a GPU autotunes them."""
    if INTERPRET:
        kernel[grid_blocks(_INTERPRET_TILES["BLOCK_M"], _INTERPRET_TILES["BLOCK_N"])](*args, **kwargs,
                                                                                     **_INTERPRET_TILES)
    else:  # pragma: no cover - needs a GPU
        kernel[lambda meta: grid_blocks(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **kwargs)


# ------------------------------------------------------------------------------------------------ host side
def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: DocumentBounds) -> None:
    check_tensors("chrysalis_kernels.attention", q, k, v, bounds.start, bounds.end)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected q, k, v of shape [B, H, S, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, hq, s, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [B, Hkv, S, D] matching q "
                         f"{tuple(q.shape)} (self-attention over the same packed tokens)")
    if hq % k.shape[1]:
        raise ValueError(f"query heads {hq} must be a multiple of key/value heads {k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"q, k, v must share one of bf16/fp16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if d > 256 or d < 16:
        raise ValueError(f"head dim {d} is outside the supported 16..256")
    if q.dtype == torch.float32 and d > 128:
        # fp32 tiles of a 256-wide head need more shared memory than a GPU has (the smallest configurations: 270 KB
        # forward, 234 KB dK/dV, on sm_90's 227 KB): refused on CPU too, so that the interpreter tests accept only
        # what a GPU runs.
        raise ValueError(f"fp32 attention supports head dims up to 128 (got {d}); use bf16 or fp16 (or autocast)")
    if tuple(bounds.start.shape) != (b, s) or tuple(bounds.end.shape) != (b, s):
        raise ValueError(f"document bounds have shape {tuple(bounds.start.shape)}, expected {(b, s)}")


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: DocumentBounds, sm_scale: float,
                      count_blocks: bool = False):
    """Raw forward: (out [B, Hq, S, D], lse [B, Hq, S] fp32[, visited key blocks per program])."""
    b, hq, s, d = q.shape
    block_d = max(16, next_power_of_2(d))
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, s, dtype=torch.float32, device=q.device)
    counts = torch.zeros(b * hq * triton.cdiv(s, _INTERPRET_TILES["BLOCK_M"]), dtype=torch.int32, device=q.device) \
        if count_blocks else lse
    if count_blocks and not INTERPRET:
        raise RuntimeError("count_blocks is a test hook for the interpreter's fixed tiles")
    _launch(_fwd, lambda bm, bn: (triton.cdiv(s, bm), b * hq),
            q, k, v, out, lse, bounds.start, counts, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            s, hq, hq // k.shape[1], sm_scale * LOG2E,
            HEAD_DIM=d, BLOCK_D=block_d, EVEN_D=block_d == d, **dot_config(q.dtype),
            COUNT_BLOCKS=count_blocks)
    if count_blocks:
        return out, lse, counts.view(b, hq, -1)
    return out, lse


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, bounds: DocumentBounds, sm_scale: float):
    """Raw backward: (dq, dk, dv) in the inputs' dtypes."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    block_d = max(16, next_power_of_2(d))
    # delta_i = sum_d dO_i * O_i (FlashAttention-2's D), fp32 [B, Hq, S]
    delta = (do.float() * out.float()).sum(-1).contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    common = {"HEAD_DIM": d, "BLOCK_D": block_d, "EVEN_D": block_d == d, **dot_config(q.dtype)}
    _launch(_bwd_dkdv, lambda bm, bn: (triton.cdiv(s, bn), b * hkv),
            q, k, v, do, lse, delta, dk, dv, bounds.start, bounds.end, *_strides(q), *_strides(k), *_strides(v),
            *_strides(do), *_strides(dk), *_strides(dv), s, hq, hkv, hq // hkv, sm_scale * LOG2E, sm_scale, **common)
    _launch(_bwd_dq, lambda bm, bn: (triton.cdiv(s, bm), b * hq),
            q, k, v, do, lse, delta, dq, bounds.start, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            *_strides(dq), s, hq, hq // hkv, sm_scale * LOG2E, sm_scale, **common)
    return dq, dk, dv


class _DocumentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_start, doc_end, sm_scale):
        bounds = DocumentBounds(doc_start, doc_end)
        out, lse = attention_forward(q, k, v, bounds, sm_scale)
        ctx.save_for_backward(q, k, v, out, lse, doc_start, doc_end)
        ctx.sm_scale = sm_scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, doc_start, doc_end = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, DocumentBounds(doc_start, doc_end), ctx.sm_scale)
        return dq, dk, dv, None, None, None


def autocast_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Under torch.autocast, q, k, v in the autocast dtype (as autocast does for SDPA: RoPE in fp32 can promote
    q and k while v stays 16-bit); otherwise unchanged."""
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        return q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor | None = None,
                       *, cu_seqlens: torch.Tensor | None = None, bounds: DocumentBounds | None = None,
                       softmax_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Document-causal attention returning (out, lse); differentiable in q, k, v.

    Args:
        q: [B, Hq, S, D] (any strides, e.g. a transposed [B, S, H, D] projection), or [T, Hq, D] with cu_seqlens.
        k, v: [B, Hkv, S, D] (or [T, Hkv, D]); Hq must be a multiple of Hkv (GQA; Hkv = 1 is MQA).
        document_ids: [B, S] per-token document id (a document is a run of equal ids); None = one per row.
        cu_seqlens: [N + 1] cumulative document lengths for [T, H, D] inputs (flash-attn's varlen layout).
        bounds: precomputed `document_bounds(...)` (shared by all layers of a forward); overrides the above.
        softmax_scale: defaults to 1 / sqrt(D).
    Returns:
        out like q, and lse [B, Hq, S] (or [Hq, T]) fp32, natural log.
    """
    thd = q.dim() == 3
    if thd:
        if cu_seqlens is None and bounds is None:
            raise ValueError("[T, H, D] inputs need cu_seqlens (or bounds)")
        q, k, v = (t.permute(1, 0, 2).unsqueeze(0) for t in (q, k, v))  # [T, H, D] -> [1, H, T, D] (a view)
    b, _, s, d = q.shape
    if bounds is None:
        bounds = document_bounds(document_ids, cu_seqlens=cu_seqlens, batch=b, seq_len=s, device=q.device)
    q, k, v = autocast_inputs(q, k, v)
    _check_inputs(q, k, v, bounds)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    out, lse = _DocumentAttention.apply(q, k, v, bounds.start, bounds.end, scale)
    if thd:
        return out.squeeze(0).permute(1, 0, 2), lse.squeeze(0)
    return out, lse


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor | None = None, *,
              cu_seqlens: torch.Tensor | None = None, bounds: DocumentBounds | None = None,
              softmax_scale: float | None = None) -> torch.Tensor:
    """Document-causal attention (see `attention_with_lse`); returns the output only."""
    return attention_with_lse(q, k, v, document_ids, cu_seqlens=cu_seqlens, bounds=bounds,
                              softmax_scale=softmax_scale)[0]


# ------------------------------------------------------------------------------------------------ engine interface
# The engine's varlen backends (`--attention-backend triton|triton-fp8`, engine/model/attention_backends.py) call
# `packed_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, softmax_scale=None)` once per layer with the same
# cu_seqlens tensor: its document bounds (and their validation, which syncs with the host) are computed once and
# reused while the same, unmodified tensor comes back.
_bounds_cache: list = []  # [(cu_seqlens, its _version, tokens, DocumentBounds)], at most one entry


def _bounds_for(cu_seqlens: torch.Tensor, tokens: int) -> DocumentBounds:
    if _bounds_cache:
        cu, version, total, bounds = _bounds_cache[0]
        if cu is cu_seqlens and version == cu_seqlens._version and total == tokens:
            return bounds
    bounds = document_bounds(cu_seqlens=cu_seqlens, seq_len=tokens)
    _bounds_cache[:] = [(cu_seqlens, cu_seqlens._version, tokens, bounds)]
    return bounds


def _packed(fn, q, k, v, cu_seqlens, causal, softmax_scale):
    if not causal:
        raise NotImplementedError("chrysalis_kernels attention is causal within documents only (causal=True)")
    if q.dim() != 3:
        raise ValueError(f"packed attention takes THD tensors [tokens, heads, D], got q of shape {tuple(q.shape)}")
    bounds = _bounds_for(cu_seqlens, q.shape[0])
    return fn(q, k, v, bounds=bounds, softmax_scale=softmax_scale)


@torch.compiler.disable  # launches Triton kernels from Python with host-side checks: run eagerly under compile
def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int | None = None, *, causal: bool = True,
                     softmax_scale: float | None = None) -> torch.Tensor:
    """flash-attn-style varlen entry point: q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens int [N + 1] -> [T, Hq, D].

    `max_seqlen` is accepted for interface compatibility; the kernels size their grid from T and skip the blocks
    outside each document.
    """
    return _packed(attention, q, k, v, cu_seqlens, causal, softmax_scale)


@torch.compiler.disable
def packed_attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         max_seqlen: int | None = None, *, causal: bool = True,
                         softmax_scale: float | None = None) -> torch.Tensor:
    """`packed_attention` with the FP8 e4m3 forward of `chrysalis_kernels.attention_fp8` (16-bit backward)."""
    from chrysalis_kernels.attention_fp8 import attention_fp8  # imports this module: resolved at call time

    return _packed(attention_fp8, q, k, v, cu_seqlens, causal, softmax_scale)
