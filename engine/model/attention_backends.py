"""The `--attention-backend` registry: which backends exist, which this process can run, `auto`, and the calls
into the optional varlen kernels (flash-attn, Transformer Engine, our Triton kernels).

Megatron-LM's `--attention-backend {flash,fused,unfused,local,auto}` picks among TE's kernels; ours picks among
whole libraries, and the same rule holds: a backend named explicitly that this process cannot run is an error
at start (`resolve_attention_backend`), never a silent fallback. Only `auto` chooses, and it says what it chose.

`auto` order on CUDA (fastest first, from the published Hopper figures, not measured here): flash-attn 3
(FlashAttention-3, Hopper-only), Transformer Engine (cuDNN fused attention, as in the NGC container),
flash-attn 2, then FlexAttention (always available on CUDA). Our Triton kernels are selected only by name until
a GPU benchmark shows them faster. On CPU `auto` is `sdpa`, the reference.

Interface for `chrysalis_kernels.attention` (the kernels issue, `--attention-backend triton|triton-fp8`):

    packed_attention(q, k, v, cu_seqlens, max_seqlen, *, causal=True, softmax_scale=None) -> out
    packed_attention_fp8(q, k, v, cu_seqlens, max_seqlen, *, causal=True, softmax_scale=None) -> out

    q: [T, Hq, D]; k, v: [T, Hkv, D] with Hq % Hkv == 0 (GQA/MQA), T = B * S packed tokens, bf16 or fp16
        (fp32 accepted for tests), D in {64, 128}; contiguous THD layout.
    cu_seqlens: int32 [N + 1] on q's device, cu_seqlens[0] = 0, cu_seqlens[-1] = T; document n is tokens
        cu_seqlens[n]:cu_seqlens[n + 1]. Documents have length >= 1 and never span a row boundary.
    max_seqlen: host int, the longest document (grid sizing).
    causal: attention is causal within each document and never crosses documents (always True here).
    softmax_scale: None means 1 / sqrt(D).
    Returns out [T, Hq, D] in q's dtype, differentiable with respect to q, k and v (an autograd.Function whose
    backward returns dq, dk, dv). The fp8 variant quantises Q, K, V to e4m3 with per-block scales in the forward
    and runs a bf16 backward.

The kernels run on CUDA, and on CPU tensors under `TRITON_INTERPRET=1` (the interpreter tests), so the Triton
backends are available on CPU only with that variable set.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

ATTENTION_BACKENDS = ("sdpa", "flex", "flash", "te", "triton", "triton-fp8")
BACKEND_CHOICES = ("auto",) + ATTENTION_BACKENDS
TRITON_KERNEL_MODULE = "chrysalis_kernels.attention"
TRITON_FUNCTIONS = {"triton": "packed_attention", "triton-fp8": "packed_attention_fp8"}


class AttentionBackendUnavailable(ValueError):
    """An explicitly requested attention backend cannot run in this process (the message says why and what to do);
    a ValueError, so the CLI reports it as a configuration error."""


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _flash_attn_module():
    """flash-attn 3 (`flash_attn_interface`, Hopper) when installed, else flash-attn 2 (`flash_attn`), else None."""
    for name in ("flash_attn_interface", "flash_attn"):
        if _has(name):
            return importlib.import_module(name)
    return None


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend `name` can run on `device`, else a sentence saying why not and what to do."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if name == "sdpa":
        return None
    if name == "flex":
        if not _has("torch.nn.attention.flex_attention"):
            return f"FlexAttention needs torch >= 2.5 (this is {torch.__version__})"
        return None
    if name == "flash":
        if not cuda:
            return "flash-attn runs on CUDA GPUs only; use --attention-backend sdpa or flex on CPU"
        if not (_has("flash_attn_interface") or _has("flash_attn")):
            return "flash-attn is not installed (pip install flash-attn, or flash-attn 3's flash_attn_interface)"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "flash-attn needs an Ampere or newer GPU (compute capability >= 8.0)"
        return None
    if name == "te":
        if not cuda:
            return "Transformer Engine attention runs on CUDA GPUs only; use --attention-backend sdpa or flex on CPU"
        if not _has("transformer_engine"):
            return "transformer_engine is not installed (use the NGC PyTorch container or pip install " \
                   "transformer-engine[pytorch])"
        return None
    if name in TRITON_FUNCTIONS:
        if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            return f"the Triton kernels run on CUDA GPUs (or on CPU with TRITON_INTERPRET=1); {name} cannot run " \
                   f"on {device.type}"
        if not _has("triton"):
            return "triton is not installed (pip install triton)"
        try:
            module = importlib.import_module(TRITON_KERNEL_MODULE)
        except ImportError as err:
            return f"{TRITON_KERNEL_MODULE} is not importable ({err}); the Triton attention kernels are not built yet"
        if not hasattr(module, TRITON_FUNCTIONS[name]):
            return f"{TRITON_KERNEL_MODULE} has no {TRITON_FUNCTIONS[name]}() (see the interface in " \
                   "engine/model/attention_backends.py)"
        if name == "triton-fp8" and cuda and torch.cuda.get_device_capability(device) < (8, 9):
            return "FP8 attention needs FP8 tensor cores (compute capability >= 8.9: Ada, Hopper or newer); use " \
                   "--attention-backend triton on this GPU"
        return None
    return f"unknown attention backend {name!r}; choose one of {', '.join(BACKEND_CHOICES)}"


def triton_kernels_unavailable_reason(device: torch.device) -> str | None:
    """None when `chrysalis_kernels`' Triton kernels (fused losses, attention) can run on `device` in this process,
    else why not. Triton fixes compiled vs interpreted when the kernels are imported (`TRITON_INTERPRET`), so the
    check is made at start rather than at the first kernel call, several minutes into a job."""
    device = torch.device(device)
    if not _has("triton"):
        return "triton is not installed (pip install triton)"
    interpret = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
    if device.type == "cuda" and interpret:
        return "TRITON_INTERPRET is set (the CPU interpreter) but training runs on CUDA: unset it"
    if device.type != "cuda" and not interpret:
        return (f"the Triton kernels run on CUDA GPUs (or on CPU with TRITON_INTERPRET=1, slow); they cannot run on "
                f"{device.type}: drop the flag")
    return None


def available_attention_backends(device: torch.device) -> dict[str, str | None]:
    """{backend: None if it can run on `device`, else why not}."""
    return {name: unavailable_reason(name, device) for name in ATTENTION_BACKENDS}


def auto_attention_backend(device: torch.device) -> str:
    """The fastest backend available on `device` (see the module docstring for the order and why)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "sdpa"
    if _has("flash_attn_interface") and torch.cuda.get_device_capability(device) >= (9, 0):
        return "flash"
    if unavailable_reason("te", device) is None:
        return "te"
    if unavailable_reason("flash", device) is None:
        return "flash"
    return "flex"


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """`auto` -> the fastest available backend; an explicit name -> itself, or AttentionBackendUnavailable."""
    if name == "auto":
        return auto_attention_backend(device)
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise AttentionBackendUnavailable(f"--attention-backend {name}: {reason}")
    return name


