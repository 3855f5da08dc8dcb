"""Attention masks and backends for packed sequences (engine/model/attention.py, attention_backends.py).

The dense `document_causal_mask` is checked against a brute-force definition; the sdpa and flex backends are
checked against each other and against running each packed document on its own, with grouped-query heads.
The flex block mask is checked block by block against the dense mask, every GPU backend's mask construction is
checked to allocate nothing of size S x S, and the varlen (THD, cu_seqlens) plumbing shared by flash, te and
triton is checked end to end on CPU through a stand-in kernel that attends per document.
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
        build_attention_mask("xformers", None, 2, 6, torch.device("cpu"))


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


def _flex_vs_sdpa_training_step(device: str):
    cfg = preset("tiny")
    torch.manual_seed(2)
    tokens = torch.randint(0, VOCAB, (1, 16)).to(device)
    document_ids = torch.tensor([[0] * 7 + [1] * 9]).to(device)
    position_ids = torch.cat([torch.arange(7), torch.arange(9)])[None].to(device)
    labels = torch.roll(tokens, -1, dims=1)
    grads = {}
    for backend in ("sdpa", "flex"):
        model = build_model(cfg.replace(attention_backend=backend), device=device, seed=4)
        out = model(tokens, position_ids=position_ids, document_ids=document_ids, labels=labels)
        out.loss.backward()
        grads[backend] = (out.loss.detach(), model.layers["0"].attention.wq.weight.grad.clone())
    torch.testing.assert_close(grads["flex"][0], grads["sdpa"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(grads["flex"][1], grads["sdpa"][1], atol=1e-5, rtol=1e-4)


def test_flex_backend_trains_on_cpu(monkeypatch):
    """`--attention-backend flex` trains on CPU with the loss and gradients of sdpa.

    What this does NOT test: the FlexAttention backward. torch has no CPU flex backward (eager flex_attention
    raises NotImplementedError for inputs that require grad), so on CPU `attend` runs the flex mask's dense
    equivalent through SDPA whenever gradients are needed; the forward-only tests above exercise the flex kernel
    itself. The real flex backward is `test_flex_backward_matches_sdpa_on_cuda` (skipped without a GPU).
    """
    from engine.model import attention

    calls = []
    real = attention._flex_attention
    monkeypatch.setattr(attention, "_flex_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    _flex_vs_sdpa_training_step("cpu")
    assert calls == [], "the flex kernel ran with gradients on CPU: the dense fallback this test relies on changed"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the FlexAttention backward needs a GPU (no CPU kernel)")
def test_flex_backward_matches_sdpa_on_cuda(monkeypatch):
    """The real (compiled Triton) FlexAttention backward against SDPA, in a training step on the GPU."""
    from engine.model import attention

    calls = []
    real = attention._flex_attention
    monkeypatch.setattr(attention, "_flex_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    _flex_vs_sdpa_training_step("cuda")
    assert calls, "the flex kernel did not run"


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


# ----------------------------------------------------------------------------------------------- block masks
def _random_packing(b: int, s: int, seed: int, max_doc: int) -> torch.Tensor:
    """[B, S] document ids: random lengths 1..max_doc, padding (-1) after the last document of some rows."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(b):
        ids, doc = [], 0
        while len(ids) < s:
            length = int(torch.randint(1, max_doc + 1, (1,), generator=g))
            ids += [doc] * length
            doc += 1
        row = torch.tensor(ids[:s])
        if r % 2:
            row[s - int(torch.randint(1, s // 3, (1,), generator=g)):] = -1
        rows.append(row)
    return torch.stack(rows)


def _block_mask_to_dense(block_mask, b: int, s: int, block: int) -> torch.Tensor:
    """Element-level [B, S, S] mask of a BlockMask: full blocks are all-true, partial blocks apply mask_mod."""
    nb = -(-s // block)
    out = torch.zeros(b, nb * block, nb * block, dtype=torch.bool)
    q = torch.arange(nb * block)
    for r in range(b):
        for i in range(nb):
            for kind, nums, idx in (("partial", block_mask.kv_num_blocks, block_mask.kv_indices),
                                    ("full", block_mask.full_kv_num_blocks, block_mask.full_kv_indices)):
                for j in idx[r, 0, i, :int(nums[r, 0, i])].tolist():
                    qs, ks = q[i * block:(i + 1) * block], q[j * block:(j + 1) * block]
                    if kind == "full":
                        tile = torch.ones(block, block, dtype=torch.bool)
                    else:
                        tile = block_mask.mask_mod(torch.tensor(r), torch.tensor(0), qs[:, None], ks[None, :])
                    out[r, i * block:(i + 1) * block, j * block:(j + 1) * block] = tile
    return out[:, :s, :s]


@pytest.mark.parametrize("s, block, max_doc", [(37, 8, 9), (64, 8, 30), (50, 16, 3)])
def test_document_block_mask_equals_dense_mask(s, block, max_doc):
    """Block structure (which blocks are skipped, which run without mask_mod) reproduces the dense mask exactly,
    with documents of length 1, documents spanning blocks, padding, and S not a multiple of the block size."""
    from engine.model.attention import document_block_mask

    docs = _random_packing(3, s, seed=s + block, max_doc=max_doc)
    bm = document_block_mask(docs, 3, s, torch.device("cpu"), block_size=block)
    dense = _block_mask_to_dense(bm, 3, s, block)
    torch.testing.assert_close(dense, document_causal_mask(docs)[:, 0], rtol=0, atol=0)
    # Skipping is real: fewer kv blocks are visited than the causal lower triangle holds.
    visited = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())
    nb = -(-s // block)
    assert visited < 3 * nb * (nb + 1) // 2
    assert int(bm.full_kv_num_blocks.sum()) > 0 or max_doc < 2 * block


class _LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", ["flex", "sdpa-gpu", "flash", "te", "triton", "triton-fp8"])
def test_gpu_mask_construction_allocates_no_s_by_s_tensor(backend):
    """The masks of every GPU path are built without any [S, S]-sized tensor (the check is device-agnostic:
    the same construction runs on CUDA). The dense CPU reference is the control that the tracker can fail."""
    b, s = 2, 2048
    docs = _random_packing(b, s, seed=0, max_doc=700)
    name = "sdpa" if backend == "sdpa-gpu" else backend
    with _LargestAllocation() as tracker:
        mask = build_attention_mask(name, docs, b, s, torch.device("cpu"), dense_allowed=False)
    assert mask.dense is None
    assert tracker.largest < s * s // 64, f"{backend}: a {tracker.largest}-element tensor was allocated"
    if name != "flex":
        assert mask.varlen and mask.cu_seqlens.dtype == torch.int32
        lengths = (mask.cu_seqlens[1:] - mask.cu_seqlens[:-1]).tolist()
        runs = [len(list(g)) for r in range(b) for _, g in __import__("itertools").groupby(docs[r].tolist())]
        assert lengths == runs and mask.max_seqlen == max(runs)
    with _LargestAllocation() as control:
        build_attention_mask("sdpa", docs, b, s, torch.device("cpu"), dense_allowed=True)
    assert control.largest >= b * s * s


# ----------------------------------------------------------------------------------------------- registry
def test_backend_registry_on_cpu(monkeypatch):
    from engine.model.attention_backends import (AttentionBackendUnavailable, available_attention_backends,
                                                 resolve_attention_backend)

    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_attention_backend("auto", cpu) == "sdpa"
    assert resolve_attention_backend("flex", cpu) == "flex"
    reasons = available_attention_backends(cpu)
    assert reasons["sdpa"] is None and reasons["flex"] is None
    for name, words in (("flash", "CUDA"), ("te", "CUDA"), ("triton", "TRITON_INTERPRET"),
                        ("triton-fp8", "TRITON_INTERPRET")):
        with pytest.raises(AttentionBackendUnavailable, match=f"--attention-backend {name}: .*{words}"):
            resolve_attention_backend(name, cpu)
    with pytest.raises(AttentionBackendUnavailable, match="unknown attention backend"):
        resolve_attention_backend("xformers", cpu)


def test_triton_backend_reports_a_missing_kernel_module(monkeypatch):
    import sys
    import types

    from engine.model.attention_backends import unavailable_reason

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "chrysalis_kernels.attention", types.ModuleType("chrysalis_kernels.attention"))
    assert "has no packed_attention()" in unavailable_reason("triton", torch.device("cpu"))
    assert "has no packed_attention_fp8()" in unavailable_reason("triton-fp8", torch.device("cpu"))


# ----------------------------------------------------------------------------------------------- varlen plumbing
def _per_document_kernel(q, k, v, cu_seqlens, max_seqlen, *, causal=True, softmax_scale=None):
    """A stand-in for a varlen kernel with the documented interface: SDPA on each document separately."""
    assert q.dim() == 3 and cu_seqlens.dtype == torch.int32 and causal
    bounds = cu_seqlens.tolist()
    assert bounds[0] == 0 and bounds[-1] == q.shape[0] and max(b - a for a, b in zip(bounds, bounds[1:])) == max_seqlen
    outs = []
    for a, b in zip(bounds, bounds[1:]):
        # [T_doc, heads, D] -> [1, heads, T_doc, D]
        qd, kd, vd = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True,
                                                   enable_gqa=q.shape[1] != k.shape[1])[0].transpose(0, 1))
    return torch.cat(outs)


def _restarting_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] position of each token within its document."""
    from engine.model.attention import document_segments

    segments = document_segments(document_ids)
    first = torch.zeros_like(segments)
    for r in range(segments.shape[0]):
        starts = torch.cat([torch.tensor([True]), segments[r, 1:] != segments[r, :-1]]).nonzero().squeeze(1)
        first[r] = starts[segments[r].long()]
    return torch.arange(segments.shape[1])[None] - first


@pytest.fixture
def stand_in_triton_kernels(monkeypatch):
    """`chrysalis_kernels.attention` replaced by the per-document stand-in, runnable on CPU."""
    import sys
    import types

    module = types.ModuleType("chrysalis_kernels.attention")
    module.packed_attention = _per_document_kernel
    module.packed_attention_fp8 = _per_document_kernel
    monkeypatch.setitem(sys.modules, "chrysalis_kernels.attention", module)
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_varlen_backend_matches_sdpa_in_a_training_step(stand_in_triton_kernels, dtype, tol):
    """The THD/cu_seqlens path (shared by flash, te and triton) gives the dense SDPA reference's loss and
    gradients on packed rows with GQA, documents of length 1 and padding: fp32 1e-5, bf16 2e-2."""
    from engine.model.attention_backends import resolve_attention_backend

    assert resolve_attention_backend("triton", torch.device("cpu")) == "triton"
    cfg = preset("tiny")
    torch.manual_seed(5)
    tokens = torch.randint(0, VOCAB, (2, 24))
    document_ids = torch.tensor([[0] * 5 + [1] + [2] * 18, [0] * 11 + [1] * 9 + [-1] * 4])
    position_ids = _restarting_positions(document_ids)
    labels = torch.roll(tokens, -1, dims=1)
    results = {}
    for backend in ("sdpa", "triton"):
        model = build_model(cfg.replace(attention_backend=backend), seed=6, dtype=dtype)
        out = model(tokens, position_ids=position_ids, document_ids=document_ids, labels=labels)
        out.loss.backward()
        results[backend] = (out.loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                                        if n.startswith("layers.")})
    torch.testing.assert_close(results["triton"][0], results["sdpa"][0], rtol=tol, atol=tol)
    for name, grad in results["sdpa"][1].items():
        scale = grad.abs().max().clamp(min=1e-6)
        err = (results["triton"][1][name] - grad).abs().max() / scale
        assert err <= (1e-5 if dtype == torch.float32 else 2e-2), f"{name}: relative gradient error {err:.2e}"


def test_flex_forward_bf16_matches_sdpa():
    cfg = preset("tiny")
    torch.manual_seed(7)
    tokens = torch.randint(0, VOCAB, (2, 40))
    docs = _random_packing(2, 40, seed=3, max_doc=9)
    outs = {}
    for backend in ("sdpa", "flex"):
        model = build_model(cfg.replace(attention_backend=backend), seed=8, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            outs[backend] = model(tokens, document_ids=docs).float()
    err = (outs["flex"] - outs["sdpa"]).abs().max() / outs["sdpa"].abs().max()
    assert err <= 2e-2
