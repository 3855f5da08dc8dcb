"""Triton packed-document attention vs its fp32 torch reference (CPU: Triton interpreter at small sizes; GPU: real
sizes, skipped without CUDA)."""

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
DEVICE = kernel_device()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def _inputs(b, hq, hkv, s, d, dtype, seed, layout="bhsd"):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, hq, s, d), (b, hkv, s, d), (b, hkv, s, d)]
    if layout == "bshd":  # the engine's projections: [B, S, H, D] transposed to [B, H, S, D] (strided views)
        return [torch.randn(sh[0], sh[2], sh[1], sh[3], generator=g).to(DEVICE, dtype).transpose(1, 2)
                .requires_grad_() for sh in shapes]
    return [torch.randn(*sh, generator=g).to(DEVICE, dtype).requires_grad_() for sh in shapes]


def _check_against_reference(q, k, v, document_ids, tol, seed=0, **kwargs):
    out = ka.attention(q, k, v, document_ids, **kwargs)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out)
    out.backward(dout)
    ref_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = ka.attention_reference(*ref_inputs, document_ids, **kwargs)
    ref.backward(dout.float())
    assert out.dtype == q.dtype and out.shape == q.shape
    for name, got, want in [("out", out, ref), ("dq", q.grad, ref_inputs[0].grad), ("dk", k.grad, ref_inputs[1].grad),
                            ("dv", v.grad, ref_inputs[2].grad)]:
        assert torch.isfinite(got).all(), f"{name} has NaN/Inf"
        err = relative_error(got, want)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype,hq,hkv", [(torch.bfloat16, 2, 2), (torch.bfloat16, 8, 2), (torch.bfloat16, 8, 1),
                                          (torch.float16, 4, 1), (torch.float32, 8, 1)],
                         ids=["bf16-mha", "bf16-gqa4", "bf16-mqa8", "fp16-gqa4", "fp32-mqa8"])
def test_packed_documents_match_reference(dtype, hq, hkv):
    # Uneven documents (a length-1 document in each row, one longer than several tiles), GQA ratio hq / hkv.
    g = torch.Generator().manual_seed(hq * 7 + hkv + int(dtype.itemsize))
    s = 45
    rows = [random_document_lengths(s, g, max_len=34), random_document_lengths(s, g, max_len=9)]
    document_ids = document_ids_from_lengths(rows, DEVICE)
    q, k, v = _inputs(2, hq, hkv, s, 64, dtype, seed=hq + hkv, layout="bshd" if hkv == 2 else "bhsd")
    _check_against_reference(q, k, v, document_ids, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_head_dim_128_and_one_document_per_row(dtype):
    q, k, v = _inputs(1, 2, 1, 37, 128, dtype, seed=3)
    _check_against_reference(q, k, v, None, TOL[dtype])


def test_odd_head_dim_and_custom_scale():
    q, k, v = _inputs(1, 2, 2, 20, 40, torch.float32, seed=4)  # D=40: padded to a 64-wide tile
    document_ids = document_ids_from_lengths([[7, 1, 12]], DEVICE)
    _check_against_reference(q, k, v, document_ids, TOL[torch.float32], softmax_scale=0.3)


def test_cu_seqlens_thd_layout_matches_batched_layout():
    # flash-attn's varlen layout [T, H, D] with cu_seqlens equals the [1, H, T, D] layout with document ids.
    lengths = [1, 13, 2, 17]
    t = sum(lengths)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(t, h, 32, generator=g).to(DEVICE, torch.bfloat16) for h in (4, 2, 2))
    cu = torch.tensor([0, 1, 14, 16, 33], dtype=torch.int32, device=DEVICE)
    out, lse = ka.attention_with_lse(q, k, v, cu_seqlens=cu)
    document_ids = document_ids_from_lengths([lengths], DEVICE)
    batched, batched_lse = ka.attention_with_lse(*(x.permute(1, 0, 2)[None] for x in (q, k, v)), document_ids)
    assert out.shape == (t, 4, 32) and lse.shape == (4, t)
    torch.testing.assert_close(out, batched[0].permute(1, 0, 2), rtol=0, atol=0)
    torch.testing.assert_close(lse, batched_lse[0], rtol=0, atol=0)
    ref, ref_lse = ka.attention_reference(q, k, v, cu_seqlens=cu, return_lse=True)
    assert relative_error(out, ref) <= TOL[torch.bfloat16]
    assert relative_error(lse, ref_lse) <= 1e-2


