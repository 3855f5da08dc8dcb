"""Attention masks and backends for packed sequences (engine/model/attention.py).

The dense `document_causal_mask` is checked against a brute-force definition; the sdpa and flex backends are
checked against each other and against running each packed document on its own, with grouped-query heads.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.config import preset
from engine.model import build_model
from engine.model.attention import AttentionMask, attend, build_attention_mask, document_causal_mask

VOCAB = 512  # the tiny preset's


def brute_force_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S]: i sees j iff j <= i and both are in the same document, by loops."""
    b, s = document_ids.shape
    out = torch.zeros(b, 1, s, s, dtype=torch.bool)
    for r in range(b):
        for i in range(s):
            for j in range(s):
                out[r, 0, i, j] = j <= i and bool(document_ids[r, i] == document_ids[r, j])
    return out


def test_document_causal_mask_matches_definition():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 3, 3]])
    mask = document_causal_mask(docs)
    assert mask.shape == (2, 1, 9, 9) and mask.dtype == torch.bool
    assert torch.equal(mask, brute_force_mask(docs))


def test_document_causal_mask_never_sees_future_or_other_documents():
    torch.manual_seed(0)
    # Random packings: sorted random document ids per row.
    docs = torch.randint(0, 5, (3, 40)).sort(dim=1).values
    mask = document_causal_mask(docs)[:, 0]
    i = torch.arange(40)[:, None]
    j = torch.arange(40)[None, :]
    assert not (mask & (j > i)).any(), "a token attends to a later token"
    other_doc = docs[:, :, None] != docs[:, None, :]
    assert not (mask & other_doc).any(), "a token attends to another document"
    # Every token sees itself and every earlier token of its document.
    assert torch.equal(mask, (j <= i) & ~other_doc)


def test_document_causal_mask_with_kv_cache_queries():
    # Two queries that are keys 3 and 4 of a 5-key cache: the last rows of the full mask.
    docs = torch.tensor([[0, 0, 1, 1, 1]])
    part = document_causal_mask(docs[:, 3:], key_document_ids=docs)
    assert torch.equal(part, document_causal_mask(docs)[:, :, 3:])
    explicit = document_causal_mask(docs[:, 3:], key_document_ids=docs, query_positions=torch.tensor([3, 4]))
    assert torch.equal(part, explicit)


def test_build_attention_mask_sdpa():
    plain = build_attention_mask("sdpa", None, 2, 6, torch.device("cpu"))
    assert plain.backend == "sdpa" and plain.dense is None  # is_causal path: no mask tensor
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    packed = build_attention_mask("sdpa", docs, 2, 6, torch.device("cpu"))
    assert torch.equal(packed.dense, document_causal_mask(docs))
    with pytest.raises(ValueError, match="unknown attention backend"):
        build_attention_mask("flash", None, 2, 6, torch.device("cpu"))


def test_flex_block_mask_matches_dense_mask():
    docs = torch.tensor([[0] * 7 + [1] * 9 + [2] * 4, [0] * 13 + [1] * 7])
    flex = build_attention_mask("flex", docs, 2, 20, torch.device("cpu"))
    dense = flex.block_mask.to_dense()  # block-level; check the element-level mask_mod instead
    assert dense.shape[0] == 2
    b, q, k = torch.meshgrid(torch.arange(2), torch.arange(20), torch.arange(20), indexing="ij")
    elementwise = flex.block_mask.mask_mod(b, torch.zeros_like(b), q, k)
    assert torch.equal(elementwise, document_causal_mask(docs)[:, 0])


def _random_qkv(b=2, hq=4, hkv=2, s=20, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d, generator=g)
    return q, k, v