# ----------------------------------------------------------------------------------------------- varlen calls
def varlen_attention(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int) -> torch.Tensor:
    """Document-causal attention on THD tensors: q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
    if backend == "sdpa":
        from torch.nn.attention.varlen import varlen_attn

        # torch's own flash varlen kernel (CUDA); window (-1, 0) = causal.
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, window_size=(-1, 0),
                           enable_gqa=q.shape[1] != k.shape[1])
    if backend == "flash":
        out = _flash_attn_module().flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                          causal=True)
        return out[0] if isinstance(out, tuple) else out  # flash-attn 3 may return (out, lse)
    if backend == "te":
        return _te_attention(q, k, v, cu_seqlens, max_seqlen)
    if backend in TRITON_FUNCTIONS:
        kernel = getattr(importlib.import_module(TRITON_KERNEL_MODULE), TRITON_FUNCTIONS[backend])
        return kernel(q, k, v, cu_seqlens, max_seqlen, causal=True)
    raise ValueError(f"{backend!r} is not a varlen attention backend")


@functools.cache
def _te_module(heads: int, kv_heads: int, head_dim: int):
    """One TE DotProductAttention per local head layout (tensor parallelism shards heads), THD format."""
    from transformer_engine.pytorch import DotProductAttention

    return DotProductAttention(heads, head_dim, num_gqa_groups=kv_heads, attention_dropout=0.0, qkv_format="thd",
                               attn_mask_type="padding_causal")


@torch.compiler.disable
def _te_attention(q, k, v, cu_seqlens, max_seqlen):
    t, heads, d = q.shape
    module = _te_module(heads, k.shape[1], d)
    out = module(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens, max_seqlen_q=max_seqlen,
                 max_seqlen_kv=max_seqlen)
    return out.view(t, heads, d)  # TE returns [T, Hq * D] for THD
