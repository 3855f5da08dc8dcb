"""Activation checkpointing of transformer blocks: `full` (recompute the whole block in backward) or `selective`
(per op type, torchtitan's op-level policy), applied from outside the model.

Selective policy (`--recompute-granularity selective`): inside each block, keep the outputs of the expensive ops
and recompute the cheap elementwise ones (RMSNorm, RoPE, SiLU * gate, residual adds, casts). Kept: attention
kernels (SDPA's flash/efficient/cuDNN/CPU kernels, FlexAttention, varlen kernels), FP8 scaled matmuls and their
amax reductions, reduce-scatters of sequence parallelism, and every other matmul (torchtitan: recomputing half of
the 7 block GEMMs trades ~1/3 of the block's forward FLOPs for about half of the matmul-output memory). Megatron's
`selective` recomputes the core attention instead; with FlashAttention-style kernels that saves little, since
those kernels never store the S x S scores.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import torch
from torch import nn

RecomputeGranularity = Literal["full", "selective"]


def _saved_ops() -> set:
    ops = torch.ops.aten
    names = [
        (ops, "_scaled_dot_product_efficient_attention"),
        (ops, "_scaled_dot_product_flash_attention"),
        (ops, "_scaled_dot_product_cudnn_attention"),
        (ops, "_scaled_dot_product_flash_attention_for_cpu"),
        (ops, "_flash_attention_forward"),  # torch.nn.attention.varlen
        (ops, "_scaled_mm"),
        (ops, "max"),
        (ops, "mm"),
    ]
    saved = {getattr(getattr(ns, name), "default") for ns, name in names if hasattr(ns, name)}
    try:
        saved.add(torch.ops._c10d_functional.reduce_scatter_tensor.default)
    except AttributeError:
        pass
    try:
        saved.add(torch._higher_order_ops.flex_attention)
    except AttributeError:
        pass
    for namespace, name in (("flash_attn", "_flash_attn_varlen_forward"), ("flash_attn_3", "_flash_attn_forward")):
        try:
            saved.add(getattr(getattr(torch.ops, namespace), name).default)
        except (AttributeError, RuntimeError):
            pass
    return saved


def selective_checkpoint_context_fn():
    """Contexts for `torch.utils.checkpoint` implementing the selective policy (a fresh matmul counter per call)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = _saved_ops()
    mm = torch.ops.aten.mm.default
    counts: dict[str, int] = defaultdict(int)

    def policy(ctx, func, *args, **kwargs):
        mode = "recompute" if ctx.is_recompute else "forward"
        if func == mm:
            counts[mode] += 1
            if counts[mode] % 2 == 0:  # every second matmul is recomputed
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if func in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def checkpoint_block(block: nn.Module, granularity: RecomputeGranularity) -> nn.Module:
    """`block` wrapped in PyTorch's checkpoint_wrapper (non-reentrant), whose state-dict hooks keep parameter
    names unchanged in checkpoints."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if granularity == "full":
        return checkpoint_wrapper(block, preserve_rng_state=False)
    if granularity == "selective":
        return checkpoint_wrapper(block, preserve_rng_state=False, context_fn=selective_checkpoint_context_fn)
    raise ValueError(f"--recompute-granularity must be full or selective, got {granularity!r}")


def apply_activation_checkpointing(model: nn.Module, granularity: RecomputeGranularity = "full",
                                   num_layers: int = -1) -> int:
    """Wraps the first `num_layers` blocks of `model.layers` (-1: all) in place. Returns how many."""
    keys = list(model.layers.keys())
    count = len(keys) if num_layers < 0 else min(num_layers, len(keys))
    for key in keys[:count]:
        model.layers[key] = checkpoint_block(model.layers[key], granularity)
    return count
