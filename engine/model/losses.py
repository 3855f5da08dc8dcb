"""VPiT loss functions, single-device and vocabulary-parallel.

`text_cross_entropy_sum` accepts plain logits or a DTensor sharded on the vocabulary (what the tensor-parallel LM
head produces). In the sharded case it runs Megatron's vocabulary-parallel cross-entropy: every rank keeps only its
[N, V/tp] slice, and three all-reduces of [N] vectors (max, sum of exponentials, target logit) replace gathering
the full-vocabulary logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy over rows whose logits are split along the vocabulary across `group`."""

    @staticmethod
    def forward(ctx, local_logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group) -> torch.Tensor:
        logits = local_logits.float()
        # Stable softmax across shards: subtract the global row max.
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(-1)
        local_vocab = logits.shape[-1]
        owned = (labels >= vocab_start) & (labels < vocab_start + local_vocab)
        local_index = (labels - vocab_start).clamp(0, local_vocab - 1)
        target_logit = shifted.gather(-1, local_index.unsqueeze(-1)).squeeze(-1) * owned
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        # Two all-reduces of [N] vectors; the target logit lives on exactly one rank.
        dist.all_reduce(sum_exp, group=group)
        dist.all_reduce(target_logit, group=group)
        loss = (sum_exp.log() - target_logit).sum()
        ctx.save_for_backward(exp, sum_exp, local_index, owned)
        ctx.input_dtype = local_logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        exp, sum_exp, local_index, owned = ctx.saved_tensors
        grad = exp / sum_exp.unsqueeze(-1)  # softmax slice
        grad.scatter_add_(-1, local_index.unsqueeze(-1), -owned.unsqueeze(-1).to(grad.dtype))
        return (grad * grad_output).to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy_sum(local_logits: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                                     group: dist.ProcessGroup) -> torch.Tensor:
    """Summed cross-entropy of rows [N, V_local] holding vocabulary columns [vocab_start, vocab_start + V_local).

    Returns the same scalar on every rank of `group`; the gradient flows only into the local slice.
    """
    return _VocabParallelCrossEntropy.apply(local_logits, labels, vocab_start, group)


def text_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy in fp32 over rows of `logits` [N, V] with targets `labels` [N].

    `logits` may be a DTensor sharded on its last dimension (vocabulary-parallel LM head): then no rank gathers
    the full vocabulary.
    """
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(logits, DTensor):
        placement = logits.placements[0]
        if logits.device_mesh.ndim == 1 and isinstance(placement, Shard) and placement.dim in (-1, logits.ndim - 1):
            local = logits.to_local()
            vocab_start = logits.device_mesh.get_local_rank() * local.shape[-1]
            if local.shape[-1] * logits.device_mesh.size() != logits.shape[-1]:
                raise ValueError(f"vocabulary {logits.shape[-1]} is not divisible by the tensor-parallel size "
                                 f"{logits.device_mesh.size()}: pad it (--make-vocab-size-divisible-by)")
            return vocab_parallel_cross_entropy_sum(local, labels, vocab_start, logits.device_mesh.get_group())
        logits = logits.full_tensor()
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def visual_cosine_loss_sum(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over rows of (1 - cosine(predicted, target)); target is detached. Empty input gives 0."""
    cos = F.cosine_similarity(predicted.float(), target.detach().float(), dim=-1, eps=1e-8)
    return (1.0 - cos).sum()
