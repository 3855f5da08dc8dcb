"""The MetaQuery trainer: `pretrain_gpt_vision.py --recipe metaquery` (docs/metaquery.md).

Built from the VPiT trainer's parts, not a copy of them: the process mesh and data-parallel wrapping
(`engine.training.parallel`: DDP or FSDP2 over the dp ranks), AdamW and the warm-up + cosine schedule
(`engine.training.optim`), the sample order (`BlendedSamples`, `RankSlice` through `build_loader`), checkpoints
(`engine.training.checkpoint`: pickle-free DCP shards, completion record, `latest`, pruning, resume with RNG state)
and metrics (`MetricsLogger`). What is MetaQuery's own: the frozen LLM (tensor-parallel over the tp ranks when
asked; never in the optimizer, the gradient reduction or the checkpoint), the trainable head (queries, connector,
optionally the decoder) and the denoising loss.

Loss normalisation: the per-sample denoising losses of the whole global batch (all micro-batches, all dp ranks)
are averaged, so any data-parallel size, micro-batch split or tensor-parallel size computes the same loss and
gradients as one process (up to float summation order). Each micro-batch backpropagates
`sum(per-sample losses) / global_batch * dp_size` (DDP/FSDP average over dp ranks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.metaquery.config import MetaQueryConfig
from engine.training import checkpoint as ckpt
from engine.training.config import TrainingConfig
from engine.training.loop import TooManySkippedSteps, TrainingLoop, run_training
from engine.training.parallel import ParallelInfo, all_reduce_sum

RECIPE = "metaquery"


def _refuse_vpit_only(config: TrainingConfig) -> None:
    """VPiT settings that mean nothing here are refused by name (never silently ignored)."""
    c = config
    checks = [
        (c.pipeline_model_parallel_size > 1, ("--pipeline-model-parallel-size > 1: the metaquery recipe shards the "
                                              "frozen LLM with tensor parallelism only (--tensor-model-parallel-size)")),
        (c.sequence_parallel, "--sequence-parallel: the frozen LLM runs prompt + queries through a KV cache"),
        (c.stage != 2 or c.stage1_train_visual_head, "--stage/--stage1-train-visual-head are VPiT's stages"),
        (c.fp8_format is not None, "--fp8-format: FP8 is for the VPiT trainer's transformer blocks"),
        (c.compile, "--compile is not wired into the metaquery recipe"),
        (bool(c.recompute_num_layers) or c.recompute_granularity != "full",
         ("--recompute-*: the LLM keeps activations of the N query positions only; nothing to recompute")),
        (c.use_distributed_optimizer, "--use-distributed-optimizer: use --data-parallel-sharding fsdp"),
        (c.model.fused_linear_cross_entropy or c.model.fused_visual_head_loss, "--fused-*: VPiT's text/visual losses"),
        (c.data.mock_data, "--mock-data: MetaQuery trains from builds made with --targets vae-latents"),
        (c.checkpoint.finetune or c.checkpoint.load_partial, ("--finetune/--load-partial: --load resumes a "
                                                              "MetaQuery checkpoint; a VPiT model is the frozen LLM "
                                                              "(--llm)")),
    ]
    problems = [message for bad, message in checks if bad]
    if problems:
        raise ValueError("not supported with --recipe metaquery:\n  " + "\n  ".join(problems))


class MetaQueryTrainer(TrainingLoop):
    """Builds data, the frozen LLM, the decoder and the head from validated configs, resumes from `--load`, trains.

    Args:
        config: the shared training settings (engine.training.config).
        mq: the MetaQuery section.
        info: from `engine.training.build_device_mesh(parallel=config.parallel_config())`.
    """

    def __init__(self, config: TrainingConfig, mq: MetaQueryConfig, info: ParallelInfo,
                 log: Callable[[str], None] | None = None):
        _refuse_vpit_only(config)
        config.validate(info.dp_size)
        mq.validate()
        self.config, self.mq, self.info, self.device = config, mq, info, info.device
        self.global_batch_size = config.resolved_global_batch_size(info.dp_size)
        self.num_micro_batches = self.global_batch_size // (config.micro_batch_size * info.dp_size)
        self._log = log or (lambda msg: print(msg, flush=True) if info.is_main else None)
        torch.manual_seed(config.seed)
        self._log("opening the data (--data-path) ...")
        self._open_data()
        self._build()
        self.iteration = self.consumed_samples = self.skipped_total = self.consecutive_skipped = 0
        self._resume()
        from engine.training.metrics import MetricsLogger

        lg = config.logging
        self.metrics = MetricsLogger(enabled=info.is_main, jsonl=lg.log_jsonl, tensorboard_dir=lg.tensorboard_dir,
                                     wandb_project=lg.wandb_project, wandb_name=lg.wandb_exp_name,
                                     run_config={**config.to_dict(), "metaquery": mq.to_dict()},
                                     resume_iteration=self.iteration)
        self._stop_requested = False

    # ------------------------------------------------------------------------------------------- setup
    def _open_data(self) -> None:
        from engine.metaquery.data import MetaQueryCollate, MetaQuerySamples, NoiseShape, null_prompts, open_builds
        from engine.tokenizer import load_saved_tokenizer

        c = self.config
        opened, error = None, None
        try:
            opened = open_builds(c.data.weighted_paths(), verify_checksums=c.data.verify_checksums and self.info.is_main)
        except (ValueError, OSError) as err:
            error = f"{err}"
        errors = [error]
        if self.info.mesh is not None:  # every rank fails together instead of hanging in the next collective
            errors = [None] * self.info.world_size
            dist.all_gather_object(errors, error)
        if any(errors):
            raise ValueError(f"--data-path: {next(e for e in errors if e)}")
        self.datasets, self.data_refs = opened
        first = self.datasets[0][1]
        self.latent_store = first.latents
        self.tokenizer_dir = first.reader.out_dir / (first.manifest.get("tokenizer") or {}).get("dir", "tokenizer")
        self.tokenizer = load_saved_tokenizer(self.tokenizer_dir)
        t = self.tokenizer
        self.vocab = {"base_vocab_size": t.base_vocab_size, "image_start_id": t.image_start_id,
                      "image_end_id": t.image_end_id, "vocab_size": t.vocab_size}
        self.template = first.manifest.get("chat_template") or "llama3"
        max_images = max(d.max_prompt_images for _, d in self.datasets)
        channels, side, _ = self.latent_store.latent_shape
        self.collate = MetaQueryCollate(seed=c.seed, pad_id=t.pad_id, nulls=null_prompts(t, self.template, max_images),
                                        noise=NoiseShape(channels, side, self.latent_store.kind == "gaussian"),
                                        cfg_prob=self.mq.cfg_prob, cfg_instruct_prob=self.mq.cfg_instruct_prob)
        fractions = c.data.split_fractions()
        self.train_samples = MetaQuerySamples(self.datasets, fractions, 0, c.train_iters * self.global_batch_size,
                                              c.seed)
        self.valid_samples = None
        if c.logging.eval_interval and fractions[1] > 0:
            self.valid_samples = MetaQuerySamples(self.datasets, fractions, 1,
                                                  c.logging.eval_iters * self.global_batch_size, c.seed)

    def _build(self) -> None:
        from engine.metaquery.connector import ConnectorConfig
        from engine.metaquery.decoder import (
            DEFAULT_NUM_QUERIES,
            INPUT_SCALE,
            NoiseSchedule,
            inspect_decoder,
            load_decoder_model,
        )
        from engine.metaquery.llm import load_llm
        from engine.metaquery.model import FrozenLLM, MetaQueryHead
        from engine.training.optim import WarmupDecaySchedule, build_optimizer
        from engine.training.parallel import parallelize

        c, mq, info = self.config, self.mq, self.info
        self.decoder_info = info_ = inspect_decoder(mq.decoder)
        self._check_decoder_against_latents()
        self.schedule_noise = NoiseSchedule(info_)
        source = (f"--llm {mq.llm}" if mq.llm else f"--load-hf {c.checkpoint.load_hf}" if c.checkpoint.load_hf
                  else "a random LLaMA of the model flags")
        self._log(f"loading the frozen LLM ({source}) and the {info_.kind} decoder ({info_.root}) ...")
        model, self.llm_ref = load_llm(llm=mq.llm, load_hf=c.checkpoint.load_hf, model_config=c.model, seed=c.seed,
                                       vocab=self.vocab, make_vocab_size_divisible_by=c.data.make_vocab_size_divisible_by,
                                       tensor_parallel_size=c.tensor_model_parallel_size,
                                       build_tokenizer_fingerprint=self.data_refs["tokenizer_fingerprint"], log=self._log)
        if c.tensor_model_parallel_size > 1:  # at start: an uneven split died at the first step (DTensor, view)
            from engine.parallel.config import tensor_parallel_refusal

            refusal = tensor_parallel_refusal(model.config, c.tensor_model_parallel_size,
                                              f"the frozen LLM's ({source})")
            if refusal:
                raise ValueError(refusal)
        self.num_queries = mq.num_queries or DEFAULT_NUM_QUERIES[info_.kind]
        query_init = FrozenLLM(model).query_init(self.num_queries, c.seed)
        frozen_dtype = torch.bfloat16 if c.bf16 else torch.float32  # frozen weights need no fp32 master copy
        model = model.to(self.device, frozen_dtype)
        if c.tensor_model_parallel_size > 1:
            from engine.parallel.tensor_parallel import apply_tensor_parallel

            apply_tensor_parallel(model, info.mesh["tp"], sequence_parallel=False)
        self.llm = FrozenLLM(model)
        decoder = load_decoder_model(info_, torch.float32 if (mq.train_decoder or not c.bf16) else torch.bfloat16)
        decoder = decoder.to(self.device)
        if not mq.train_decoder:
            decoder.requires_grad_(False).eval()
        self.frozen_decoder = None if mq.train_decoder else decoder
        self.connector_config = ConnectorConfig(hidden_size=model.config.hidden_size,
                                                output_size=info_.conditioning_width, num_layers=mq.connector_layers,
                                                input_scale=INPUT_SCALE[info_.kind])
        head = MetaQueryHead(self.num_queries, self.connector_config, query_init=query_init,
                             decoder=decoder if mq.train_decoder else None, train_queries=not mq.freeze_queries,
                             seed=c.seed).to(self.device)
        self.model = parallelize(head, info, c.data_parallel_sharding, c.bf16,
                                 reduce_in_fp32=c.accumulate_allreduce_grads_in_fp32, units=head.fsdp_units())
        self.optimizer = build_optimizer(self.model, c)
        self.schedule = WarmupDecaySchedule(self.optimizer, c.optimizer, c.train_iters)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def _check_decoder_against_latents(self) -> None:
        """The decoder must read the latents the builds hold: same channels, and (when DIR/vae/ is there) the
        very VAE that made them."""
        from engine.data.latents import describe_vae

        info, store = self.decoder_info, self.latent_store
        channels = store.latent_shape[0]
        if info.latent_channels != channels:
            raise ValueError(f"--decoder {info.root}: its {info.kind} takes {info.latent_channels}-channel latents, "
                             f"the builds hold {channels}-channel latents of {store.vae['class']}")
        if info.vae_dir is None:
            self._log(f"warning: --decoder {info.root} has no vae/: cannot check that the builds' latents were made "
                      "by its autoencoder (rendering will need one)")
            return
        found = describe_vae(info.vae_dir, int(store.vae["image_size"]))["fingerprint"]
        if found != store.vae["fingerprint"]:
            raise ValueError(f"--decoder {info.root}: its vae/ (fingerprint {found[:12]}) is not the autoencoder the "
                             f"builds' latents were made with ({store.vae['fingerprint'][:12]}); rebuild with "
                             f"--vae {info.root}")

    def architecture(self) -> dict[str, Any]:
        """What fixes the checkpoint's tensors (compared on resume, read by generation)."""
        return {"recipe": RECIPE, "num_queries": self.num_queries, "hidden_size": self.llm.hidden_size,
                "connector": self.connector_config.to_dict(), "decoder_kind": self.decoder_info.kind,
                "train_decoder": self.mq.train_decoder, "latent_shape": list(self.latent_store.latent_shape)}

    # ------------------------------------------------------------------------------------------- resume / save
    def _resume(self) -> None:
        self.run_id = ckpt.new_run_id()
        load = self._load_directory()
        if load is None:
            return
        if (load / "config.json").is_file() and not (load / ckpt.RECORD).is_file():
            raise ckpt.CheckpointError(f"--load {load} is a model-only Chrysalis checkpoint, not a MetaQuery training "
                                       "checkpoint: give a frozen LLM as --llm PATH")
        path = self._checkpoint_to_resume(load)
        if path is None:
            return
        record = ckpt.read_record(path)
        if record.get("recipe") != RECIPE:
            raise ckpt.CheckpointError(f"--load {path} is not a MetaQuery checkpoint (a VPiT one?): a VPiT model is "
                                       "given to --recipe metaquery as the frozen LLM, --llm PATH")
        mine = self.architecture()
        lines = [f"{path}: {k} is {record['model'].get(k)!r} in the checkpoint but {v!r} in this run"
                 for k, v in mine.items() if record["model"].get(k) != v]
        if record.get("llm", {}).get("fingerprint") != self.llm_ref["fingerprint"]:
            lines.append(f"{path}: trained with another frozen LLM ({record.get('llm', {}).get('path')}, fingerprint "
                         f"{str(record.get('llm', {}).get('fingerprint'))[:12]}; this run's is "
                         f"{self.llm_ref['fingerprint'][:12]})")
        if lines:
            raise ckpt.CheckpointError("\n".join(lines))
        state = ckpt.load_checkpoint(path, model=self.model, optimizer=self.optimizer, info=self.info)
        self.run_id = ckpt.resume_run_id(path) or self.run_id
        self.iteration, self.consumed_samples = state["iteration"], state["consumed_samples"]
        self.skipped_total = state.get("skipped_total", 0)
        self.consecutive_skipped = state.get("consecutive_skipped", 0)
        self.schedule.load_state_dict(state["schedule"])
        if state.get("global_batch_size") != self.global_batch_size:
            raise ValueError(f"{path} was trained with --global-batch-size {state.get('global_batch_size')}; resume "
                             "with the same value")
        if state.get("data") != self.train_samples.state():
            self._log(f"WARNING: the data or its weights changed since {path}; the sample order differs from the "
                      "original run's from here on")
        self._log(f"resumed from {path} at iteration {self.iteration} ({self.consumed_samples} samples consumed)")

    def state(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                "skipped_total": self.skipped_total, "consecutive_skipped": self.consecutive_skipped,
                "schedule": self.schedule.state_dict(), "data": self.train_samples.state(),
                "global_batch_size": self.global_batch_size}

    def save(self) -> Path:
        c = self.config
        decoder = {"path": str(self.decoder_info.root.resolve()), "kind": self.decoder_info.kind,
                   "trained": self.mq.train_decoder}
        record = {"recipe": RECIPE, "config": c.to_dict(), "metaquery": self.mq.to_dict(), "model": self.architecture(),
                  "llm": self.llm_ref, "decoder": decoder, "vocab": self.vocab, "chat_template": self.template,
                  "data": self.data_refs, "consumed_samples": self.consumed_samples}
        return ckpt.save_checkpoint(c.checkpoint.save, self.iteration, model=self.model, optimizer=self.optimizer,
                                    trainer_state=self.state(), record=record, info=self.info, run_id=self.run_id,
                                    tokenizer_dir=self.tokenizer_dir, keep_last=c.checkpoint.keep_last,
                                    log=self._log)

    # ------------------------------------------------------------------------------------------- steps
    def _latents(self, batch) -> torch.Tensor:
        return self.latent_store.scaled(batch.latents, batch.posterior_noise)

    def per_sample_losses(self, batch) -> torch.Tensor:
        """[B] denoising losses of a micro-batch already on the device."""
        with self._autocast():
            return self.model(batch, self.llm, self.schedule_noise, self.frozen_decoder, self._latents)

    def forward_backward_step(self, batch, sync_gradients: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the detached sum of its per-sample losses."""
        with self._gradient_sync(sync_gradients):
            losses = self.per_sample_losses(batch)
            (losses.sum() * (self.info.dp_size / self.global_batch_size)).backward()
        return losses.detach().double().sum()

    def train_step(self, micro_batches: Sequence) -> dict[str, Any]:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(micro_batches):
            total += self.forward_backward_step(batch, sync_gradients=i == len(micro_batches) - 1)
        loss = all_reduce_sum([total.item()], self.info)[0] / self.global_batch_size
        clip = self.config.optimizer.clip_grad or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        lr = self.schedule.lr
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.schedule.step()
            self.consecutive_skipped = 0
        else:
            self.skipped_total += 1
            self.consecutive_skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        dropped = sum(int(b.dropped_text.sum()) for b in micro_batches)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped": not finite, "cfg_dropped_text": dropped}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean denoising loss on the first `--eval-iters` global batches of the valid split (fixed per-sample noise,
        so values are comparable across the run)."""
        if self.valid_samples is None:
            return {}
        self.model.eval()
        total, count = 0.0, 0
        for batch in self._loader(self.valid_samples, 0, num_workers=0):
            total += float(self.per_sample_losses(batch.to(self.device)).double().sum())
            count += batch.size
        self.model.train()
        total, count = all_reduce_sum([total, count], self.info)
        return {"valid_loss": total / max(count, 1)}

    # ------------------------------------------------------------------------------------------- loop
    def _loader(self, samples, consumed: int, num_workers: int | None = None):
        from engine.metaquery.data import build_metaquery_loader

        return build_metaquery_loader(samples, self.collate, global_batch_size=self.global_batch_size,
                                      micro_batch_size=self.config.micro_batch_size, dp_rank=self.info.dp_rank,
                                      dp_size=self.info.dp_size, consumed_samples=consumed,
                                      num_workers=self.config.data.num_workers if num_workers is None else num_workers,
                                      pin_memory=self.device.type == "cuda")

    # -------------------------------------------------------------------------------- training loop hooks
    def _start_message(self) -> str:
        c = self.config
        trainable = sum(p.numel() for p in self.params)
        return (f"metaquery: {self.decoder_info.kind} decoder ({self.decoder_info.loss_type} loss), "
                f"{self.num_queries} queries, {self.mq.connector_layers}-block connector, frozen "
                f"{self.llm.config.num_layers}-layer LLM ({self.llm_ref['kind']}); {trainable:,} trainable "
                f"parameters; global batch {self.global_batch_size} = {self.num_micro_batches} x "
                f"{c.micro_batch_size} x {self.info.dp_size} dp ranks (tp {c.tensor_model_parallel_size}); "
                f"iterations {self.iteration} -> {c.train_iters}")

    def _step_figures(self, micro_batches: Sequence, step_s: float) -> dict[str, Any]:
        return {"samples_per_sec": self.global_batch_size / step_s}

    def _progress(self, record: dict[str, Any], step_s: float) -> None:
        valid = f" | valid loss: {record['valid_loss']:.5f}" if "valid_loss" in record else ""
        self.metrics.log(f" iteration {self.iteration:8d}/{self.config.train_iters:8d} | elapsed time per iteration "
                         f"(ms): {1000 * step_s:.1f} | lr: {record['lr']:.3E} | denoising loss: "
                         f"{record['loss']:.5f} | grad norm: {record['grad_norm']:.3f} | samples/s: "
                         f"{record['samples_per_sec']:.2f} | skipped: {self.skipped_total}{valid}")


def main(argv: list[str]) -> int:
    """`pretrain_gpt_vision.py --recipe metaquery ...` (argv without the recipe flag). Exit status as the VPiT
    entry point: 0 done / exit interval / signal; 1 on a configuration error or too many non-finite steps."""
    import sys

    from engine.metaquery.config import parse_metaquery_config

    try:
        config, mq = parse_metaquery_config(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return run_training(config, lambda info: MetaQueryTrainer(config, mq, info),
                        errors=(ValueError, OSError, TooManySkippedSteps))  # CheckpointError is a ValueError
