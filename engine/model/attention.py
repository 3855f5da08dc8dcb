"""Attention for packed sequences: masks and the per-backend kernels, chosen by `--attention-backend`.

Every backend computes causal attention that never crosses a document boundary, given per-token document ids
(documents are contiguous runs of equal ids, as the packer writes them; padding is one more run). Backends:

- `sdpa`: `torch.nn.functional.scaled_dot_product_attention`, the portable numerical reference. With one document
  per row it uses `is_causal=True` (no mask tensor). With packing it materialises a dense [B, 1, S, S] boolean
  mask on CPU (the reference); on CUDA it calls torch's varlen flash kernel (`torch.nn.attention.varlen`) with
  `cu_seqlens` instead, so no GPU path builds an S x S mask.
- `flex`: FlexAttention with a document-causal `BlockMask` built directly from the documents' block ranges
  (`document_block_mask`: O(B * S + B * (S/128)^2) work, never an S x S tensor). Compiled on GPU, where blocks
  with no allowed pair are skipped and blocks inside one document run without the mask function. On CPU, torch
  has no FlexAttention backward: forward-only calls run eager flex (unfused, exact) and calls that need gradients
  fall back to sdpa with the equivalent dense mask (CPU only).
- `flash` (flash-attn 3 or 2, `flash_attn_varlen_func`), `te` (Transformer Engine `DotProductAttention`, THD) and
  `triton` / `triton-fp8` (`chrysalis_kernels.attention`): variable-length kernels on THD tensors
  ([B*S, heads, D]) with `cu_seqlens` from the document bounds. See `engine.model.attention_backends`.

The mask is built once per forward by `build_attention_mask` and shared by every layer.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# Backends whose kernels take THD tensors with cu_seqlens (engine.model.attention_backends).
THD_BACKENDS = ("flash", "te", "triton", "triton-fp8")
FLEX_BLOCK_SIZE = 128


@dataclass
class AttentionMask:
    """What every layer needs to mask attention.

    Attributes:
        backend: a concrete backend name (`sdpa`, `flex`, `flash`, `te`, `triton`, `triton-fp8`).
        dense: for sdpa on CPU, a [B, 1, Sq, Sk] bool mask (True = attend), or None for plain causal attention.
        block_mask: for flex, a `BlockMask`.
        document_ids: the [B, S] ids the mask came from (flex's dense CPU-training fallback).
        cu_seqlens: for varlen kernels, int32 [N + 1] start offsets of the N documents in the flattened [B * S]
            tokens (rows are never merged: each row starts a document). None for unpacked causal rows.
        max_seqlen: the longest document (host int, one device sync per forward).
    """

    backend: str
    dense: torch.Tensor | None = None
    block_mask: Any = None
    document_ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0

    @property
    def varlen(self) -> bool:
        """Whether `attend` runs this mask through a THD varlen kernel."""
        return self.backend in THD_BACKENDS or (self.backend == "sdpa" and self.cu_seqlens is not None)

    def dense_fallback(self) -> torch.Tensor | None:
        """The dense equivalent of a flex mask (None = plain causal), built once and shared by all layers."""
        if self.dense is None and self.document_ids is not None:
            self.dense = document_causal_mask(self.document_ids)
        return self.dense


def document_causal_mask(document_ids: torch.Tensor, key_document_ids: torch.Tensor | None = None,
                         query_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Dense [B, 1, Sq, Sk] bool mask: query i sees key j iff same document and j <= i (the CPU reference).

    Args:
        document_ids: [B, Sq] document id of each query token.
        key_document_ids: [B, Sk] document id of each key (defaults to `document_ids`).
        query_positions: [Sq] index of each query among the keys (defaults to the last Sq keys).
    """
    keys = document_ids if key_document_ids is None else key_document_ids
    sq, sk = document_ids.shape[1], keys.shape[1]
    if query_positions is None:
        query_positions = torch.arange(sk - sq, sk, device=document_ids.device)
    causal = query_positions[:, None] >= torch.arange(sk, device=document_ids.device)[None, :]  # [Sq, Sk]
    same_doc = document_ids[:, :, None] == keys[:, None, :]  # [B, Sq, Sk]
    return (same_doc & causal).unsqueeze(1)


def key_padding_causal_mask(key_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Dense [B, 1, Sq, Sk] bool mask for incremental decoding of left-padded rows.

    Query i (the last Sq keys are the queries) sees key j iff j <= i and key j is a real token. A padding query
    also sees itself: a query with every key masked makes sdpa return NaN, and that NaN would be written into
    the KV cache (and reach real tokens through 0 * NaN in the value product).

    Args:
        key_mask: [B, Sk] bool, True for real tokens, over the cached keys plus this step's.
        num_queries: Sq, the tokens of this step.
    """
    sk = key_mask.shape[1]
    device = key_mask.device
    query_positions = torch.arange(sk - num_queries, sk, device=device)[:, None]  # [Sq, 1]
    key_positions = torch.arange(sk, device=device)[None, :]  # [1, Sk]
    causal = query_positions >= key_positions  # [Sq, Sk]
    itself = query_positions == key_positions
    # [B, 1, 1, Sk] & [Sq, Sk] -> [B, 1, Sq, Sk]
    return (key_mask.bool()[:, None, None, :] & causal) | itself


def document_segments(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] run index of each token within its row (0, 0, 1, 1, 1, 2, ...): a new run wherever the id changes."""
    change = torch.zeros_like(document_ids, dtype=torch.int32)
    change[:, 1:] = (document_ids[:, 1:] != document_ids[:, :-1]).to(torch.int32)
    return change.cumsum(dim=1, dtype=torch.int32)


def packed_document_bounds(document_ids: torch.Tensor | None, batch: int, seq_len: int,
                           device: torch.device) -> tuple[torch.Tensor, int]:
    """`cu_seqlens` (int32 [N + 1]) and the longest document of the flattened [B * S] tokens.

    Each row starts a new document, and so does every change of document id within a row. O(B * S) work; the
    host needs `max_seqlen` (flash-attn's API), so this costs one device sync per forward, shared by all layers.
    """
    if document_ids is None:
        cu = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=device)
        return cu, seq_len
    starts = torch.zeros(batch, seq_len, dtype=torch.bool, device=document_ids.device)
    starts[:, 0] = True
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    begin = starts.reshape(-1).nonzero().squeeze(1).to(torch.int32)  # [N]
    cu = torch.cat([begin, begin.new_tensor([batch * seq_len])])
    return cu, int((cu[1:] - cu[:-1]).max().item())


def document_block_mask(document_ids: torch.Tensor | None, batch: int, seq_len: int, device: torch.device,
                        block_size: int = FLEX_BLOCK_SIZE):
    """FlexAttention `BlockMask` for document-causal attention, from block-level document ranges.

    `create_block_mask` evaluates the mask function on the full [B, S, S] grid unless it is compiled; here the
    block structure is derived from each block's first and last document run instead (runs are non-decreasing
    along a row), so nothing of size S x S is ever allocated:
      - kv block j is needed by q block i iff j <= i and block j's last run reaches block i's first run;
      - it is *full* (no mask function needed) iff j < i and both blocks lie in one and the same run.
    Partial blocks apply `mask_mod` (causal and same run) elementwise inside the kernel.
    """
    from torch.nn.attention.flex_attention import BlockMask

    nb = -(-seq_len // block_size)
    padded = nb * block_size
    if document_ids is None:
        segments = torch.zeros(batch, padded, dtype=torch.int32, device=device)
    else:
        segments = document_segments(document_ids.to(device))
        if padded > seq_len:  # repeat the last run: indices past S stay valid for mask_mod, blocks stay correct
            segments = torch.cat([segments, segments[:, -1:].expand(batch, padded - seq_len)], dim=1)
    blocks = segments.view(batch, nb, block_size)  # [B, nb, block]
    first, last = blocks[:, :, 0], blocks[:, :, -1]  # [B, nb]; runs are non-decreasing within a block
    q_first, q_last = first[:, :, None], last[:, :, None]  # q block i on dim 1
    k_first, k_last = first[:, None, :], last[:, None, :]  # kv block j on dim 2
    i = torch.arange(nb, device=device)
    lower = i[None, :, None] >= i[None, None, :]  # [1, nb, nb] j <= i
    strictly_lower = i[None, :, None] > i[None, None, :]
    needed = lower & (k_last >= q_first)  # [B, nb, nb]
    full = strictly_lower & (k_first == k_last) & (q_first == q_last) & (k_first == q_first)
    if padded > seq_len:  # the last kv block holds positions past S: never skip its bounds check
        full[:, :, -1] = False
    partial = needed & ~full

    def indices(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [B, nb, nb] bool -> counts [B, 1, nb] and the selected kv block ids first, in ascending order.
        counts = selected.sum(-1, dtype=torch.int32)
        order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[:, None], order[:, None]

    kv_num, kv_idx = indices(partial)
    full_num, full_idx = indices(full)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (segments[b, q_idx] == segments[b, kv_idx])

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(seq_len, seq_len))


def build_attention_mask(backend: str, document_ids: torch.Tensor | None, batch: int, seq_len: int,
                         device: torch.device, *, dense_allowed: bool | None = None) -> AttentionMask:
    """Builds the per-forward mask for `backend` (a name of `attention_backends.ATTENTION_BACKENDS`; `auto` is
    resolved for `device` here).

    Args:
        dense_allowed: whether sdpa may materialise its dense [B, 1, S, S] mask for packed rows; default: off
            CUDA only (on CUDA, sdpa runs torch's varlen kernel on `cu_seqlens` instead).
    """
    from engine.model.attention_backends import ATTENTION_BACKENDS, resolve_attention_backend

    if backend == "auto":
        backend = resolve_attention_backend("auto", device)
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if dense_allowed is None:
        dense_allowed = device.type != "cuda"
    if backend == "sdpa":
        if document_ids is None:
            return AttentionMask("sdpa")
        if dense_allowed:
            return AttentionMask("sdpa", dense=document_causal_mask(document_ids), document_ids=document_ids)
        cu, longest = packed_document_bounds(document_ids, batch, seq_len, device)
        return AttentionMask("sdpa", document_ids=document_ids, cu_seqlens=cu, max_seqlen=longest)
    if backend == "flex":
        return AttentionMask("flex", block_mask=document_block_mask(document_ids, batch, seq_len, device),
                             document_ids=document_ids)
    cu, longest = packed_document_bounds(document_ids, batch, seq_len, device)
    return AttentionMask(backend, document_ids=document_ids, cu_seqlens=cu, max_seqlen=longest)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_attention(q, k, v, block_mask, enable_gqa):
    from torch.nn.attention.flex_attention import flex_attention

    if q.is_cuda:
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    with warnings.catch_warnings():
        # Eager flex on CPU is the unfused reference implementation; exact, and cheaper than compiling here.
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def attend_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Training-path attention on [B, S, heads, D] tensors (no KV cache), any backend.

    Varlen backends see the THD view [B * S, heads, D] (a free reshape of this layout); sdpa and flex see
    [B, heads, S, D] (a transposed view). Returns [B, S, Hq, D].
    """
    b, s, hq, d = q.shape
    if mask.varlen:
        from engine.model.attention_backends import varlen_attention

        # [B, S, heads, D] -> [B * S, heads, D]
        out = varlen_attention(mask.backend, q.reshape(b * s, hq, d), k.reshape(b * s, -1, d),
                               v.reshape(b * s, -1, d), mask.cu_seqlens, mask.max_seqlen)
        return out.view(b, s, hq, d)
    # [B, S, heads, D] -> [B, heads, S, D] -> attention -> [B, S, heads, D]
    out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
    return out.transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads (sdpa and flex masks; KV-cache decoding).

    Args:
        q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D] with Hq divisible by Hkv.
    Returns:
        [B, Hq, Sq, D]
    """
    enable_gqa = q.shape[1] != k.shape[1]
    if mask.varlen:
        out = attend_packed(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return out.transpose(1, 2)
    if mask.backend == "flex":
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if q.is_cuda or not needs_grad:
            return _flex_attention(q, k, v, mask.block_mask, enable_gqa)
        mask = AttentionMask("sdpa", dense=mask.dense_fallback())
    if mask.dense is None:
        # Plain causal; with a KV cache (Sq < Sk) the queries are the last Sq keys.
        if q.shape[2] == k.shape[2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
        if q.shape[2] == 1:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=enable_gqa)
        sq, sk = q.shape[2], k.shape[2]
        causal = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=enable_gqa)


def attend_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One query position against a KV cache (the decode step), grouped-query heads without repeating K/V.

    The Hq / Hkv query heads that share a KV head become that head's "queries": q [B, Hq, 1, D] is viewed as
    [B, Hkv, G, D], so every attention backend (flash, memory-efficient, CPU flash) runs plain multi-head attention
    on the cache as stored, with a mask that broadcasts over the group. Nothing is causal here: the query is the
    newest position and may see every cached key the mask allows.

    Args:
        q: [B, Hq, 1, D]; k, v: [B, Hkv, Sk, D].
        bias: [B, 1, 1, Sk] additive float mask (0 = attend, -inf = not) or bool mask (True = attend), or None.
    Returns:
        [B, Hq, 1, D]
    """
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    # [B, Hq, 1, D] -> [B, Hkv, G, D]: query heads j*G .. (j+1)*G - 1 use KV head j (Hugging Face's repeat_kv order).
    out = F.scaled_dot_product_attention(q.reshape(b, hkv, hq // hkv, d), k, v, attn_mask=bias)
    return out.reshape(b, hq, 1, d)
