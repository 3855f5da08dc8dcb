"""The outer training loop both recipes share: steps, logging, validation, the exit signal, saving and stopping.

`Trainer` (VPiT) and `engine.metaquery.trainer.MetaQueryTrainer` build different models and losses but stop, save
and resume by the same rules (Megatron's): `--train-iters`, `--exit-interval` (save, exit 0), `--save-interval`,
the exit signal (every rank saves after the current step, then exits 0), `--max-skipped-steps` consecutive
non-finite steps (abort). A recipe provides `train_step`, `evaluate`, `save`, `_loader` and the few hooks below.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


class TooManySkippedSteps(RuntimeError):
    """More consecutive non-finite steps than `--max-skipped-steps`."""


def run_training(config, build_trainer, errors: tuple[type[BaseException], ...]) -> int:
    """The command-line run of either recipe: the process group and mesh (`--distributed-timeout-minutes`), then
    `build_trainer(info).train()`. An exception of `errors` is one `error:` line and exit status 1. Under torchrun
    the process leaves with `os._exit` once its output is flushed: tearing down the DDP reducer / gloo process group
    at exit occasionally hangs (torch 2.13 CPU, seen once in ~20 runs), and the checkpoint and logs are on disk."""
    import os
    import sys

    from engine.training.parallel import build_device_mesh

    try:
        info = build_device_mesh(timeout_s=60 * config.distributed_timeout_minutes, parallel=config.parallel_config())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    code = 0
    try:
        build_trainer(info).train()
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        code = 1
    if dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


class TrainingLoop:
    """Mixin: `train()` over a recipe's `train_step`. Expects `config` (a `TrainingConfig`), `info` (a
    `ParallelInfo`), `device`, `metrics`, `iteration`, `consumed_samples`, `global_batch_size`,
    `num_micro_batches`, `consecutive_skipped`, `skipped_total`, `train_samples`, `_stop_requested`, `model`,
    `_log`."""

    # ------------------------------------------------------------------------------------------------ hooks
    def _start_message(self) -> str:
        """One line logged before the first step: what trains, on which batch, from where to where."""
        raise NotImplementedError

    def _step_figures(self, micro_batches: Sequence, step_s: float) -> dict[str, Any]:
        """Recipe-specific throughput figures of one step (tokens/s and MFU, or samples/s)."""
        raise NotImplementedError

    def _progress(self, record: dict[str, Any], step_s: float) -> None:
        """The progress line(s) of a logged step."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ --load
    def _checkpoint_to_resume(self, load: Path) -> Path | None:
        """The checkpoint under an existing `--load` directory to resume from (`find_resumable`); None when it
        holds none and --load-if-exists allows starting from scratch, else CheckpointError."""
        from engine.training import checkpoint as ckpt

        c = self.config.checkpoint
        path = ckpt.find_resumable(load, verify=c.verify, info=self.info, log=self._log)
        if path is None:
            if not c.load_if_exists:
                raise ckpt.CheckpointError(f"--load {load} holds no checkpoint (pass --load-if-exists to start from "
                                           "scratch when there is none yet)")
            self._log(f"no checkpoint in {load}: starting from scratch (--load-if-exists)")
        return path

    def _load_directory(self) -> Path | None:
        """--load as a Path; None when there is nothing to load (no --load, or a missing one with
        --load-if-exists), CheckpointError for a missing one without it."""
        from engine.training import checkpoint as ckpt

        c = self.config.checkpoint
        if not c.load:
            return None
        load = Path(c.load)
        if load.exists():
            return load
        if not c.load_if_exists:
            raise ckpt.CheckpointError(f"--load {load}: no such file or directory (pass --load-if-exists to start "
                                       "from scratch when it is missing)")
        self._log(f"--load {load} does not exist: starting from scratch (--load-if-exists)")
        return None

    # ------------------------------------------------------------------------------------------------ one step
    def _autocast(self):
        if self.config.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _gradient_sync(self, enabled: bool):
        """No gradient reduction on all but the last micro-batch of a step."""
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext() if enabled else self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------------ signals
    def _on_exit_signal(self, signum, frame) -> None:
        self._stop_requested = True
        print(f"[rank {self.info.rank}] received signal {signum}: saving a checkpoint after this step, then exiting",
              flush=True)

    def _should_stop(self) -> bool:
        """All ranks agree: one rank (of any group: data, tensor or pipeline parallel) may have been signalled
        alone, and every rank must then save and leave at the same step."""
        flag = float(self._stop_requested)
        if self.info.mesh is not None and dist.is_initialized() and dist.get_world_size() > 1:
            on_gpu = dist.get_backend() == "nccl"
            t = torch.tensor([flag], dtype=torch.float64, device=self.device if on_gpu else "cpu")
            dist.all_reduce(t)
            flag = float(t.item())
        return flag > 0

    # ------------------------------------------------------------------------------------------------ loop
    def train(self) -> str:
        """Runs until `--train-iters`, `--exit-interval` or the exit signal. Returns why it stopped: "done",
        "exit-interval" or "signal". Raises TooManySkippedSteps."""
        c = self.config
        exit_signal = getattr(signal, c.exit_signal)
        previous = signal.signal(exit_signal, self._on_exit_signal) if c.exit_signal_handler else None
        batches = iter(self._loader(self.train_samples, self.consumed_samples))
        self._log(self._start_message())
        reason, last_saved = "done", None
        try:
            while self.iteration < c.train_iters:
                start = time.perf_counter()
                micro = [next(batches).to(self.device) for _ in range(self.num_micro_batches)]
                data_s = time.perf_counter() - start
                result = self.train_step(micro)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                step_s = time.perf_counter() - start
                self.iteration += 1
                self.consumed_samples += self.global_batch_size
                record = {"iteration": self.iteration, **result, **self._step_figures(micro, step_s),
                          "data_wait_s": data_s, "step_s": step_s, "skipped_total": self.skipped_total,
                          "consumed_samples": self.consumed_samples}
                if c.logging.eval_interval and self.iteration % c.logging.eval_interval == 0:
                    record.update(self.evaluate())
                self.metrics.step(record)
                if self.iteration % c.logging.log_interval == 0 or result["skipped"] or self.iteration == 1:
                    self._progress(record, step_s)
                if self.consecutive_skipped > c.max_skipped_steps:
                    raise TooManySkippedSteps(
                        f"{self.consecutive_skipped} consecutive steps had a non-finite loss or gradient "
                        f"(--max-skipped-steps {c.max_skipped_steps}); last grad norm {result['grad_norm']}")
                stop = self._should_stop()
                exit_now = bool(c.exit_interval and self.iteration % c.exit_interval == 0)
                periodic = bool(c.checkpoint.save_interval and self.iteration % c.checkpoint.save_interval == 0)
                if c.checkpoint.save and (stop or exit_now or periodic):
                    self.save()
                    last_saved = self.iteration
                if stop:
                    reason = "signal"
                    break
                if exit_now and self.iteration < c.train_iters:
                    reason = "exit-interval"
                    self._log(f"exiting at iteration {self.iteration} (--exit-interval {c.exit_interval})")
                    break
            if reason == "done" and c.checkpoint.save and last_saved != self.iteration:
                self.save()
        finally:
            if c.exit_signal_handler:
                signal.signal(exit_signal, previous)
            self.metrics.close()
        return reason
