"""A VPiT model placed on a (pp, dp, tp) mesh, with one `forward_backward` for every layout.

    parallel = ParallelVPiT(model_config, parallel_config, mesh, device="cpu", seed=0)
    optimizer = torch.optim.AdamW(parallel.parameters(), ...)
    parts = parallel.forward_backward(micro_batches)     # list of batch dicts (the model's flat contract)
    parallel.reduce_gradients(); norm = parallel.clip_grad_norm_(1.0); optimizer.step()

Losses are normalised by the global number of text and visual targets of the step (all micro-batches, all
data-parallel ranks), so every layout computes the same loss and the same gradients as one device.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from engine.config import ModelConfig
from engine.model import IGNORE_INDEX, VPiTModel
from engine.parallel.config import ParallelConfig, validate_parallel_config
from engine.parallel.pipeline import (
    VPiTStage,
    batch_major_visual,
    build_model_part,
    build_schedule,
    describe_split,
    pipeline_layer_split,
    stage_ids_for_rank,
)
from engine.parallel.tensor_parallel import apply_tensor_parallel

BATCH_KEYS = ("tokens", "position_ids", "document_ids", "visual_tokens", "visual_positions", "labels",
              "visual_target_mask")


class ParallelVPiT:
    """The local model part(s) of this rank and how to run them.

    Args:
        mesh: the ("pp", "dp", "tp") mesh from `engine.parallel.mesh.build_device_mesh`.
        activation_checkpointing: wrap every transformer block in activation checkpointing.
        block_transforms: an `engine.parallel.block_transforms.BlockTransforms` (FP8, full or selective
            checkpointing, compile) applied around tensor parallelism; it replaces `activation_checkpointing`.
        autocast_dtype: mixed precision (`--bf16`): forwards run under autocast to this dtype over fp32 master
            weights (so gradients and optimizer state are fp32); pipeline stages exchange activations and their
            gradients in it; FSDP2 all-gathers parameters in it.
        grad_reduce_dtype: dtype of the data-parallel gradient reduction (fp32 =
            `--accumulate-allreduce-grads-in-fp32`, FSDP2's `reduce_dtype`).
    """

    def __init__(self, model_config: ModelConfig, parallel: ParallelConfig, mesh: DeviceMesh, *,
                 device: torch.device | str, dtype: torch.dtype = torch.float32, seed: int | None = 0,
                 activation_checkpointing: bool = False, block_transforms=None,
                 autocast_dtype: torch.dtype | None = None, grad_reduce_dtype: torch.dtype = torch.float32):
        validate_parallel_config(parallel, model_config, mesh.size())
        self.config = model_config
        self.parallel = parallel
        self.mesh = mesh
        self.device = torch.device(device)
        self.pp_rank = mesh.get_local_rank("pp")
        self.pp_size = mesh.size(mesh_dim=0)
        self.dp_size = mesh.size(mesh_dim=1)
        self.tp_mesh = mesh["tp"]
        self.dp_group = mesh.get_group("dp")
        self.pp_group = mesh.get_group("pp")
        self.autocast_dtype = autocast_dtype
        self.grad_reduce_dtype = grad_reduce_dtype

        virtual = parallel.virtual_stages_per_rank(model_config.num_layers) if self.pp_size > 1 else 1
        self.num_stages = self.pp_size * virtual
        self.layer_split = pipeline_layer_split(model_config.num_layers, self.num_stages,
                                                parallel.pipeline_layer_split)
        self.stage_ids = stage_ids_for_rank(self.pp_rank, self.pp_size, virtual)
        model_class = VPiTStage if self.pp_size > 1 else VPiTModel
        self.parts: list[VPiTModel] = []
        for stage in self.stage_ids:
            part = build_model_part(model_config, self.layer_split[stage], is_first=stage == 0,
                                    is_last=stage == self.num_stages - 1, device=self.device, dtype=dtype,
                                    seed=seed, model_class=model_class)
            if block_transforms is not None:
                block_transforms.before_tensor_parallel(part)
            apply_tensor_parallel(part, self.tp_mesh, parallel.sequence_parallel)
            if block_transforms is not None:
                block_transforms.after_tensor_parallel(part)
            elif activation_checkpointing:
                apply_activation_checkpointing(part)
            if isinstance(part, VPiTStage):
                part.autocast_dtype = part.boundary_dtype = autocast_dtype
            self.parts.append(part)
        self.embedding_group = self._build_embedding_group()
        self._sync_tied_embeddings()
        if parallel.data_parallel_sharding == "fsdp" and self.dp_size > 1:
            from engine.parallel.data_parallel import apply_fsdp

            for part in self.parts:
                apply_fsdp(part, mesh["dp"], reshard_after_forward=parallel.fsdp_reshard_after_forward,
                           param_dtype=autocast_dtype, reduce_dtype=grad_reduce_dtype)
        self._schedules: dict[int, object] = {}

    # ----------------------------------------------------------------------------------------------- tied embeddings
    def _build_embedding_group(self):
        """Megatron's embedding group: with tied embeddings under PP, the first and the last pipeline rank of each
        (dp, tp) position, which hold the two copies of the embedding matrix (the same rows: both are sharded on
        the vocabulary over tp). None when this rank holds no copy or the embeddings are not tied."""
        if not self.config.tie_embeddings or self.pp_size == 1:
            return None
        if self.pp_size == 2:
            return self.pp_group
        ranks = self.mesh.mesh  # [pp, dp, tp] global ranks
        mine = None
        for d in range(ranks.shape[1]):  # every rank creates every group, in the same order
            for t in range(ranks.shape[2]):
                members = [int(ranks[0, d, t]), int(ranks[-1, d, t])]
                group = dist.new_group(members)
                if dist.get_rank() in members:
                    mine = group
        return mine

    def _tied_embedding_weights(self) -> list[nn.Parameter]:
        """This rank's copy of a tied embedding under PP: the first stage's `tok_embeddings.weight` or the last
        stage's `output.weight` (empty without PP, where the two are one tensor)."""
        if self.embedding_group is None:
            return []
        out = []
        for stage, part in zip(self.stage_ids, self.parts):
            if stage == 0:
                out.append(part.tok_embeddings.weight)
            elif stage == self.num_stages - 1:
                out.append(part.output.weight)
        return out

    @torch.no_grad()
    def _sync_tied_embeddings(self) -> None:
        """The last stage's copy starts as the first stage's (equal already when seeded; made bit-identical here
        whatever the initialisation, as Megatron does at start-up)."""
        if self.embedding_group is None:
            return
        source = int(self.mesh.mesh[0, self.mesh.get_local_rank("dp"), self.mesh.get_local_rank("tp")])
        for weight in self._tied_embedding_weights():
            local = _local(weight.data)
            dist.broadcast(local, src=source, group=self.embedding_group)

    def _is_tied_head_copy(self, param: torch.Tensor) -> bool:
        return self.embedding_group is not None and self.has_last_stage and any(
            param is w for w in self._tied_embedding_weights()) and 0 not in self.stage_ids

    # ----------------------------------------------------------------------------------------------- info
    def describe(self) -> str:
        if self.pp_size == 1:
            return f"no pipeline: layers 0-{self.config.num_layers - 1} on every rank"
        ranks = [s % self.pp_size for s in range(self.num_stages)]
        return f"{self.parallel.schedule_name}: " + describe_split(self.layer_split, ranks)

    @property
    def has_last_stage(self) -> bool:
        return (self.num_stages - 1) in self.stage_ids

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Whole-model parameter names (activation-checkpoint wrappers' prefixes removed)."""
        seen = set()
        for part in self.parts:
            for name, p in part.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield name.replace("_checkpoint_wrapped_module.", ""), p

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)

    def eval(self) -> None:
        self.train(False)

    # ----------------------------------------------------------------------------------------------- step
    def global_normalizers(self, micro_batches: list[dict]) -> tuple[float, float]:
        """Text and visual target counts of the whole step, summed over data-parallel ranks (the data is known
        before any forward, so no pipeline stage has to wait for the last one)."""
        text = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches)
        visual = sum(0 if mb.get("visual_target_mask") is None else int(mb["visual_target_mask"].sum())
                     for mb in micro_batches)
        # Collective buffers live on the model's device: NCCL groups take CUDA tensors only.
        counts = torch.tensor([text, visual], dtype=torch.float64, device=self.device)
        if self.dp_size > 1:
            dist.all_reduce(counts, group=self.dp_group)
        text, visual = counts.tolist()
        return max(text, 1.0), max(visual, 1.0)

    def forward_backward(self, micro_batches: list[dict]) -> dict[str, float]:
        """Forward and backward over this step's micro-batches (this DP rank's share).

        Returns the step's loss parts, identical on every rank: `loss`, `lm_loss`, `visual_loss` (global means) and
        `lm_tokens`, `visual_targets` (global counts).
        """
        lm_norm, vis_norm = self.global_normalizers(micro_batches)
        if self.parallel.data_parallel_sharding == "fsdp" and self.dp_size > 1:
            # FSDP averages gradients over dp; scale so that the average is the sum we want.
            lm_norm, vis_norm = lm_norm / self.dp_size, vis_norm / self.dp_size
        # lm_sum, lm_tokens, visual_sum, visual_targets; on the model's device (NCCL reduces CUDA tensors only)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        if self.pp_size == 1:
            (model,) = self.parts
            for mb in micro_batches:
                with self._autocast():
                    parts = model(**{k: self._to_device(mb.get(k)) for k in BATCH_KEYS if mb.get(k) is not None})
                loss = parts.lm_loss_sum / lm_norm + self.config.visual_loss_coef * parts.visual_loss_sum / vis_norm
                loss.backward()
                sums += torch.stack([parts.lm_loss_sum.detach(), parts.lm_tokens.float(),
                                     parts.visual_loss_sum.detach(), parts.visual_targets.float()]).double()
        else:
            sums += self._pipeline_forward_backward(micro_batches, lm_norm, vis_norm)
            dist.all_reduce(sums, group=self.pp_group)  # only the last stage contributed
        if self.dp_size > 1:
            dist.all_reduce(sums, group=self.dp_group)
        lm_sum, lm_tokens, visual_sum, visual_targets = sums.tolist()
        lm_loss = lm_sum / max(lm_tokens, 1.0)
        visual_loss = visual_sum / max(visual_targets, 1.0)
        return {"loss": lm_loss + self.config.visual_loss_coef * visual_loss, "lm_loss": lm_loss,
                "visual_loss": visual_loss, "lm_tokens": int(lm_tokens), "visual_targets": int(visual_targets)}

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return t.to(self.device, non_blocking=True) if t is not None else None

    def _pipeline_forward_backward(self, micro_batches: list[dict], lm_norm: float, vis_norm: float) -> torch.Tensor:
        return self._run_pipeline(micro_batches, lm_norm, vis_norm, backward=True)

    def _run_pipeline(self, micro_batches: list[dict], lm_norm: float, vis_norm: float, backward: bool) -> torch.Tensor:
        n = len(micro_batches)
        if n not in self._schedules:
            self._schedules[n] = self._build_schedule(n, micro_batches[0])
        schedule = self._schedules[n]
        cat = {}
        seq_len = micro_batches[0]["tokens"].shape[1]
        visual = [batch_major_visual(mb.get("visual_tokens"), mb.get("visual_positions"), mb.get("visual_target_mask"),
                                     mb["tokens"].shape[0], seq_len, self.config.vision_dim) for mb in micro_batches]
        vmax = max(v[0].shape[1] for v in visual)
        padded = [_pad_visual(v, vmax) for v in visual]
        cat["visual_tokens"] = torch.cat([p[0] for p in padded]).to(self.device, self._dtype)
        cat["visual_slots"] = torch.cat([p[1] for p in padded]).to(self.device)
        cat["visual_targets"] = torch.cat([p[2] for p in padded]).to(self.device)
        for key in ("position_ids", "document_ids", "labels"):
            cat[key] = torch.cat([_default(mb, key) for mb in micro_batches]).to(self.device)
        tokens = torch.cat([mb["tokens"] for mb in micro_batches]).to(self.device)
        for part in self.parts:
            if isinstance(part, VPiTStage):
                part.loss_parts.clear()
        kwargs = dict(cat, lm_normalizer=lm_norm, visual_normalizer=vis_norm)
        target = torch.zeros(tokens.shape[0], device=self.device)
        args = (tokens,) if 0 in self.stage_ids else ()
        if backward:
            schedule.step(*args, target=target, return_outputs=False, **kwargs)
        else:
            schedule.eval(*args, target=target, return_outputs=False, **kwargs)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        if self.has_last_stage:
            last = self.parts[self.stage_ids.index(self.num_stages - 1)]
            sums += torch.stack(last.loss_parts).sum(0).double()
        return sums

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.parts[0].parameters()).dtype

    def _build_schedule(self, num_microbatches: int, example: dict):
        from torch.distributed.pipelining import PipelineStage

        validate_parallel_config(self.parallel, self.config, self.mesh.size(), num_microbatches)
        mb, seq = example["tokens"].shape
        tp = self.tp_mesh.size()
        local_seq = seq // tp if self.parallel.sequence_parallel and tp > 1 else seq
        # requires_grad marks the received activations as needing a gradient to send back.
        hidden = torch.empty(mb, local_seq, self.config.hidden_size, device=self.device,
                             dtype=self.autocast_dtype or self._dtype, requires_grad=True)
        stages = []
        for stage_id, part in zip(self.stage_ids, self.parts):
            first, last = stage_id == 0, stage_id == self.num_stages - 1
            inputs = torch.empty(mb, seq, dtype=torch.long, device=self.device) if first else hidden
            outputs = torch.empty((), device=self.device, dtype=torch.float32) if last else hidden
            # Static shapes and gradient metadata: no shape-inference round trip at the first step.
            stages.append(PipelineStage(part, stage_id, self.num_stages, self.device, input_args=(inputs,),
                                        output_args=(outputs,), input_grads=(None if first else hidden,),
                                        output_grads=(None if last else hidden,), group=self.pp_group))
        interleaved = self.num_stages > self.pp_size
        return build_schedule(stages, num_microbatches, interleaved)

    @torch.no_grad()
    def evaluate(self, micro_batches: list[dict]) -> dict[str, float]:
        """Forward only: summed text CE / visual (1 - cos) and their counts over this step's micro-batches, summed
        over pipeline stages and data-parallel ranks (identical on every rank)."""
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # NCCL reduces CUDA tensors only
        if self.pp_size == 1:
            (model,) = self.parts
            for mb in micro_batches:
                with self._autocast():
                    parts = model(**{k: self._to_device(mb.get(k)) for k in BATCH_KEYS if mb.get(k) is not None})
                sums += torch.stack([parts.lm_loss_sum, parts.lm_tokens.float(), parts.visual_loss_sum,
                                     parts.visual_targets.float()]).double()
        else:
            sums += self._run_pipeline(micro_batches, 1.0, 1.0, backward=False)
            dist.all_reduce(sums, group=self.pp_group)
        if self.dp_size > 1:
            dist.all_reduce(sums, group=self.dp_group)
        lm_sum, lm_tokens, visual_sum, visual_targets = sums.tolist()
        return {"lm_loss_sum": lm_sum, "lm_tokens": int(lm_tokens), "visual_loss_sum": visual_sum,
                "visual_targets": int(visual_targets)}

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Loads full (unsharded) tensors, e.g. an imported Hugging Face model, into the local shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if self.config.tie_embeddings and "output.weight" not in state and "tok_embeddings.weight" in state:
            state = dict(state, **{"output.weight": state["tok_embeddings.weight"]})
        for part in self.parts:
            own = {k: v for k, v in state.items() if k in part.state_dict()}
            set_model_state_dict(part, own, options=StateDictOptions(full_state_dict=True, strict=False))

    # ----------------------------------------------------------------------------------------------- grads
    def reduce_gradients(self) -> None:
        """Sums gradients over data-parallel replicas (losses are already normalised globally; FSDP reduces its
        own gradients during backward), then the two copies of a tied embedding over the embedding group (the
        first stage's embedding gradient plus the last stage's LM-head gradient, as one device accumulates them)."""
        self._reduce_data_parallel_gradients()
        for weight in self._tied_embedding_weights():
            if weight.grad is not None:
                dist.all_reduce(_local(weight.grad), group=self.embedding_group)

    def _reduce_data_parallel_gradients(self) -> None:
        if self.dp_size == 1 or self.parallel.data_parallel_sharding == "fsdp":
            return
        grads = [_local(p.grad) for p in self.parameters() if p.grad is not None]
        for bucket in _buckets(grads, 1 << 24):
            # fp32 gradients (autocast over fp32 weights) are summed in fp32 unless a lower reduce dtype is asked
            # for (half the bytes, Megatron's default without --accumulate-allreduce-grads-in-fp32).
            flat = torch.cat([g.reshape(-1) for g in bucket]).to(self.grad_reduce_dtype)
            dist.all_reduce(flat, group=self.dp_group)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def grad_norm(self) -> float:
        """Global L2 norm of the gradients over every shard and stage (a tied embedding counted once, as on one
        device: the last stage's copy is left out, like Megatron's shared parameters)."""
        from torch.distributed.tensor import DTensor

        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.parameters():
            if p.grad is None or self._is_tied_head_copy(p):
                continue
            g = p.grad
            if isinstance(g, DTensor):
                # vector_norm on a DTensor reduces over its mesh (sharded) or not at all (replicated).
                total += torch.linalg.vector_norm(g, dtype=torch.float64).full_tensor() ** 2
            else:
                total += torch.linalg.vector_norm(g, dtype=torch.float64) ** 2
        if self.pp_size > 1:
            dist.all_reduce(total, group=self.pp_group)
        return math.sqrt(total.item())

    def clip_grad_norm_(self, max_norm: float) -> float:
        norm = self.grad_norm()
        if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        return norm

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters under their whole-model names (DTensors where sharded): what DCP saves and reshards."""
        state = {}
        for part in self.parts:
            state.update(part.state_dict())
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for part in self.parts:
            own = part.state_dict()
            missing = [k for k in own if k not in state]
            if missing:
                raise KeyError(f"state dict lacks {len(missing)} tensors of this rank, e.g. {missing[:3]}")
            part.load_state_dict({k: state[k] for k in own})


def apply_activation_checkpointing(model: VPiTModel) -> None:
    """Recompute each transformer block in backward instead of storing its activations."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for name in list(model.layers.keys()):
        model.layers[name] = checkpoint_wrapper(model.layers[name], preserve_rng_state=False)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _buckets(tensors: list[torch.Tensor], max_elements: int):
    bucket, size = [], 0
    for t in tensors:
        if bucket and (size + t.numel() > max_elements or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def _default(mb: dict, key: str) -> torch.Tensor:
    if mb.get(key) is not None:
        return mb[key]
    b, s = mb["tokens"].shape
    if key == "position_ids":
        return torch.arange(s).expand(b, s)
    return torch.zeros(b, s, dtype=torch.long)


def _pad_visual(visual, vmax: int):
    tokens, slots, targets = visual
    pad = vmax - tokens.shape[1]
    if pad == 0:
        return tokens, slots, targets
    b = tokens.shape[0]
    return (torch.cat([tokens, tokens.new_zeros(b, pad, tokens.shape[2])], 1),
            torch.cat([slots, slots.new_full((b, pad), -1)], 1),
            torch.cat([targets, targets.new_zeros(b, pad)], 1))