def test_fully_masked_blocks_are_skipped():
    # 16 x 16 interpreter tiles. Eight aligned 16-token documents: each query block visits exactly one key block
    # (its own document), against 1..8 blocks for one causal document of the same packed length.
    if not ka.INTERPRET:
        pytest.skip("block counts use the interpreter's fixed tiles")
    s = 128
    q, k, v = (x.detach() for x in _inputs(1, 1, 1, s, 16, torch.float32, seed=6))
    packed = document_ids_from_lengths([[16] * 8], DEVICE)
    _, _, counts = ka.attention_forward(q, k, v, ka.document_bounds(packed), 0.25, count_blocks=True)
    assert counts.flatten().tolist() == [1] * 8
    _, _, counts = ka.attention_forward(q, k, v, ka.document_bounds(batch=1, seq_len=s), 0.25, count_blocks=True)
    assert counts.flatten().tolist() == list(range(1, 9))
    # Unaligned documents: a block visits its documents' key blocks only ([start(first query), last query]).
    lengths = [40, 1, 50, 37]
    bounds = ka.document_bounds(document_ids_from_lengths([lengths], DEVICE))
    _, _, counts = ka.attention_forward(q, k, v, bounds, 0.25, count_blocks=True)
    starts = bounds.start[0].tolist()
    expected = [(m * 16 + 15) // 16 - starts[m * 16] // 16 + 1 for m in range(8)]
    assert counts.flatten().tolist() == expected
    assert sum(expected) < sum(range(1, 9))


def test_bad_inputs_are_rejected():
    q, k, v = (x.detach() for x in _inputs(1, 3, 2, 8, 16, torch.float32, seed=7))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        ka.attention(q, k, v)
    with pytest.raises(ValueError, match="share one of"):
        ka.attention(q, q.half(), q)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ka.attention(q[0, 0:1].permute(1, 0, 2), q[0, 0:1].permute(1, 0, 2), q[0, 0:1].permute(1, 0, 2))
    with pytest.raises(ValueError, match="ends at 7"):
        x = q[0, :2].permute(1, 0, 2)
        ka.attention(x, x, x, cu_seqlens=torch.tensor([0, 3, 7]))
    # fp32 with a head dim past 128 compiles to tiles larger than a GPU's shared memory: refused everywhere.
    wide = torch.randn(1, 1, 4, 136, device=DEVICE)
    with pytest.raises(ValueError, match="fp32 attention supports head dims up to 128"):
        ka.attention(wide, wide, wide)
    ka.attention(wide.bfloat16(), wide.bfloat16(), wide.bfloat16())  # 16-bit: up to 256


def test_cpu_tensors_without_interpreter_get_a_clear_error():
    code = ("import torch\nfrom chrysalis_kernels.attention import attention\nx = torch.randn(1, 1, 4, 16)\n"
            "try:\n    attention(x, x, x)\nexcept RuntimeError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRITON_INTERPRET": "0"})
    assert "TRITON_INTERPRET=1" in result.stdout, result.stdout + result.stderr


_OFFSETS_PAST_2_31 = r"""
import os
import torch
from chrysalis_kernels.attention import attention, attention_reference

s, d = 40, 16
stride = (1 << 31) // (s - 8) + 1  # token stride: the offsets of tokens >= 32 pass 2^31 elements
# One token a (virtual) row of `stride` elements holding [q (2 heads), k, v, dout (2 heads)]: only the pages of
# the 40 rows written are touched (~0.4 GB resident, 5 GB virtual).
big = torch.empty(s * stride + 6 * d, dtype=torch.float16)
values = torch.randn(s, 6 * d, generator=torch.Generator().manual_seed(0)).half()
row_view = big.as_strided((s, 6 * d), (stride, 1))
row_view.copy_(values)
def view(offset, heads):
    return big.as_strided((1, heads, s, d), (0, d, stride, 1), offset)
q, k, v = (view(0, 2).detach().requires_grad_(), view(2 * d, 1).detach().requires_grad_(),
           view(3 * d, 1).detach().requires_grad_())
document_ids = torch.tensor([[0] * 30 + [1] * 10])
out = attention(q, k, v, document_ids)
out.backward(view(4 * d, 2))
small = [t.detach().float().contiguous().requires_grad_() for t in (q, k, v)]
ref = attention_reference(*small, document_ids)
ref.backward(view(4 * d, 2).float())
for name, got, want in [("out", out, ref)] + [(n, t.grad, r.grad) for n, t, r in zip("qkv", (q, k, v), small)]:
    err = float((got.double() - want.double()).norm() / want.double().norm())
    print(name, err)
    assert err < 2e-2, name
"""


def test_token_offsets_past_2_31_elements():
    # Packed rows are one [T, H, D] tensor: T x H x D passes 2^31 at 512k tokens of 32 x 128 heads (or fewer, as
    # a fused-QKV view). The kernels multiplied int32 token indices by int32 strides: the offsets wrapped (a segfault
    # under the interpreter, out-of-bounds reads or writes on a GPU). A subprocess: the old code crashes it.
    result = subprocess.run([sys.executable, "-c", _OFFSETS_PAST_2_31], check=False, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, f"exit {result.returncode}: {result.stdout}{result.stderr[-2000:]}"
    assert result.stdout.split()[::2] == ["out", "q", "k", "v"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_real_size(dtype):  # pragma: no cover - GPU only
    # Seq 8192, 32 query heads (GQA 4), head dim 128, mixed document lengths; reference computed head by head.
    s, hq, hkv, d = 8192, 32, 8, 128
    g = torch.Generator().manual_seed(11)
    document_ids = document_ids_from_lengths([random_document_lengths(s, g, max_len=3000)], DEVICE)
    q, k, v = _inputs(1, hq, hkv, s, d, dtype, seed=12, layout="bshd")
    out = ka.attention(q, k, v, document_ids)
    dout = torch.randn_like(out)
    out.backward(dout)
    group = hq // hkv
    for hk in (0, hkv - 1):  # two KV heads with their query groups keep the fp32 reference's memory small
        ref_in = [q[:, hk * group:(hk + 1) * group], k[:, hk:hk + 1], v[:, hk:hk + 1]]
        ref_in = [t.detach().float().requires_grad_() for t in ref_in]
        ref = ka.attention_reference(*ref_in, document_ids)
        ref.backward(dout[:, hk * group:(hk + 1) * group].float())
        got = [out[:, hk * group:(hk + 1) * group], q.grad[:, hk * group:(hk + 1) * group], k.grad[:, hk:hk + 1],
               v.grad[:, hk:hk + 1]]
        for name, a, want in zip(["out", "dq", "dk", "dv"], got, [ref] + [t.grad for t in ref_in]):
            assert torch.isfinite(a).all(), name
            assert relative_error(a, want) <= TOL[dtype], name
