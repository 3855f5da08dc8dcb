"""Attention backends for packed sequences.

Both backends compute causal attention that never crosses a document boundary, given per-token document ids:

- `sdpa`: `torch.nn.functional.scaled_dot_product_attention`, the portable numerical reference. With one document
  per row it uses `is_causal=True` (no mask tensor); with packing it materialises a [B, 1, S, S] boolean mask.
- `flex`: FlexAttention with a document-causal `BlockMask`, which skips fully-masked blocks instead of
  materialising a mask. Compiled on GPU. On CPU, torch has no FlexAttention backward: forward-only calls run eager
  flex (unfused, exact), and calls that need gradients fall back to sdpa with the equivalent dense mask, so
  `--attention-backend flex` configurations still train (slowly) in the CPU test layouts.

The mask is built once per forward by `build_attention_mask` and shared by every layer.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class AttentionMask:
    """What every layer needs to mask attention.

    Attributes:
        backend: "sdpa" or "flex".
        dense: for sdpa, a [B, 1, Sq, Sk] bool mask (True = attend), or None for plain causal attention.
        block_mask: for flex, a `BlockMask`.
        document_ids: for flex, the [B, S] ids the block mask came from (for the dense CPU-training fallback).
    """

    backend: str
    dense: torch.Tensor | None = None
    block_mask: Any = None
    document_ids: torch.Tensor | None = None

    def dense_fallback(self) -> torch.Tensor | None:
        """The dense equivalent of a flex mask (None = plain causal), built once and shared by all layers."""
        if self.dense is None and self.document_ids is not None:
            self.dense = document_causal_mask(self.document_ids)
        return self.dense


def document_causal_mask(document_ids: torch.Tensor, key_document_ids: torch.Tensor | None = None,
                         query_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Dense [B, 1, Sq, Sk] bool mask: query i sees key j iff same document and j <= i.

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


def build_attention_mask(backend: str, document_ids: torch.Tensor | None, batch: int, seq_len: int,
                         device: torch.device) -> AttentionMask:
    """Builds the per-forward mask for `backend` ("sdpa" or "flex")."""
    if backend == "sdpa":
        if document_ids is None:
            return AttentionMask("sdpa")
        return AttentionMask("sdpa", dense=document_causal_mask(document_ids))
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        if document_ids is None:
            def mask_mod(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx
            batch_dim = None
        else:
            docs = document_ids

            def mask_mod(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (docs[b, q_idx] == docs[b, kv_idx])
            batch_dim = batch
        block_mask = create_block_mask(mask_mod, batch_dim, None, seq_len, seq_len, device=device)
        return AttentionMask("flex", block_mask=block_mask, document_ids=document_ids)
    raise ValueError(f"unknown attention backend {backend!r}; choose 'sdpa' or 'flex'")


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


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    Args:
        q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D] with Hq divisible by Hkv.
    Returns:
        [B, Hq, Sq, D]
    """
    enable_gqa = q.shape[1] != k.shape[1]
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
