"""The training loop: `forward_backward_step` (one micro-batch) and `train_step` (one optimizer step over the
global batch), with validation, checkpoints, non-finite step skipping, SIGTERM and `--exit-interval` handling.

Loss normalisation. The text loss is summed over the whole global batch (all micro-batches of all data-parallel
ranks) and divided by the global number of text targets; the visual loss likewise by the global number of visual
targets. Counts are known from the batches before the forward (they are label/mask counts), so each micro-batch
backpropagates `(lm_sum / N_text + coef * visual_sum / N_visual) * dp_size` (DDP/FSDP average gradients over
ranks; the factor turns that average back into the sum). One process with global batch G and two processes with
the same G therefore compute the same loss and gradients, up to float summation order.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from engine.model import VPiTModel, build_model
from engine.training import checkpoint as ckpt
from engine.training.config import TrainingConfig
from engine.training.data import (
    BlendedSamples,
    Batch,
    PackedDataset,
    SyntheticDataset,
    build_loader,
    open_shards,
    padded_vocab_size,
)
from engine.training.loop import TrainingLoop
from engine.training.metrics import MetricsLogger, device_peak_flops, flops_per_token, memory_gib
from engine.training.optim import NewRowGradientMask, WarmupDecaySchedule, apply_stage, build_optimizer, clean_name
from engine.training.parallel import ParallelInfo, all_reduce_sum, parallelize, unwrap
from engine.training.vocab_padding import VOCAB_MATRICES, repad_rows


def _held_elements(parameters) -> tuple[int, int]:
    """(elements this rank stores, global elements) of the trainable parameters: a DTensor's local shard against
    its global size (the distributed optimizer's log line)."""
    held = [p for p in parameters if p.requires_grad]
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in held)
    return local, sum(p.numel() for p in held)