def _reference_attention(q, k, v, allowed):
    """Explicit softmax attention with repeated KV heads; allowed: [B, 1, Sq, Sk] bool."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_attend_packed_gqa_matches_reference(backend):
    q, k, v = _random_qkv()
    docs = torch.tensor([[0] * 7 + [1] * 9 + [2] * 4, [0] * 13 + [1] * 7])
    mask = build_attention_mask(backend, docs, 2, 20, torch.device("cpu"))
    out = attend(q, k, v, mask)
    torch.testing.assert_close(out, _reference_attention(q, k, v, document_causal_mask(docs)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_attend_causal_gqa_matches_reference(backend):
    q, k, v = _random_qkv(seed=1)
    mask = build_attention_mask(backend, None, 2, 20, torch.device("cpu"))
    out = attend(q, k, v, mask)
    causal = torch.ones(20, 20, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(out, _reference_attention(q, k, v, causal), atol=1e-5, rtol=0)


def test_attend_sdpa_with_cached_keys():
    # Sq < Sk without a dense mask: the queries are the last Sq keys (KV-cache decoding).
    q, k, v = _random_qkv(s=12, seed=2)
    full = attend(q, k, v, AttentionMask("sdpa"))
    for sq in (1, 3):
        part = attend(q[:, :, -sq:], k, v, AttentionMask("sdpa"))
        torch.testing.assert_close(part, full[:, :, -sq:], atol=1e-5, rtol=0)


def _packed_batch():
    """Two documents A (len 9) and B (len 11) packed into one row, plus each alone."""
    torch.manual_seed(0)
    a = torch.randint(0, VOCAB, (1, 9))
    b = torch.randint(0, VOCAB, (1, 11))
    tokens = torch.cat([a, b], dim=1)
    document_ids = torch.tensor([[0] * 9 + [1] * 11])
    position_ids = torch.cat([torch.arange(9), torch.arange(11)])[None]
    return a, b, tokens, document_ids, position_ids


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_documents_equal_separate_documents(backend):
    """A and B packed into one row give the same final hidden states and logits as A alone and B alone."""
    model = build_model(preset("tiny", attention_backend=backend), seed=0).eval()
    a, b, tokens, document_ids, position_ids = _packed_batch()
    with torch.no_grad():
        packed = model(tokens, position_ids=position_ids, document_ids=document_ids)
        alone_a = model(a)
        alone_b = model(b)
    torch.testing.assert_close(packed[:, :9], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[:, 9:], alone_b, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(packed[:, 9:]), model.logits(alone_b), atol=1e-5, rtol=0)
    # Without document ids B's tokens see A: the packing really is what makes them equal.
    with torch.no_grad():
        leaked = model(tokens, position_ids=position_ids)
    assert (leaked[:, 9:] - alone_b).abs().max() > 1e-3


def test_sdpa_and_flex_agree_with_packing_and_gqa():
    cfg = preset("tiny")  # 4 heads, 2 query groups: GQA
    assert cfg.num_query_groups < cfg.num_attention_heads
    sdpa = build_model(cfg.replace(attention_backend="sdpa"), seed=3).eval()
    flex = build_model(cfg.replace(attention_backend="flex"), seed=3).eval()
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 20))
    document_ids = torch.tensor([[0] * 6 + [1] * 10 + [2] * 4, [0] * 20])
    position_ids = torch.stack([torch.cat([torch.arange(6), torch.arange(10), torch.arange(4)]), torch.arange(20)])
    with torch.no_grad():
        out_sdpa = sdpa(tokens, position_ids=position_ids, document_ids=document_ids)
        out_flex = flex(tokens, position_ids=position_ids, document_ids=document_ids)
        plain_sdpa = sdpa(tokens)
        plain_flex = flex(tokens)
    torch.testing.assert_close(out_sdpa, out_flex, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain_sdpa, plain_flex, atol=1e-5, rtol=0)


def test_flex_backend_trains_on_cpu():
    """The flex backend must give the same loss and gradients as sdpa in a training step on CPU.

    The module docstring promises an eager (unfused, exact) flex path on CPU, but torch's eager flex_attention
    raises NotImplementedError for inputs that require grad on CPU, so `--attention-backend flex` cannot train
    on CPU (the CPU/gloo layout tests) unless attention.py falls back for the backward.
    """
    cfg = preset("tiny")
    torch.manual_seed(2)
    tokens = torch.randint(0, VOCAB, (1, 16))
    document_ids = torch.tensor([[0] * 7 + [1] * 9])
    position_ids = torch.cat([torch.arange(7), torch.arange(9)])[None]
    labels = torch.roll(tokens, -1, dims=1)
    grads = {}
    for backend in ("sdpa", "flex"):
        model = build_model(cfg.replace(attention_backend=backend), seed=4)
        out = model(tokens, position_ids=position_ids, document_ids=document_ids, labels=labels)
        out.loss.backward()
        grads[backend] = (out.loss.detach(), model.layers["0"].attention.wq.weight.grad.clone())
    torch.testing.assert_close(grads["flex"][0], grads["sdpa"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(grads["flex"][1], grads["sdpa"][1], atol=1e-5, rtol=1e-4)


def test_sdpa_dense_mask_equals_explicit_softmax():
    # The sdpa boolean-mask convention is True = attend (not "True = masked out").
    q, k, v = _random_qkv(b=1, hq=2, hkv=2, s=5, d=8, seed=5)
    docs = torch.tensor([[0, 0, 1, 1, 1]])
    out = attend(q, k, v, AttentionMask("sdpa", dense=document_causal_mask(docs)))
    ref = F.softmax((q @ k.transpose(-1, -2)) / 8 ** 0.5 + torch.where(document_causal_mask(docs), 0.0,
                                                                         float("-inf")), -1) @ v
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_flex_model_decodes_with_kv_cache_and_refuses_packed_cache():
    from engine.model.llama import LayerKVCache

    cfg = preset("tiny").replace(attention_backend="flex")
    model = build_model(cfg, seed=3).eval()
    tokens = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        caches = [LayerKVCache(1, cfg.num_query_groups, 16, cfg.head_dim, torch.float32, torch.device("cpu"))
                  for _ in range(cfg.num_layers)]
        model(tokens[:, :6], kv_caches=caches)
        stepped = [model(tokens[:, i:i + 1], kv_caches=caches) for i in range(6, 9)]
    torch.testing.assert_close(torch.cat(stepped, 1), full[:, 6:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="document_ids cannot be combined with kv_caches"):
        model(tokens[:, :1], document_ids=torch.zeros(1, 1, dtype=torch.long), kv_caches=caches)
