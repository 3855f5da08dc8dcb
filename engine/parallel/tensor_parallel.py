"""Tensor and sequence parallelism for the VPiT model, applied from outside with DTensor plans.

Plans are keyed on the module names of `engine.model` (torchtitan's approach): the model stays single-device code.

Layout (TP size t, sequence length S):
- `tok_embeddings`: vocabulary-parallel (rows sharded, `VocabParallelEmbedding`), output all-reduced to a
  replicated [B, S, H] so that visual tokens can be spliced into their slots by flat index; with sequence
  parallelism the first layer then keeps only its [B, S/t, H] chunk (a local slice, no communication). Megatron reduce-scatters here instead; the all-reduce
  costs one extra [B, S, H] exchange per step and keeps splicing free of sequence-shard bookkeeping.
- attention: wq/wk/wv column-parallel (query heads and KV groups sharded), wo row-parallel.
- SwiGLU: w1/w3 column-parallel, w2 row-parallel.
- projector and continuous-token head: fc1 column-parallel, fc2 row-parallel (replicated outputs).
- `output` (LM head): column-parallel with the logits left sharded on the vocabulary, consumed by
  `engine.model.losses.text_cross_entropy_sum`'s vocabulary-parallel cross-entropy: no rank holds full logits.
  The vocabulary is padded to a multiple of the TP size; each rank masks its padding columns (global id >=
  `ModelConfig.real_vocab_size`) to -inf itself, so the loss does not depend on the TP size (a rank may hold only
  padding). The embedding's padding rows are never looked up.
- `--sequence-parallel`: RMSNorms run on [B, S/t, H] chunks; attention and MLP inputs are all-gathered and their
  row-parallel outputs reduce-scattered. The final norm's output is gathered so that loss rows can be selected.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle

from engine.model.losses import shard_start


class _SumOverTensorParallel(torch.autograd.Function):
    """All-reduce in forward, identity in backward (Megatron's reduce-from-model-parallel region): the upstream
    gradient is already the same on every rank."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _vocab_parallel_embedding_forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    local = self.weight.to_local()  # [V / t, H]; its gradient maps back to a Shard(0) DTensor gradient
    mesh = self.weight.device_mesh
    start = shard_start(self.weight, 0)  # uneven shards when t does not divide V (generation from any checkpoint)
    outside = (ids < start) | (ids >= start + local.shape[0])
    out = F.embedding((ids - start).masked_fill(outside, 0), local)
    out = out.masked_fill(outside.unsqueeze(-1), 0.0)
    return _SumOverTensorParallel.apply(out, mesh.get_group())


class VocabParallelEmbedding(ParallelStyle):
    """Megatron's vocabulary-parallel embedding: rows sharded, each rank looks up only the ids it owns, outputs
    summed. DTensor's own RowwiseParallel embedding returns a full-size replicated weight gradient on every rank
    (V x H), which would cost (t - 1) / t of the embedding in extra gradient memory; this one keeps it sharded."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"VocabParallelEmbedding applies to nn.Embedding, not {type(module).__name__}")
        weight = distribute_tensor(module.weight.data, device_mesh, [Shard(0)])
        module.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
        module.forward = types.MethodType(_vocab_parallel_embedding_forward, module)
        return module


def _block_plan(sequence_parallel: bool, first_block: bool) -> dict:
    residual = Shard(1) if sequence_parallel else Replicate()
    plan = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=residual),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=residual),
    }
    if not sequence_parallel:
        # Make each sub-block's input a DTensor once, so that the input gradients of wq/wk/wv (and w1/w3) add up
        # locally and cost one all-reduce in backward, as in Megatron, instead of one per linear layer.
        plan.update({
            "attention": PrepareModuleInput(input_layouts=(Replicate(), None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None)),
            "feed_forward": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),)),
        })
    else:
        # TransformerBlock.forward(x, rope, mask, kv_cache); Attention.forward(x, rope, mask, kv_cache).
        plan.update({
            "attention_norm": SequenceParallel(),
            "ffn_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None)),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        })
        if first_block:
            # The embedding output is replicated; keep this rank's sequence chunk (a slice, no communication).
            plan[""] = PrepareModuleInput(input_layouts=(Replicate(), None, None, None),
                                          desired_input_layouts=(Shard(1), None, None, None), use_local_output=True)
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> nn.Module:
    """Shards `model` (a whole VPiTModel or a pipeline stage of one) over the 1-D `tp_mesh`, in place."""
    if tp_mesh.size() == 1:
        return model
    plan: dict = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = VocabParallelEmbedding()
    if model.projector is not None:
        plan["projector.fc1"] = ColwiseParallel()
        plan["projector.fc2"] = RowwiseParallel()
    if model.visual_head is not None:
        plan["visual_head.fc1"] = ColwiseParallel()
        plan["visual_head.fc2"] = RowwiseParallel()
    if model.output is not None:
        plan["output"] = ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False)
    if model.norm is not None and sequence_parallel:
        plan["norm"] = SequenceParallel()
    parallelize_module(model, tp_mesh, plan)
    if model.norm is not None and sequence_parallel:
        parallelize_module(model.norm, tp_mesh, PrepareModuleOutput(
            output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True))
    for i, (name, block) in enumerate(model.layers.items()):
        first = i == 0 and model.tok_embeddings is not None
        parallelize_module(block, tp_mesh, _block_plan(sequence_parallel, first))
    # parallelize_module replaced the parameters with DTensors: re-share a tied LM head (same Shard(0) layout).
    model.tie_weights()
    return model