class Trainer(TrainingLoop):
    """Builds data, model, optimizer and schedule from a validated config, resumes from `--load`, and trains.

    Args:
        config: the run's configuration.
        info: from `build_device_mesh()`.
        datasets: (weight, dataset) pairs to use instead of `--data-path` / `--mock-data` (tests, benchmarks);
            each needs the `ShardReader` interface. `vocab` must then give base_vocab_size (for stage 1).
        vocab: base_vocab_size / image_start_id / image_end_id of `datasets`.
    """

    def __init__(self, config: TrainingConfig, info: ParallelInfo, *,
                 datasets: Sequence[tuple[float, PackedDataset]] | None = None, vocab: dict[str, int] | None = None,
                 log: Callable[[str], None] | None = None):
        self.config = config
        self.info = info
        self.device = info.device
        config.validate(info.dp_size)
        self.global_batch_size = config.resolved_global_batch_size(info.dp_size)
        self.num_micro_batches = self.global_batch_size // (config.micro_batch_size * info.dp_size)
        self._log = log or (lambda msg: print(msg, flush=True) if info.is_main else None)
        if config.sequence_parallel and config.tensor_model_parallel_size == 1:
            self._log("note: --sequence-parallel has no effect without tensor parallelism (TP 1): ignored, as by "
                      "Megatron-LM")
        torch.manual_seed(config.seed)

        self._open_data(datasets, vocab)
        self._resolve_fast_paths()
        self._build_model()
        self.iteration = 0
        self.consumed_samples = 0
        self.skipped_total = 0
        self.consecutive_skipped = 0
        self._resume()
        self.metrics = MetricsLogger(enabled=info.is_main, jsonl=config.logging.log_jsonl,
                                     tensorboard_dir=config.logging.tensorboard_dir,
                                     wandb_project=config.logging.wandb_project,
                                     wandb_name=config.logging.wandb_exp_name, run_config=config.to_dict(),
                                     resume_iteration=self.iteration)
        self.flops_per_token = flops_per_token(self.model_config)
        self.peak_flops = device_peak_flops(self.device, config.logging.peak_tflops)
        self._stop_requested = False

    # ------------------------------------------------------------------------------------------- setup
    def _open_data(self, datasets, vocab) -> None:
        c = self.config
        self.tokenizer_dir = None
        self.data_refs: dict[str, Any] = {}
        if datasets is not None:
            self.datasets = list(datasets)
            self.vocab = vocab
            seq_length = self.datasets[0][1].seq_length
        elif c.data.mock_data:
            seq = c.model.seq_length
            docs = 1 if seq < 512 else 2
            images = max(1, min(10, (seq // docs - 16) // 66 * docs))
            mock = SyntheticDataset(c.data.mock_data_sequences, seq, images_per_sequence=images,
                                    documents_per_sequence=docs, seed=c.seed)
            self.datasets = [(1.0, mock)]
            self.vocab = {"base_vocab_size": mock.base_vocab_size, "image_start_id": mock.image_start_id,
                          "image_end_id": mock.image_end_id, "vocab_size": mock.vocab_size}
            seq_length = mock.seq_length
        else:
            opened, error = None, None
            try:
                opened = open_shards(c.data.weighted_paths(),
                                     verify_checksums=c.data.verify_checksums and self.info.is_main)
            except (ValueError, OSError) as err:  # ManifestError is a ValueError
                error = f"{err}"
            errors = [error]
            if self.info.dp_size > 1:  # every rank fails together instead of hanging in the next collective
                errors = [None] * self.info.dp_size
                dist.all_gather_object(errors, error, group=self.info.dp_group)
            if any(errors):
                raise ValueError(f"--data-path: {next(e for e in errors if e)}")
            self.datasets, self.vocab = opened.datasets, opened.vocab
            self.tokenizer_dir, self.data_refs = opened.tokenizer_dir, opened.manifest_refs
            seq_length = opened.seq_length
        model = c.model
        if seq_length != model.seq_length:
            self._log(f"sequence length {seq_length}: the data's (the model configuration said {model.seq_length}; "
                      "--seq-length does not change packed shards, rebuild them to change it)")
            model = model.replace(seq_length=seq_length,
                                  max_position_embeddings=max(model.max_position_embeddings, seq_length))
        if self.vocab is not None and not c.vocab_size_from_flag:
            size = self.vocab.get("vocab_size", self.vocab["image_end_id"] + 1)
            model = model.replace(vocab_size=padded_vocab_size(size, c.data.make_vocab_size_divisible_by,
                                                               c.tensor_model_parallel_size), real_vocab_size=None)
        if self.vocab is not None and model.vocab_size <= self.vocab["image_end_id"]:
            raise ValueError(f"--vocab-size {model.vocab_size} is too small for the shards' tokenizer "
                             f"(<image_end> is id {self.vocab['image_end_id']})")
        if self.vocab is not None:
            # Rows past the tokenizer's ids are padding: masked out of the softmax and zero-initialised, so the
            # padding (which grows with the TP size) never changes the math (engine.model.losses).
            size = self.vocab.get("vocab_size", self.vocab["image_end_id"] + 1)
            model = model.replace(real_vocab_size=size if size < model.vocab_size else None)
        self.model_config = model
        fractions = c.data.split_fractions()
        self.train_samples = BlendedSamples(self.datasets, fractions, 0, c.train_iters * self.global_batch_size, c.seed)
        self.valid_samples = None
        if c.logging.eval_interval and fractions[1] > 0:
            self.valid_samples = BlendedSamples(self.datasets, fractions, 1,
                                                c.logging.eval_iters * self.global_batch_size, c.seed)
        elif c.logging.eval_interval:  # was silent: the run simply never validated
            self._log(f"note: --eval-interval {c.logging.eval_interval} but --split {c.data.split} leaves nothing for "
                      "validation: no validation in this run")

    def _resolve_fast_paths(self) -> None:
        """At start, before anything is built: `--attention-backend` (auto -> the fastest available; a backend
        named explicitly that cannot run here is an error, never a silent fallback) and the FP8 capability check."""
        from engine.model.attention_backends import resolve_attention_backend
        from engine.model.fp8 import Fp8Config, fp8_unsupported_reason

        c = self.config
        requested = self.model_config.attention_backend
        backend = resolve_attention_backend(requested, self.device)
        if backend != requested:
            self._log(f"--attention-backend {requested}: using {backend} on {self.device.type}")
        self.model_config = self.model_config.replace(attention_backend=backend)
        head_dim = self.model_config.head_dim
        if backend in ("triton", "triton-fp8") and not 16 <= head_dim <= 256:  # chrysalis_kernels.attention's range
            raise ValueError(f"--attention-backend {backend}: head dim {head_dim} (--hidden-size / "
                             "--num-attention-heads) is outside the Triton attention kernels' 16..256")
        if backend in ("triton", "triton-fp8") and head_dim > 128 and not c.bf16:  # fp32 tiles: up to 128
            raise ValueError(f"--attention-backend {backend}: head dim {head_dim} without --bf16 runs the Triton "
                             "attention kernels in fp32, which take head dims up to 128: add --bf16")
        from engine.model.attention_backends import triton_kernels_unavailable_reason

        for flag, wanted in (("--fused-linear-cross-entropy", self.model_config.fused_linear_cross_entropy),
                             ("--fused-visual-head-loss", self.model_config.fused_visual_head_loss)):
            reason = triton_kernels_unavailable_reason(self.device) if wanted else None
            if reason:  # at start, not as a traceback from the first step's kernel call
                raise ValueError(f"{flag}: {reason}")
        self.fp8 = None
        if c.fp8_format:
            self.fp8 = Fp8Config(format=c.fp8_format, recipe=c.fp8_recipe, backend=c.fp8_backend,
                                 fsdp_all_gather=c.data_parallel_sharding == "fsdp" or c.use_distributed_optimizer)
            reason = fp8_unsupported_reason(self.fp8, self.device)
            if reason:
                raise ValueError(f"--fp8-format {c.fp8_format}: {reason}")
        # torchao's FP8 all-gather under FSDP2 needs the weights' scales recomputed after every optimizer step.
        self.fp8_fsdp_scales = bool(self.fp8 is not None and self.fp8.backend == "torchao" and self.fp8.fsdp_all_gather
                                    and self.fp8.recipe == "tensorwise" and self.info.mesh is not None)

    def _apply_fast_paths(self, model: nn.Module) -> None:
        """FP8 conversion, activation checkpointing and per-block compilation of the single-device model, in
        torchtitan's order, before DDP/FSDP wrapping."""
        from engine.parallel.activation_checkpointing import apply_activation_checkpointing as checkpoint_blocks
        from engine.parallel.compile import compile_transformer_blocks

        c = self.config
        if self.fp8 is not None:
            from engine.model.fp8 import convert_to_fp8

            names = convert_to_fp8(model, self.fp8)
            self._log(f"FP8 GEMMs ({self.fp8.backend}, {self.fp8.recipe}, {self.fp8.format}) in {len(names)} block "
                      "linears; the embedding, LM head, projector and visual head stay in high precision")
        if c.recompute_num_layers or c.recompute_granularity == "selective":
            checkpoint_blocks(model, c.recompute_granularity, c.recompute_num_layers or -1)
        if c.compile:
            compile_transformer_blocks(model)

    def _block_transforms(self):
        """FP8, full/selective checkpointing and compile for the TP/PP model parts (engine.parallel)."""
        from engine.parallel.block_transforms import BlockTransforms

        c = self.config
        recompute = c.recompute_granularity if (c.recompute_num_layers or c.recompute_granularity == "selective") \
            else None
        return BlockTransforms(fp8=self.fp8, recompute=recompute, compile=c.compile)

    def _build_model(self) -> None:
        c = self.config
        self.parallel_model = None
        if c.model_parallel:
            self._build_model_parallel()
            return
        if c.checkpoint.load_hf:
            model = self._load_hf_model().to(self.device)
        else:
            model = build_model(self.model_config, device=self.device, dtype=torch.float32, seed=c.seed)
        self.trainable = apply_stage(model, c.stage, c.stage1_train_visual_head)
        self._apply_fast_paths(model)
        if c.use_distributed_optimizer and self.info.mesh is not None:
            from engine.training.optim import shard_optimizer_state

            self.model: nn.Module = shard_optimizer_state(model, self.info.dp_mesh, c.bf16)
            local, total = _held_elements(self.model.parameters())
            self._log(f"distributed optimizer: this rank holds {local:,} of {total:,} trainable parameter elements "
                      "and their AdamW state")
        else:
            self.model = parallelize(model, self.info, c.data_parallel_sharding, c.bf16,
                                     reduce_in_fp32=not c.grad_reduce_in_bf16)
        self.optimizer = build_optimizer(self.model, c)
        self.schedule = WarmupDecaySchedule(self.optimizer, c.optimizer, c.train_iters)
        self.grad_mask = None
        if c.stage == 1:
            base = self.vocab["base_vocab_size"] if self.vocab else self.model_config.vocab_size
            self.grad_mask = NewRowGradientMask(self.model, base)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def _load_hf_model(self) -> VPiTModel:
        """--load-hf through the converter; the run's model config becomes the imported model's (full tensors)."""
        from engine.convert import hf_to_chrysalis

        c = self.config
        model, hf_vocab = hf_to_chrysalis(
            c.checkpoint.load_hf, dtype=torch.float32, seed=c.seed,
            make_vocab_size_divisible_by=c.data.make_vocab_size_divisible_by * c.tensor_model_parallel_size)
        if self.vocab is not None:
            for key in ("base_vocab_size", "image_start_id", "image_end_id"):
                if hf_vocab[key] != self.vocab[key]:
                    raise ValueError(f"--load-hf {c.checkpoint.load_hf}: {key} {hf_vocab[key]} differs from the "
                                     f"shards' tokenizer ({self.vocab[key]}); preprocess with that model's tokenizer")
        # The architecture comes from the Hugging Face model; run choices (sequence length, attention backend,
        # fused losses, visual loss coefficient) stay this run's flags.
        from engine.config import ARCHITECTURE_FIELDS

        imported = {name: getattr(model.config, name) for name in ARCHITECTURE_FIELDS}
        self.model_config = self.model_config.replace(
            **imported, real_vocab_size=model.config.real_vocab_size, init_method_std=model.config.init_method_std,
            max_position_embeddings=max(model.config.max_position_embeddings, self.model_config.seq_length))
        model.config = self.model_config
        model.rope.config = self.model_config
        return model

    def _build_model_parallel(self) -> None:
        """Tensor/pipeline parallelism: the local model part(s) on the (pp, dp, tp) mesh (engine.parallel)."""
        from engine.parallel.parallel_model import ParallelVPiT
        from engine.training.optim import PartOptimizers

        c = self.config
        hf_model = self._load_hf_model() if c.checkpoint.load_hf else None
        from engine.parallel.config import validate_parallel_config

        # With the step's micro-batch count too (the pipeline schedule needs >= PP of them): at start, not at step 1.
        validate_parallel_config(c.parallel_config(), self.model_config, self.info.world_size, self.num_micro_batches)
        pm = ParallelVPiT(self.model_config, c.parallel_config(), self.info.mesh, device=self.device, seed=c.seed,
                          activation_checkpointing=c.recompute_num_layers != 0,
                          block_transforms=self._block_transforms(),
                          autocast_dtype=torch.bfloat16 if c.bf16 else None,
                          grad_reduce_dtype=torch.bfloat16 if c.grad_reduce_in_bf16 else torch.float32)
        self._log(f"model parallel: tp={c.tensor_model_parallel_size} pp={c.pipeline_model_parallel_size} "
                  f"dp={self.info.dp_size}; {pm.describe()}")
        if hf_model is not None:
            pm.load_full_state_dict(hf_model.state_dict())
            del hf_model
        trainable: set[str] = set()
        for part in pm.parts:
            trainable.update(apply_stage(part, c.stage, c.stage1_train_visual_head))
        self.trainable = sorted(trainable)
        self.parallel_model = self.model = pm
        if c.use_distributed_optimizer and self.info.dp_size > 1:
            local, total = _held_elements(pm.parameters())
            self._log(f"distributed optimizer (FSDP2 over dp, no reshard after forward): this rank holds {local:,} "
                      f"of the {total:,} trainable parameter elements of its pipeline stage(s) and their AdamW state")
        self.optimizer = PartOptimizers(pm.parts, c)
        self.schedule = WarmupDecaySchedule(self.optimizer, c.optimizer, c.train_iters)
        self.grad_mask = None
        if c.stage == 1:
            base = self.vocab["base_vocab_size"] if self.vocab else self.model_config.vocab_size
            masks = [NewRowGradientMask(part, base) for part in pm.parts]
            self.grad_mask = lambda: [mask() for mask in masks]
        self.params = [p for p in pm.parameters() if p.requires_grad]

    def _parameter_counts(self) -> tuple[int, int]:
        """(trainable elements, of which in vocabulary padding rows) of the whole model, the same on every rank and
        in every layout: summed over pipeline stages (each rank holds only its stages), a tied embedding's copy on
        the last stage counted once. Padding rows (always zero) are left out of the logged model size, which is then
        the same at every TP size."""
        pm = self.parallel_model
        named = (pm if pm is not None else self.model).named_parameters()
        seen, total, padding = set(), 0, 0
        for name, p in named:
            if not p.requires_grad or id(p) in seen or (pm is not None and pm._is_tied_head_copy(p)):
                continue
            seen.add(id(p))
            total += p.numel()  # a DTensor's numel is the global one
            if clean_name(name) in VOCAB_MATRICES:
                padding += self.model_config.vocab_padding * p.shape[1]
        if pm is not None and pm.pp_size > 1:
            counts = torch.tensor([total, padding], dtype=torch.int64, device=self.device)
            dist.all_reduce(counts, group=pm.pp_group)
            total, padding = (int(x) for x in counts.tolist())
        return total, padding

    @property
    def core_model(self) -> VPiTModel:
        return unwrap(self.model)

    def _resume(self) -> None:
        """--load: resume a training checkpoint (same stage), or load weights only (--finetune, another stage, a
        model-only checkpoint). The recorded model config must match this run's (each differing field is named)."""
        c = self.config
        self.run_id = ckpt.new_run_id()
        load = self._load_directory()
        if load is None:
            return
        if ((load / "config.json").is_file() and not (load / ckpt.RECORD).is_file()
                and not ckpt.holds_training_checkpoints(load)):  # --load M --save M: a requeue resumes
            self._load_model_only_checkpoint(load)
            return
        path = self._checkpoint_to_resume(load)
        if path is None:
            return
        record = ckpt.read_record(path)
        ckpt.refuse_metaquery_record(path, record, "VPiT training")
        saved_stage = record.get("config", {}).get("stage") if isinstance(record.get("config"), dict) else None
        weights_only = bool(c.checkpoint.finetune or saved_stage != c.stage)
        mismatches = ckpt.model_config_mismatches(record["model"], self.model_config, str(path))
        if mismatches and not (weights_only and c.checkpoint.load_partial):
            hint = "" if weights_only else " (a resumed run keeps its model; --load-partial only applies to " \
                                           "weights-only loads)"
            raise ckpt.CheckpointError("\n".join(mismatches) + hint)
        if weights_only:
            ckpt.load_checkpoint(path, model=self.model, optimizer=None, info=self.info,
                                 partial=c.checkpoint.load_partial, log=self._log)
            why = "--finetune" if c.checkpoint.finetune else f"it is a stage-{saved_stage} checkpoint"
            self._log(f"loaded model weights from {path} ({why}): optimizer, schedule and data start fresh")
            return
        state = ckpt.load_checkpoint(path, model=self.model, optimizer=self.optimizer, info=self.info)
        self.run_id = ckpt.resume_run_id(path) or self.run_id
        self.iteration = state["iteration"]
        self.consumed_samples = state["consumed_samples"]
        self.skipped_total = state.get("skipped_total", 0)
        self.consecutive_skipped = state.get("consecutive_skipped", 0)
        self.schedule.load_state_dict(state["schedule"])
        if state.get("data") != self.train_samples.state():
            self._log(f"WARNING: the data or its weights changed since {path}; the sample order differs from the "
                      "original run's from here on")
        if state.get("global_batch_size") != self.global_batch_size:
            raise ValueError(f"{path} was trained with --global-batch-size {state.get('global_batch_size')}; resume "
                             "with the same value")
        self._log(f"resumed from {path} at iteration {self.iteration} ({self.consumed_samples} samples consumed)")

    def _load_model_only_checkpoint(self, path: Path) -> None:
        """A model-only checkpoint (engine.checkpoint_io): strict unless --load-partial, which lists what it left
        initialised and what it did not use."""
        from engine.checkpoint_io import load_model_checkpoint

        loaded, saved = load_model_checkpoint(path, dtype=torch.float32)
        partial = self.config.checkpoint.load_partial
        mismatches = ckpt.model_config_mismatches(saved["model"], self.model_config, str(path))
        if mismatches and not partial:
            raise ckpt.CheckpointError("\n".join(mismatches) + " (--load-partial loads the tensors that fit)")
        state = loaded.state_dict()
        if loaded.config.num_real_tokens == self.model_config.num_real_tokens:  # another padding (TP size)
            state = {k: repad_rows(v, self.model_config.vocab_size) if k in VOCAB_MATRICES else v
                     for k, v in state.items()}
        with torch.device("meta"):
            own = {k: tuple(v.shape) for k, v in VPiTModel(self.model_config).state_dict().items()}
        wrong = [f"tensor {k} has shape {list(v.shape)} in {path}, {list(own[k])} in this model"
                 for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k])]
        if wrong:
            raise ckpt.CheckpointError("; ".join(wrong))
        left, unused = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        state = {k: v for k, v in state.items() if k in own}
        for name in left:
            self._log(f"--load-partial: {name} is not in {path}: left initialised")
        for name in unused:
            self._log(f"--load-partial: {name} of {path} is not used by this model")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if self.parallel_model is not None:
            self.parallel_model.load_full_state_dict(state)
        else:
            set_model_state_dict(self.model, state, options=StateDictOptions(strict=not partial))
        self._log(f"loaded model weights from the model checkpoint {path}")

    # ------------------------------------------------------------------------------------------- steps
    def forward_backward_step(self, batch: Batch, text_targets: float, visual_targets: float,
                              sync_gradients: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of one micro-batch, normalised by the global target counts.
        Returns the detached (text loss sum, visual loss sum) of this micro-batch."""
        with self._gradient_sync(sync_gradients):
            with self._autocast():
                out = self.model(batch.tokens, **batch.model_inputs())
            coef = self.model_config.visual_loss_coef
            loss = (out.lm_loss_sum / max(text_targets, 1.0) + coef * out.visual_loss_sum / max(visual_targets, 1.0))
            (loss * self.info.dp_size).backward()
        return out.lm_loss_sum.detach(), out.visual_loss_sum.detach()

    def train_step(self, micro_batches: Sequence[Batch]) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches of the global batch. Skips the update (and counts it)
        when the loss or the gradient norm is not finite."""
        if self.parallel_model is not None:
            return self._finish_step(*self._parallel_forward_backward(micro_batches))
        text_targets, visual_targets = all_reduce_sum(
            [sum(b.lm_targets for b in micro_batches), sum(b.visual_targets for b in micro_batches)], self.info)
        lm_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        visual_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(micro_batches):
            lm, vis = self.forward_backward_step(batch, text_targets, visual_targets,
                                                 sync_gradients=i == len(micro_batches) - 1)
            lm_sum += lm.double()
            visual_sum += vis.double()
        lm_total, visual_total = all_reduce_sum([lm_sum.item(), visual_sum.item()], self.info)
        lm_loss = lm_total / max(text_targets, 1.0)
        visual_loss = visual_total / max(visual_targets, 1.0)
        loss = lm_loss + self.model_config.visual_loss_coef * visual_loss
        return self._finish_step(loss, lm_loss, visual_loss, text_targets, visual_targets)

    def _parallel_forward_backward(self, micro_batches: Sequence[Batch]) -> tuple[float, float, float, float, float]:
        """Tensor/pipeline-parallel forward and backward; gradients summed over data-parallel replicas."""
        parts = self.parallel_model.forward_backward(
            [{"tokens": b.tokens, **b.model_inputs()} for b in micro_batches])
        self.parallel_model.reduce_gradients()
        return (parts["loss"], parts["lm_loss"], parts["visual_loss"], float(parts["lm_tokens"]),
                float(parts["visual_targets"]))

    def _finish_step(self, loss: float, lm_loss: float, visual_loss: float, text_targets: float,
                     visual_targets: float) -> dict[str, Any]:
        """Stage-1 row mask, clipping, and the optimizer step unless the loss or gradient norm is not finite."""
        if self.grad_mask is not None:
            self.grad_mask()
        clip = self.config.optimizer.clip_grad or float("inf")
        if self.parallel_model is not None:
            grad_norm = self.parallel_model.clip_grad_norm_(clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            grad_norm = float(grad_norm)
        lr = self.schedule.lr
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            if self.fp8_fsdp_scales:
                from engine.model.fp8 import precompute_fp8_scales

                precompute_fp8_scales(self.model)
            self.schedule.step()
            self.consecutive_skipped = 0
        else:
            self.skipped_total += 1
            self.consecutive_skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "lm_loss": lm_loss, "visual_loss": visual_loss, "visual_targets": int(visual_targets),
                "lm_tokens": int(text_targets), "lr": lr, "grad_norm": grad_norm, "skipped": not finite}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Text perplexity and mean visual cosine on the first `--eval-iters` global batches of the valid split
        (the same batches at every evaluation, so values are comparable across the run)."""
        if self.valid_samples is None:
            return {}
        self.model.eval()
        loader = self._loader(self.valid_samples, 0, num_workers=0)
        lm_sum = visual_sum = 0.0
        lm_tokens = visual_targets = 0
        if self.parallel_model is not None:
            sums = self.parallel_model.evaluate([{"tokens": b.tokens, **b.model_inputs()} for b in loader])
            self.model.train()
            lm_loss = sums["lm_loss_sum"] / max(sums["lm_tokens"], 1)
            return {"valid_lm_loss": lm_loss, "valid_ppl": math.exp(min(lm_loss, 700.0)),
                    "valid_visual_cosine": 1.0 - sums["visual_loss_sum"] / sums["visual_targets"]
                    if sums["visual_targets"] else None}
        for batch in loader:
            batch = batch.to(self.device)
            with self._autocast():
                out = self.model(batch.tokens, **batch.model_inputs())
            lm_sum += float(out.lm_loss_sum)
            visual_sum += float(out.visual_loss_sum)
            lm_tokens += batch.lm_targets
            visual_targets += batch.visual_targets
        self.model.train()
        lm_sum, visual_sum, lm_tokens, visual_targets = all_reduce_sum(
            [lm_sum, visual_sum, lm_tokens, visual_targets], self.info)
        lm_loss = lm_sum / max(lm_tokens, 1)
        return {"valid_lm_loss": lm_loss, "valid_ppl": math.exp(min(lm_loss, 700.0)),
                "valid_visual_cosine": 1.0 - visual_sum / visual_targets if visual_targets else None}

    # ------------------------------------------------------------------------------------------- loop
    def _loader(self, samples: BlendedSamples, consumed: int, num_workers: int | None = None):
        return build_loader(samples, global_batch_size=self.global_batch_size,
                            micro_batch_size=self.config.micro_batch_size, dp_rank=self.info.dp_rank,
                            dp_size=self.info.dp_size, consumed_samples=consumed,
                            seq_length=self.model_config.seq_length,
                            num_workers=self.config.data.num_workers if num_workers is None else num_workers,
                            pin_memory=self.device.type == "cuda")

    def _mfu(self, micro_batches: Sequence[Batch], step_s: float) -> dict[str, float | None]:
        """MFU of this step from the work it did (`engine.training.metrics.step_flops`: causal attention within
        documents, LM head on labelled rows); this rank's micro-batches stand for every data-parallel rank's."""
        if not self.peak_flops:
            return {"mfu": None}
        from engine.training.metrics import StepCounts, device_peak_flops, step_flops

        flops = step_flops(self.model_config, StepCounts.from_batches(micro_batches).scaled(self.info.dp_size))
        per_device = flops / (step_s * self.info.world_size)
        out = {"mfu": per_device / self.peak_flops, "tflops_per_device": per_device / 1e12}
        if self.fp8 is not None:
            fp8_peak = device_peak_flops(self.device, None, fp8=True)
            out["mfu_fp8_peak"] = per_device / fp8_peak if fp8_peak else None
        return out

    def state(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                "skipped_total": self.skipped_total, "consecutive_skipped": self.consecutive_skipped,
                "schedule": self.schedule.state_dict(), "data": self.train_samples.state(),
                "global_batch_size": self.global_batch_size}

    def save(self) -> Path:
        c = self.config
        record = {"config": c.to_dict(), "model": self.model_config.to_dict(), "stage": c.stage,
                  "vocab": self.vocab, "data": self.data_refs, "consumed_samples": self.consumed_samples}
        return ckpt.save_checkpoint(c.checkpoint.save, self.iteration, model=self.model, optimizer=self.optimizer,
                                    trainer_state=self.state(), record=record, info=self.info, run_id=self.run_id,
                                    tokenizer_dir=self.tokenizer_dir, keep_last=c.checkpoint.keep_last,
                                    log=self._log)

    # -------------------------------------------------------------------------------- training loop hooks
    def _start_message(self) -> str:
        c = self.config
        total, padding = self._parameter_counts()
        return (f"training {self.model_config.num_layers}-layer model, stage {c.stage}, "
                f"{total - padding:,} trainable parameters"
                + (f" (+{padding:,} in {self.model_config.vocab_padding} vocabulary padding rows, zero and masked)"
                   if padding else "") + ", global batch "
                f"{self.global_batch_size} = {self.num_micro_batches} micro-batches x {c.micro_batch_size} x "
                f"{self.info.dp_size} ranks, from iteration {self.iteration} to {c.train_iters}")

    def _step_figures(self, micro_batches: Sequence[Batch], step_s: float) -> dict[str, Any]:
        tokens_per_step = self.global_batch_size * self.model_config.seq_length
        return {"tokens_per_sec": tokens_per_step / step_s, **self._mfu(micro_batches, step_s),
                "memory_gib": memory_gib(self.device)}

    def _progress(self, record: dict[str, Any], step_s: float) -> None:
        self.metrics.progress(record, self.config.train_iters, 1000 * step_s)
        if "valid_ppl" in record:
            self.metrics.log(f" validation at iteration {self.iteration}: text perplexity "
                             f"{record['valid_ppl']:.4f}, mean visual cosine {record['valid_visual_cosine']}")
