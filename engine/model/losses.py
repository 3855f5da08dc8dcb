"""VPiT loss functions, single-device and vocabulary-parallel.

`text_cross_entropy_sum` accepts plain logits or a DTensor sharded on the vocabulary (what the tensor-parallel LM
head produces). In the sharded case it runs Megatron's vocabulary-parallel cross-entropy: every rank keeps only its
[N, V/tp] slice, and three all-reduces of [N] vectors (max, sum of exponentials, target logit) replace gathering
the full-vocabulary logits.

Padded vocabulary: the convention every LM-head consumer follows
-----------------------------------------------------------------
The embedding and LM head have `ModelConfig.vocab_size` rows, padded (Megatron's `--make-vocab-size-divisible-by`
x TP) past the `ModelConfig.real_vocab_size` ids a tokenizer can produce. Column `j` of the logits is padding iff
`j >= real_vocab_size` (global column index; on a vocabulary-parallel rank holding columns
`[vocab_start, vocab_start + V_local)`, local column `c` is padding iff `vocab_start + c >= real_vocab_size`, and a
rank may hold only padding). Padding columns are masked to -inf before any softmax:

- they add exp(-inf) = 0 to the partition function and receive exactly zero gradient, so the loss and every
  gradient are those of an unpadded vocabulary, whatever the padding (hence whatever the TP size);
- they can never be the argmax or be sampled (`VPiTModel.logits` masks them, so generation gets it for free);
- labels are always < real_vocab_size (a label in the padding would give an infinite loss, which the trainer
  reports as a non-finite step).

`real_vocab_size=None` means "no padding". A fused linear + cross-entropy kernel must treat the columns
`>= real_vocab_size` the same way (skip them, or mask their logits to -inf) to match `text_cross_entropy_sum`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _padding_start(vocab_start: int, local_vocab: int, real_vocab_size: int | None) -> int:
    """First local column that is padding (local_vocab when none is)."""
    if real_vocab_size is None:
        return local_vocab
    return max(0, min(local_vocab, real_vocab_size - vocab_start))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy over rows whose logits are split along the vocabulary across `group`."""

    @staticmethod
    def forward(ctx, local_logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group,
                real_vocab_size: int | None) -> torch.Tensor:
        logits = local_logits.float()
        local_vocab = logits.shape[-1]
        real = _padding_start(vocab_start, local_vocab, real_vocab_size)  # local columns [real:] are padding
        # Stable softmax across shards: subtract the global row max (of the real columns).
        if real > 0:
            row_max = logits[:, :real].max(dim=-1).values
        else:  # this rank holds padding only
            row_max = logits.new_full(logits.shape[:1], float("-inf"))
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(-1)  # a new tensor: masking it never touches the caller's logits
        if real < local_vocab:
            shifted[:, real:] = float("-inf")
        owned = (labels >= vocab_start) & (labels < vocab_start + local_vocab)
        local_index = (labels - vocab_start).clamp(0, local_vocab - 1)
        gathered = shifted.gather(-1, local_index.unsqueeze(-1)).squeeze(-1)
        # where, not a product: a gathered -inf (a padding column of a rank that does not own the label) times 0
        # would be NaN.
        target_logit = torch.where(owned, gathered, torch.zeros_like(gathered))
        exp = shifted.exp_()  # padding columns: exactly 0
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
        grad = exp / sum_exp.unsqueeze(-1)  # softmax slice (0 on padding columns)
        grad.scatter_add_(-1, local_index.unsqueeze(-1), -owned.unsqueeze(-1).to(grad.dtype))
        return (grad * grad_output).to(ctx.input_dtype), None, None, None, None


