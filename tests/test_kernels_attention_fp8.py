"""FP8 (e4m3, per-block scaled) attention forward + 16-bit backward vs the fp32 reference and the simulated recipe.

CPU: Triton interpreter at small sizes (its fp32 -> fp8 cast is given pre-rounded values, see attention_fp8.py);
GPU: real sizes, skipped without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys

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


@pytest.mark.parametrize("dtype,hq,hkv,block", [(torch.bfloat16, 4, 1, 64), (torch.float16, 8, 1, 32),
                                                (torch.bfloat16, 2, 2, 32)],
                         ids=["bf16-gqa4-block64", "fp16-mqa8-block32", "bf16-mha-block32"])
def test_fp8_packed_documents(dtype, hq, hkv, block):
    g = torch.Generator().manual_seed(hq + block)
    s = 50
    document_ids = document_ids_from_lengths([random_document_lengths(s, g, max_len=40)], DEVICE)
    q, k, v = _inputs(1, hq, hkv, s, 64, dtype, seed=block)
    _check(q, k, v, document_ids, block)


def test_fp8_head_dim_128():
    q, k, v = _inputs(1, 2, 1, 24, 128, torch.bfloat16, seed=9)
    _check(q, k, v, document_ids_from_lengths([[1, 23]], DEVICE), block=32)


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
    out = kf.attention_fp8(q, k, v, cu_seqlens=cu, block=32)
    batched = kf.attention_fp8(*(x.permute(1, 0, 2)[None] for x in (q, k, v)),
                               document_ids_from_lengths([lengths], DEVICE), block=32)
    torch.testing.assert_close(out, batched[0].permute(1, 0, 2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="power of two"):
        kf.attention_fp8(q, k, v, cu_seqlens=cu, block=24)
    # A 16-token block would need 16-key tiles: an FP8 MMA reducing over 16 does not compile on NVIDIA GPUs.
    with pytest.raises(ValueError, match="power of two >= 32"):
        kf.attention_fp8(q, k, v, cu_seqlens=cu, block=16)


_COMPILE_FOR_HOPPER = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import chrysalis_kernels.attention as ka
import chrysalis_kernels.attention_fp8 as kf

assert not kf.INTERPRET
kernel = kf._attn_fp8_fwd_kernel
launches = []


class Recorder:  # stands in for the kernel: records what the host code launches (no GPU here)
    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append((args, kwargs))


kf._attn_fp8_fwd_kernel = Recorder()
for d, block in ((16, 128), (80, 32)):
    q = torch.randn(1, 2, 40, d, dtype=torch.bfloat16)
    kf.attention_fp8_forward(q, q[:, :1], q[:, :1], ka.document_bounds(batch=1, seq_len=40), 0.1, block)
for args, kwargs in launches:
    options = {"num_warps": kwargs.pop("num_warps"), "num_stages": kwargs.pop("num_stages")}
    pointers = {"Q": "*fp8e4nv", "K": "*fp8e4nv", "V": "*fp8e4nv", "O": "*bf16", "DOC_START": "*i32"}
    signature = {}
    for name, value in zip(kernel.arg_names, list(args) + [None] * len(kwargs)):
        signature[name] = "constexpr" if name in kwargs else pointers.get(name, "*fp32" if torch.is_tensor(value)
                                                                          else "fp32" if isinstance(value, float)
                                                                          else "i32")
    triton.compile(ASTSource(kernel, signature, kwargs), target=GPUTarget("cuda", 90, 32), options=options)
    print("compiled", kwargs["HEAD_DIM"], kwargs["BLOCK_N"])
"""


def test_fp8_kernel_compiles_for_hopper():
    # The interpreter runs any tile; an sm_90 compile (no GPU needed) checks the host's launch shapes against
    # Triton's NVIDIA limits: head dim 16 gave a 16-deep FP8 MMA ("K >= 32") that only failed on the GPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, check=False, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["compiled", "16", "128", "compiled", "80", "32"]


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
