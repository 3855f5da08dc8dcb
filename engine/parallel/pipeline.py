"""Pipeline parallelism with `torch.distributed.pipelining` (1F1B and interleaved 1F1B).

A stage is the VPiT model with modules removed (see `build_model_part`): the first stage keeps the token embedding,
the projector and the splicing of visual tokens; the last keeps the final norm, the LM head, the continuous-token
head and both losses. Parameter names are those of the whole model, so checkpoints reshard across layouts.

Micro-batches: the schedule splits every tensor argument along dim 0, so visual tokens travel batch-major
([B, Vmax, 1152] with slot indices [B, Vmax], -1 = padding) and each stage turns them back into the model's flat
form. Position and document ids go to every stage (each builds its own RoPE tables and attention mask).
"""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.model import VPiTModel


def pipeline_layer_split(num_layers: int, num_stages: int, explicit: list[int] | None = None) -> list[list[int]]:
    """Global layer ids for each stage.

    Uneven counts give the extra layers to middle stages first, then the first stage, and the last stage (which
    also carries the LM head and the losses) last.
    """
    if explicit is not None:
        counts = list(explicit)
    else:
        base, extra = divmod(num_layers, num_stages)
        counts = [base] * num_stages
        order = list(range(1, num_stages - 1)) + [0, num_stages - 1]
        for stage in order[:extra]:
            counts[stage] += 1
    splits, start = [], 0
    for count in counts:
        splits.append(list(range(start, start + count)))
        start += count
    return splits


def describe_split(splits: list[list[int]], ranks_per_stage: list[int]) -> str:
    parts = []
    for stage, (layers, rank) in enumerate(zip(splits, ranks_per_stage)):
        extras = (["embedding+projector"] if stage == 0 else []) + (["head+losses"] if stage == len(splits) - 1 else [])
        span = f"layers {layers[0]}-{layers[-1]}" if layers else "no layers"
        parts.append(f"stage {stage} (pp rank {rank}): {span} ({len(layers)})" + (f" + {' + '.join(extras)}" if extras else ""))
    return "; ".join(parts)