def vocab_parallel_cross_entropy_sum(local_logits: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                                     group: dist.ProcessGroup, real_vocab_size: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of rows [N, V_local] holding vocabulary columns [vocab_start, vocab_start + V_local).

    Columns with a global index >= `real_vocab_size` are padding and excluded (masked to -inf; see the module
    docstring). Returns the same scalar on every rank of `group`; the gradient flows only into the local slice and
    is exactly zero on padding columns. `local_logits` is not modified.
    """
    return _VocabParallelCrossEntropy.apply(local_logits, labels, vocab_start, group, real_vocab_size)


def shard_start(tensor, dim: int) -> int:
    """Global index of this rank's first element along `dim` of a DTensor sharded on it. The shards may be uneven
    (301 rows over 2 ranks are 151 + 150), so it is not `rank x local size`: a model-only checkpoint whose
    vocabulary the TP size does not divide is sharded so at generation time."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return int(offset[dim % tensor.ndim])


def _vocab_sharded(logits: torch.Tensor) -> bool:
    """A DTensor sharded on its last (vocabulary) dimension over a 1-D mesh: the tensor-parallel LM head's output."""
    from torch.distributed.tensor import Shard

    placement = logits.placements[0]
    return logits.device_mesh.ndim == 1 and isinstance(placement, Shard) and placement.dim in (-1, logits.ndim - 1)


def mask_padded_vocab(logits: torch.Tensor, real_vocab_size: int | None, *, inplace: bool = False) -> torch.Tensor:
    """Logits [..., V] with the padding columns (index >= `real_vocab_size`) set to -inf.

    Works on plain tensors and on DTensors sharded on the vocabulary (each rank masks its own columns, no
    communication). Out of place unless `inplace` (plain tensors only; fine on the fresh output of a linear layer,
    whose backward does not need it). Padding columns then get exactly zero gradient.
    """
    if real_vocab_size is None or real_vocab_size >= logits.shape[-1]:
        return logits
    from torch.distributed.tensor import DTensor

    if isinstance(logits, DTensor):
        from torch.distributed.tensor import Shard

        local = logits.to_local()
        if _vocab_sharded(logits):
            start = shard_start(logits, -1)
        elif any(isinstance(p, Shard) and p.dim in (-1, logits.ndim - 1) for p in logits.placements):
            raise NotImplementedError(f"vocabulary padding mask for logits placed as {logits.placements}")
        else:
            start = 0  # every rank holds every column
        real = _padding_start(start, local.shape[-1], real_vocab_size)
        if real < local.shape[-1]:
            padding = torch.arange(local.shape[-1], device=local.device) >= real
            local = local.masked_fill(padding, float("-inf"))
        return DTensor.from_local(local, logits.device_mesh, logits.placements, run_check=False,
                                  shape=logits.shape, stride=logits.stride())
    if inplace:
        logits[..., real_vocab_size:] = float("-inf")
        return logits
    padding = torch.arange(logits.shape[-1], device=logits.device) >= real_vocab_size
    return logits.masked_fill(padding, float("-inf"))


def text_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, real_vocab_size: int | None = None) -> torch.Tensor:
    """Summed cross-entropy in fp32 over rows of `logits` [N, V] with targets `labels` [N].

    `logits` may be a DTensor sharded on its last dimension (vocabulary-parallel LM head): then no rank gathers
    the full vocabulary. Columns >= `real_vocab_size` are vocabulary padding and excluded from the softmax (masked
    to -inf; the module docstring gives the convention). `logits` is not modified.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(logits, DTensor):
        if _vocab_sharded(logits):
            local = logits.to_local()
            vocab_start = logits.device_mesh.get_local_rank() * local.shape[-1]
            if local.shape[-1] * logits.device_mesh.size() != logits.shape[-1]:
                raise ValueError(f"vocabulary {logits.shape[-1]} is not divisible by the tensor-parallel size "
                                 f"{logits.device_mesh.size()}: pad it (--make-vocab-size-divisible-by)")
            return vocab_parallel_cross_entropy_sum(local, labels, vocab_start, logits.device_mesh.get_group(),
                                                    real_vocab_size)
        logits = logits.full_tensor()
    full = logits.float()
    if real_vocab_size is not None and real_vocab_size < full.shape[-1]:
        # `.float()` of bf16 logits is already a private copy: mask it in place; fp32 logits are copied once.
        full = mask_padded_vocab(full, real_vocab_size, inplace=full is not logits)
    return F.cross_entropy(full, labels, reduction="sum")


def visual_cosine_loss_sum(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over rows of (1 - cosine(predicted, target)); target is detached. Empty input gives 0."""
    cos = F.cosine_similarity(predicted.float(), target.detach().float(), dim=-1, eps=1e-8)
    return (1.0 - cos).sum()


# ----------------------------------------------------------------------------------------------- fused (Triton)
def fused_text_cross_entropy_sum(hidden: torch.Tensor, output_weight: torch.Tensor, labels: torch.Tensor,
                                 real_vocab_size: int | None = None) -> torch.Tensor:
    """`text_cross_entropy_sum(hidden @ output_weight.T, labels, real_vocab_size)` without the [N, V] logits
    (`--fused-linear-cross-entropy`: chrysalis_kernels.linear_cross_entropy, chunked, Triton).

    `output_weight` may be the vocabulary-parallel LM head's DTensor (rows sharded on a 1-D tensor-parallel mesh):
    each rank then uses its shard and the same reductions as the vocabulary-parallel cross-entropy above.
    """
    from chrysalis_kernels.linear_cross_entropy import linear_cross_entropy_sum
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(hidden, DTensor):  # replicated over the tensor-parallel group: its local copy is the full tensor
        hidden = hidden.to_local() if all(p.is_replicate() for p in hidden.placements) else hidden.full_tensor()
    if not isinstance(output_weight, DTensor):
        return linear_cross_entropy_sum(hidden, output_weight, labels, real_vocab_size=real_vocab_size)
    mesh, placement = output_weight.device_mesh, output_weight.placements[0]
    if mesh.ndim != 1 or not (isinstance(placement, Shard) and placement.dim == 0):
        raise NotImplementedError(f"--fused-linear-cross-entropy with an LM head placed as {output_weight.placements}")
    local = output_weight.to_local()
    if local.shape[0] * mesh.size() != output_weight.shape[0]:
        raise ValueError(f"vocabulary {output_weight.shape[0]} is not divisible by the tensor-parallel size "
                         f"{mesh.size()}: pad it (--make-vocab-size-divisible-by)")
    return linear_cross_entropy_sum(hidden, local, labels, real_vocab_size=real_vocab_size,
                                    vocab_start=mesh.get_local_rank() * local.shape[0], group=mesh.get_group())


def fused_visual_cosine_loss_sum(hidden: torch.Tensor, target: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    """`visual_cosine_loss_sum(head(hidden), target)` for the continuous-token head (fc1, GELU, fc2) with its
    intermediate activations recomputed in the backward instead of stored (`--fused-visual-head-loss`:
    chrysalis_kernels.visual_head_loss). One device (or data parallelism) only: not with a tensor-parallel head."""
    from chrysalis_kernels.visual_head_loss import visual_head_loss_sum
    from torch.distributed.tensor import DTensor

    weights = (head.fc1.weight, head.fc1.bias, head.fc2.weight, head.fc2.bias)
    if any(isinstance(w, DTensor) for w in weights):
        raise NotImplementedError("--fused-visual-head-loss does not support a tensor-parallel visual head; drop the "
                                  "flag with --tensor-model-parallel-size > 1")
    return visual_head_loss_sum(hidden, target, *weights)
