"""Fused RMSNorm + residual, rotary, continuous-token head loss and linear cross-entropy vs their torch references
(CPU: Triton interpreter at small sizes; GPU: real sizes, skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from chrysalis_kernels.testing import document_ids_from_lengths, kernel_device, load_kernels, relative_error

rmsnorm = load_kernels("rmsnorm")
rotary = load_kernels("rotary")
head = load_kernels("visual_head_loss")
lce = load_kernels("linear_cross_entropy")
DEVICE = kernel_device()
pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0, grad=True):
    t = (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE, dtype)
    return t.requires_grad_(grad)


def _leaf32(*tensors):
    return [t.detach().float().requires_grad_() for t in tensors]


def _assert_close(pairs, tol):
    for name, got, want in pairs:
        assert got is not None and torch.isfinite(got).all(), f"{name}: missing or non-finite"
        err = relative_error(got, want)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


# ------------------------------------------------------------------------------------------------ RMSNorm
@DTYPES
def test_add_rms_norm_matches_reference(dtype):
    x, res = _randn(3, 5, 72, dtype=dtype, seed=1), _randn(3, 5, 72, dtype=dtype, seed=2)  # 72: a masked tail
    w = (1 + _randn(72, seed=3, scale=0.1, grad=False)).to(dtype).requires_grad_()
    y, h = rmsnorm.add_rms_norm(x, res, w, 1e-5)
    dy, dh = _randn(3, 5, 72, seed=4, grad=False).to(dtype), _randn(3, 5, 72, seed=5, grad=False).to(dtype)
    torch.autograd.backward([y, h], [dy, dh])
    xr, rr, wr = _leaf32(x, res, w)
    yr, hr = rmsnorm.add_rms_norm_reference(xr, rr, wr, 1e-5)
    torch.autograd.backward([yr, hr], [dy.float(), dh.float()])
    assert y.dtype == h.dtype == dtype and y.shape == x.shape
    _assert_close([("y", y, yr), ("h", h, hr), ("dx", x.grad, xr.grad), ("dresidual", res.grad, rr.grad),
                   ("dweight", w.grad, wr.grad)], TOL[dtype])


def test_rms_norm_without_residual_matches_the_engine_module():
    from engine.model.llama import RMSNorm

    module = RMSNorm(40, 1e-6)
    module.weight.data = 1 + 0.1 * torch.randn(40, generator=torch.Generator().manual_seed(6))
    x = _randn(9, 40, seed=7)
    y = rmsnorm.rms_norm(x, module.weight.to(DEVICE), 1e-6)
    x_ref = x.detach().cpu().requires_grad_()
    ref = module(x_ref)
    dy = torch.randn(9, 40, generator=torch.Generator().manual_seed(8))
    y.backward(dy.to(DEVICE))
    ref.backward(dy)
    _assert_close([("y", y.cpu(), ref), ("dx", x.grad.cpu(), x_ref.grad)], 1e-5)


# ------------------------------------------------------------------------------------------------ rotary
@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 64)],
                         ids=["bf16-d128", "fp16-d64", "fp32-d64"])
def test_rotary_positions_restart_at_each_document(dtype, head_dim):
    from engine.config import RopeScaling
    from engine.model.llama import rope_inverse_frequencies

    inv_freq = rope_inverse_frequencies(head_dim, 500000.0, RopeScaling()).to(DEVICE)  # Llama-3.1 scaling
    document_ids = document_ids_from_lengths([[3, 1, 6], [10]], DEVICE)
    q, k = _randn(2, 10, 4, head_dim, dtype=dtype, seed=9), _randn(2, 10, 1, head_dim, dtype=dtype, seed=10)
    qo, ko = rotary.apply_rotary(q, k, inv_freq, document_ids=document_ids)
    positions = rotary.positions_from_documents(document_ids)
    assert positions.tolist() == [[0, 1, 2, 0, 0, 1, 2, 3, 4, 5], list(range(10))]
    dq, dk = _randn(*qo.shape, seed=11, grad=False).to(dtype), _randn(*ko.shape, seed=12, grad=False).to(dtype)
    torch.autograd.backward([qo, ko], [dq, dk])
    qr, kr = _leaf32(q, k)
    qro, kro = rotary.apply_rotary_reference(qr, positions, inv_freq), rotary.apply_rotary_reference(kr, positions,
                                                                                                      inv_freq)
    torch.autograd.backward([qro, kro], [dq.float(), dk.float()])
    _assert_close([("q", qo, qro), ("k", ko, kro), ("dq", q.grad, qr.grad), ("dk", k.grad, kr.grad)], TOL[dtype])
    # Explicit position ids and the THD/cu_seqlens layout give the same rotation.
    qp, _ = rotary.apply_rotary(q.detach(), k.detach(), inv_freq, position_ids=positions)
    torch.testing.assert_close(qp, qo.detach(), rtol=0, atol=0)
    cu = torch.tensor([0, 3, 4, 10, 20], dtype=torch.int32, device=DEVICE)
    qt, kt = rotary.apply_rotary(q.detach().reshape(20, 4, head_dim), k.detach().reshape(20, 1, head_dim), inv_freq,
                                 cu_seqlens=cu)
    torch.testing.assert_close(qt, qo.detach().reshape(20, 4, head_dim), rtol=0, atol=0)
    torch.testing.assert_close(kt, ko.detach().reshape(20, 1, head_dim), rtol=0, atol=0)


def test_rotary_matches_the_engine_convention():
    from engine.config import ModelConfig
    from engine.model.llama import RotaryEmbedding, apply_rotary

    cfg = ModelConfig(vocab_size=64, hidden_size=64, ffn_hidden_size=64, num_layers=1, num_attention_heads=2,
                      seq_length=16, max_position_embeddings=16)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    cos, sin = RotaryEmbedding(cfg)(positions, torch.float32)
    q = _randn(1, 8, 2, 32, seed=13, grad=False)
    inv_freq = RotaryEmbedding(cfg).inverse_frequencies(torch.device("cpu")).to(DEVICE)
    qo, _ = rotary.apply_rotary(q, q[:, :, :1], inv_freq, position_ids=positions.to(DEVICE))
    assert relative_error(qo.cpu(), apply_rotary(q.cpu(), cos, sin)) <= 1e-6


# ------------------------------------------------------------------------------------------------ head loss
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_visual_head_loss_matches_reference(dtype):
    h, dv, m = 48, 40, 7
    x = _randn(m, h, dtype=dtype, seed=14)
    targets = _randn(m, dv, dtype=torch.bfloat16, seed=15, grad=False)
    params = [_randn(h, h, dtype=dtype, seed=16, scale=0.2), _randn(h, dtype=dtype, seed=17, scale=0.1),
              _randn(dv, h, dtype=dtype, seed=18, scale=0.2), _randn(dv, dtype=dtype, seed=19, scale=0.1)]
    loss = head.visual_head_loss_sum(x, targets, *params)
    loss.backward(torch.tensor(1.7, device=DEVICE))
    refs = _leaf32(x, *params)
    ref = head.visual_head_loss_reference(refs[0], targets, *refs[1:])
    (ref * 1.7).backward()
    assert loss.dtype == torch.float32
    _assert_close([("loss", loss, ref), ("dx", x.grad, refs[0].grad)]
                  + [(f"d{n}", p.grad, r.grad) for n, p, r in zip(["w1", "b1", "w2", "b2"], params, refs[1:])],
                  TOL[dtype])


def test_visual_head_loss_matches_the_engine_head_under_autocast_and_with_no_rows():
    from engine.model.losses import visual_cosine_loss_sum
    from engine.model.vpit import ContinuousTokenHead

    torch.manual_seed(20)
    module = ContinuousTokenHead(32, 24).to(DEVICE)
    x = _randn(5, 32, seed=21)
    targets = _randn(5, 24, seed=22, grad=False)
    args = (module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        fused = head.visual_head_loss_sum(x, targets, *args)
        ref = visual_cosine_loss_sum(module(x), targets)
    assert abs(fused.item() - ref.item()) <= 2e-2 * abs(ref.item())
    fused.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in module.parameters())
    module.zero_grad()
    empty = head.visual_head_loss_sum(x[:0], targets[:0], *args)
    empty.backward()
    assert empty.item() == 0.0 and all(p.grad is not None and not p.grad.any() for p in module.parameters())


def test_strided_norm_weight_and_head_biases():
    # The kernels read the RMSNorm weight and the head's biases with unit stride; a strided view (a slice of a
    # stacked parameter) was read as if contiguous: RMSNorm off by 4.4 (absolute), the head loss 4.40 for 4.55.
    stacked = _randn(36, 2, seed=40)
    x = _randn(3, 36, seed=41)
    y = rmsnorm.rms_norm(x, stacked[:, 0])
    y.backward(torch.ones_like(y))
    xr, sr = _leaf32(x, stacked)
    yr, _ = rmsnorm.add_rms_norm_reference(xr, None, sr[:, 0])
    yr.backward(torch.ones_like(yr))
    _assert_close([("y", y, yr), ("dx", x.grad, xr.grad), ("dweight", stacked.grad, sr.grad)], 1e-5)
    xh, t = _randn(5, 8, seed=42), _randn(5, 12, seed=43, grad=False)
    w1, w2, biases = _randn(10, 8, seed=44), _randn(12, 10, seed=45), _randn(12, 2, seed=46)
    loss = head.visual_head_loss_sum(xh, t, w1, biases[:10, 0], w2, biases[:, 1])  # stride 2
    loss.backward()
    refs = _leaf32(xh, w1, w2, biases)
    ref = head.visual_head_loss_reference(refs[0], t, refs[1], refs[3][:10, 0], refs[2], refs[3][:, 1])
    ref.backward()
    _assert_close([("loss", loss, ref)] + [(n, a.grad, r.grad) for n, a, r in
                                           zip(("dx", "dw1", "dw2", "dbias"), (xh, w1, w2, biases), refs)], 1e-5)


# ------------------------------------------------------------------------------------------------ linear CE
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_linear_cross_entropy_matches_reference_with_padding_and_ignored_rows(dtype):
    n, h, v, real = 37, 32, 203, 190  # odd sizes; 13 padded vocabulary rows
    x, w = _randn(n, h, dtype=dtype, seed=23), _randn(v, h, dtype=dtype, seed=24, scale=0.3)
    labels = torch.randint(0, real, (n,), generator=torch.Generator().manual_seed(25)).to(DEVICE)
    labels[[3, 10]] = -100
    loss = lce.linear_cross_entropy_sum(x, w, labels, real_vocab_size=real, chunk_rows=8)  # five chunks
    loss.backward(torch.tensor(0.5, device=DEVICE))
    xr, wr = _leaf32(x, w)
    ref = lce.linear_cross_entropy_reference(xr, wr, labels, real)
    (ref * 0.5).backward()
    _assert_close([("loss", loss, ref), ("dx", x.grad, xr.grad), ("dw", w.grad, wr.grad)], TOL[dtype])
    assert not w.grad[real:].any(), "padded vocabulary rows must get exactly zero gradient"
    assert not x.grad[[3, 10]].any(), "ignored rows must get exactly zero gradient"


def test_linear_cross_entropy_matches_the_engine_loss_under_autocast():
    from engine.model.losses import text_cross_entropy_sum

    x, w = _randn(20, 24, seed=26), _randn(50, 24, seed=27, scale=0.3)
    labels = torch.randint(0, 45, (20,), generator=torch.Generator().manual_seed(28)).to(DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        fused = lce.linear_cross_entropy_sum(x, w, labels, real_vocab_size=45, chunk_rows=6)
    fused.backward()
    xr, wr = _leaf32(x, w)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        ref = text_cross_entropy_sum(xr @ wr.t(), labels, 45)
    ref.backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32
    _assert_close([("loss", fused, ref), ("dx", x.grad, xr.grad), ("dw", w.grad, wr.grad)], 2e-2)


def test_linear_cross_entropy_needs_no_logits_without_grad():
    x, w = _randn(9, 16, seed=29, grad=False), _randn(30, 16, seed=30, grad=False)
    labels = torch.arange(9, device=DEVICE)
    with torch.no_grad():
        loss = lce.linear_cross_entropy_sum(x, w, labels, chunk_rows=4)
    assert relative_error(loss, lce.linear_cross_entropy_reference(x, w, labels)) <= 1e-5
    with pytest.raises(ValueError, match="labels"):
        lce.linear_cross_entropy_sum(x, w, labels[:3])


def test_linear_cross_entropy_refuses_labels_outside_the_vocabulary():
    # A label past the vocabulary, in its padding, or negative (other than ignore_index) was scored as a target logit
    # of 0: a finite, wrong loss where F.cross_entropy raises (or gives inf for a padding column).
    x, w = _randn(4, 16, seed=35, grad=False), _randn(20, 16, seed=36, grad=False)
    for bad in (25, 18, -5):
        labels = torch.tensor([1, 2, bad, -100], device=DEVICE)
        with pytest.raises(ValueError, match=rf"outside the vocabulary \[0, 17\) \(first: {bad}\)"):
            lce.linear_cross_entropy_sum(x, w, labels, real_vocab_size=17)
    labels = torch.tensor([0, 16, -100, 19], device=DEVICE)  # no padding: all 20 rows are tokens
    with pytest.raises(ValueError, match="first: 16"):
        lce.linear_cross_entropy_sum(x, w, labels, real_vocab_size=16)
    loss = lce.linear_cross_entropy_sum(x, w, labels)
    assert relative_error(loss, lce.linear_cross_entropy_reference(x, w, labels)) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_kernels_gpu_real_size():  # pragma: no cover - GPU only
    n, h, v = 8192, 4096, 128256
    x, w = _randn(n, h, dtype=torch.bfloat16, seed=31), _randn(v, h, dtype=torch.bfloat16, seed=32, scale=0.02)
    labels = torch.randint(0, v - 56, (n,), device=DEVICE)
    loss = lce.linear_cross_entropy_sum(x, w, labels, real_vocab_size=v - 56)
    loss.backward()
    rows = slice(0, 512)  # reference on a slice of the rows keeps its logits small
    xr, wr = _leaf32(x[rows], w)
    ref = lce.linear_cross_entropy_reference(xr, wr, labels[rows], v - 56)
    part = lce.linear_cross_entropy_sum(x[rows].detach(), w.detach(), labels[rows], real_vocab_size=v - 56)
    assert relative_error(part, ref) <= 2e-2 and torch.isfinite(loss)
    y, hh = rmsnorm.add_rms_norm(_randn(n, h, dtype=torch.bfloat16, seed=33),
                                 _randn(n, h, dtype=torch.bfloat16, seed=34), torch.ones(h, device=DEVICE))
    yr, _ = rmsnorm.add_rms_norm_reference(hh.detach(), None, torch.ones(h, device=DEVICE))
    assert relative_error(y, yr) <= 2e-2