class VPiTStage(VPiTModel):
    """One pipeline stage: the model's forward with batch-major visual inputs and a normalised scalar loss.

    Same parameter names as `VPiTModel`. The loss uses global normalisers (text targets and visual targets in the
    whole optimizer step across data-parallel ranks), so summing stage losses over micro-batches gives the global
    mean loss, and the gradients need no rescaling.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.loss_parts: list[torch.Tensor] = []
        # Mixed precision (set by ParallelVPiT under --bf16): the stage's forward runs under autocast, and the
        # hidden states it sends to the next stage (and the gradients that come back) travel in `boundary_dtype`.
        self.autocast_dtype: torch.dtype | None = None
        self.boundary_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.autocast_dtype is None:
            return self._stage_forward(x, **kwargs)
        if self.tok_embeddings is None:
            # The residual stream stays fp32 inside a stage, as on one process under autocast; only the p2p
            # transfer is rounded to `boundary_dtype`.
            x = x.float()
        with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
            out = self._stage_forward(x, **kwargs)
        if self.norm is None and self.boundary_dtype is not None:
            out = out.to(self.boundary_dtype)
        return out

    def _stage_forward(self, x: torch.Tensor, *, position_ids: torch.Tensor, document_ids: torch.Tensor,
                       visual_tokens: torch.Tensor, visual_slots: torch.Tensor, visual_targets: torch.Tensor,
                       labels: torch.Tensor, lm_normalizer: float = 1.0, visual_normalizer: float = 1.0) -> torch.Tensor:
        b, s = position_ids.shape
        valid = visual_slots >= 0  # [B, Vmax]
        rows = torch.arange(b, device=visual_slots.device).unsqueeze(1).expand_as(visual_slots)
        flat_positions = (rows * s + visual_slots)[valid]  # [V], flat in B*S
        flat_tokens = visual_tokens[valid]  # [V, vision_dim]
        flat_targets = visual_targets[valid]  # [V] bool
        if self.norm is None:
            return super().forward(x, position_ids=position_ids, document_ids=document_ids,
                                   visual_tokens=flat_tokens, visual_positions=flat_positions)
        parts = super().forward(x, position_ids=position_ids, document_ids=document_ids, visual_tokens=flat_tokens,
                                visual_positions=flat_positions, labels=labels, visual_target_mask=flat_targets)
        self.loss_parts.append(torch.stack([parts.lm_loss_sum.detach(), parts.lm_tokens.to(torch.float32),
                                            parts.visual_loss_sum.detach(), parts.visual_targets.to(torch.float32)]))
        return parts.lm_loss_sum / lm_normalizer + self.config.visual_loss_coef * parts.visual_loss_sum / visual_normalizer


def build_model_part(config: ModelConfig, layer_ids: list[int], *, is_first: bool, is_last: bool,
                     device: torch.device | str, dtype: torch.dtype = torch.float32, seed: int | None = 0,
                     model_class: type[VPiTModel] = VPiTModel) -> VPiTModel:
    """The model restricted to `layer_ids` (and to the embedding/head ends when first/last), initialised exactly as
    the same tensors of the whole model.

    Tied embeddings on a last stage that is not also the first (Megatron's `word_embeddings_for_head`): the stage
    holds its own copy of the embedding matrix as `output.weight`, initialised from the embedding's generator, so
    it starts equal to the first stage's `tok_embeddings.weight`; `ParallelVPiT` sums the two gradients over the
    embedding group before every optimizer step, which keeps the copies equal.
    """
    tied_copy = config.tie_embeddings and is_last and not is_first
    with torch.device("meta"):
        model = model_class(config)
    keep = {str(i) for i in layer_ids}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    if not is_first:
        model.projector = None
        if not tied_copy:
            model.tok_embeddings = None
    if not is_last:
        model.norm = None
        model.output = None
        model.visual_head = None
    model.to_empty(device=device)
    model.init_weights(seed=seed)  # a tied LM head shares (and is initialised as) the embedding
    if tied_copy:
        model.tok_embeddings = None  # `output.weight` keeps the matrix; the stage takes hidden states as input
    return model.to(dtype)


def is_tied_head_copy(part: VPiTModel) -> bool:
    """Whether `part` is a last pipeline stage holding a copy of the tied embedding as its LM head."""
    return bool(part.config.tie_embeddings and part.output is not None and part.tok_embeddings is None)


def batch_major_visual(visual_tokens: torch.Tensor | None, visual_positions: torch.Tensor | None,
                       visual_target_mask: torch.Tensor | None, batch: int, seq_len: int,
                       vision_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat visual inputs ([V, D], flat positions [V], mask [V]) -> batch-major padded ([B, Vmax, D], slots [B, Vmax]
    with -1 padding, targets [B, Vmax]), so that the pipeline schedule can split them into micro-batches."""
    if visual_tokens is None or visual_positions is None or visual_positions.numel() == 0:
        device = visual_positions.device if visual_positions is not None else None
        return (torch.zeros(batch, 0, vision_dim, device=device), torch.full((batch, 0), -1, dtype=torch.long, device=device),
                torch.zeros(batch, 0, dtype=torch.bool, device=device))
    if visual_target_mask is None:
        visual_target_mask = torch.zeros_like(visual_positions, dtype=torch.bool)
    sample = visual_positions // seq_len
    counts = torch.bincount(sample, minlength=batch)
    vmax = int(counts.max())
    # Rank of each visual token within its sample (positions are grouped by sample after a stable sort).
    order = torch.argsort(sample, stable=True)
    sample_sorted = sample[order]
    starts = torch.cumsum(counts, 0) - counts
    within = torch.arange(order.numel(), device=order.device) - starts[sample_sorted]
    tokens = visual_tokens.new_zeros(batch, vmax, visual_tokens.shape[-1])
    slots = torch.full((batch, vmax), -1, dtype=torch.long, device=visual_positions.device)
    targets = torch.zeros(batch, vmax, dtype=torch.bool, device=visual_positions.device)
    tokens[sample_sorted, within] = visual_tokens[order]
    slots[sample_sorted, within] = visual_positions[order] % seq_len
    targets[sample_sorted, within] = visual_target_mask[order]
    return tokens, slots, targets


def stage_loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The last stage already returns its normalised loss; the schedule's `target` is a placeholder."""
    return output


def build_schedule(stages: list, num_microbatches: int, interleaved: bool):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleInterleaved1F1B

    if interleaved:
        return ScheduleInterleaved1F1B(stages, n_microbatches=num_microbatches, loss_fn=stage_loss_fn,
                                       scale_grads=False)
    (stage,) = stages
    return Schedule1F1B(stage, n_microbatches=num_microbatches, loss_fn=stage_loss_fn, scale_grads=False)


def stage_ids_for_rank(pp_rank: int, pp_size: int, virtual_stages: int) -> list[int]:
    """Megatron's interleaving: rank r holds stages r, r + pp, r + 2 pp, ..."""
    return [pp_rank + k * pp_size for k in range(virtual_stages)]
