"""FP8 (e4m3, per-block scaled) attention forward + 16-bit backward vs the fp32 reference and the simulated recipe.

CPU: Triton interpreter at small sizes (its fp32 -> fp8 cast is given pre-rounded values, see attention_fp8.py);
GPU: real sizes, skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from chrysalis_kernels.testing import (
    document_ids_from_lengths,
    kernel_device,
    load_kernels,
    random_document_lengths,
    relative_error,
)

ka = load_kernels("attention")
kf = load_kernels("attention_fp8")
DEVICE = kernel_device()
pytestmark = pytest.mark.usefixtures("one_torch_thread")
FP8_TOL = 6e-2


def _inputs(b, hq, hkv, s, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g).to(DEVICE, dtype).requires_grad_() for h in (hq, hkv, hkv)]


def _check(q, k, v, document_ids, block, seed=0):
    out = kf.attention_fp8(q, k, v, document_ids, block=block)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    out.backward(dout)
    ref_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = ka.attention_reference(*ref_inputs, document_ids)
    ref.backward(dout.float())
    assert out.dtype == q.dtype
    assert relative_error(out, ref) <= FP8_TOL
    # Against the recipe simulated in torch (same Q/K/V quantization; only P's e4m3 cast differs).
    simulated = kf.attention_fp8_reference(q.detach(), k.detach(), v.detach(), document_ids, block=block)
    assert relative_error(out, simulated) <= 3e-2
    for name, got, want in [("dq", q.grad, ref_inputs[0].grad), ("dk", k.grad, ref_inputs[1].grad),
                            ("dv", v.grad, ref_inputs[2].grad)]:
        assert torch.isfinite(got).all(), name
        assert relative_error(got, want) <= FP8_TOL, name
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype,hq,hkv,block", [(torch.bfloat16, 4, 1, 16), (torch.float16, 8, 1, 32),
                                                (torch.bfloat16, 2, 2, 32)],
                         ids=["bf16-gqa4-block16", "fp16-mqa8-block32", "bf16-mha-block32"])
def test_fp8_packed_documents(dtype, hq, hkv, block):
    g = torch.Generator().manual_seed(hq + block)
    s = 50
    document_ids = document_ids_from_lengths([random_document_lengths(s, g, max_len=40)], DEVICE)
    q, k, v = _inputs(1, hq, hkv, s, 64, dtype, seed=block)
    _check(q, k, v, document_ids, block)


def test_fp8_head_dim_128():
    q, k, v = _inputs(1, 2, 1, 24, 128, torch.bfloat16, seed=9)
    _check(q, k, v, document_ids_from_lengths([[1, 23]], DEVICE), block=16)


def test_per_block_scales_confine_an_outlier():
    # One outlier token coarsens only its own block's scale; per-tensor scaling would flatten every block.
    x = torch.randn(1, 1, 64, 32, generator=torch.Generator().manual_seed(1))
    x[0, 0, 5] *= 1.0e5  # pushes the other tokens into e4m3's subnormals under one per-tensor scale
    x8, scales = kf.quantize_blocks(x, 16)
    assert x8.dtype == torch.float8_e4m3fn and scales.shape == (1, 1, 4)
    restored = kf.dequantize_blocks(x8, scales, 16)
    assert relative_error(restored[..., 16:, :], x[..., 16:, :]) < 4e-2  # e4m3: 3 mantissa bits
    per_tensor = (x / (x.abs().max() / 448)).to(torch.float8_e4m3fn).float() * (x.abs().max() / 448)
    assert relative_error(per_tensor[..., 16:, :], x[..., 16:, :]) > 0.2
    # The transposed copy (V's layout) holds the same values.
    xt8, _ = kf.quantize_blocks(x, 16, transpose=True)
    assert xt8.shape == x.shape and xt8.stride()[2] == 1
    torch.testing.assert_close(xt8.float(), x8.float(), rtol=0, atol=0)


def test_fp8_thd_layout_and_bad_inputs():
    lengths = [9, 1, 14]
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(24, h, 32, generator=g).to(DEVICE, torch.bfloat16) for h in (2, 1, 1))
    cu = torch.tensor([0, 9, 10, 24], dtype=torch.int32, device=DEVICE)
    out = kf.attention_fp8(q, k, v, cu_seqlens=cu, block=16)
    batched = kf.attention_fp8(*(x.permute(1, 0, 2)[None] for x in (q, k, v)),
                               document_ids_from_lengths([lengths], DEVICE), block=16)
    torch.testing.assert_close(out, batched[0].permute(1, 0, 2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="power of two"):
        kf.attention_fp8(q, k, v, cu_seqlens=cu, block=24)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_gpu_real_size():  # pragma: no cover - GPU only
    s, hq, hkv, d = 8192, 32, 8, 128
    g = torch.Generator().manual_seed(13)
    document_ids = document_ids_from_lengths([random_document_lengths(s, g, max_len=3000)], DEVICE)
    q, k, v = _inputs(1, hq, hkv, s, d, torch.bfloat16, seed=14)
    out = kf.attention_fp8(q, k, v, document_ids)
    out.backward(torch.randn_like(out))
    group = hq // hkv
    ref = ka.attention_reference(q[:, :group].detach().float(), k[:, :1].detach().float(), v[:, :1].detach().float(),
                                 document_ids)
    assert relative_error(out[:, :group], ref) <= FP8_TOL
    assert all(torch.isfinite(t).all() for t in (out, q.grad, k.grad, v.grad))
