"""Step metrics: the JSON-lines log, TensorBoard, Weights & Biases, the progress line, FLOPs/MFU and memory.

FLOP formula (per trained token, forward + backward = 3x forward; the PaLM / Megatron convention):

    6 * N_matmul  +  12 * L * S * H

N_matmul counts the weights used in matrix multiplies: every transformer block (attention q/k/v/o, SwiGLU
w1/w2/w3), the LM head (counted on every token, although VPiT only projects labelled rows) and the projector /
continuous-token head; the embedding lookup is not a matmul. The second term is attention's QK^T and AV
(2 * 2 * S * H per token per layer forward) WITHOUT the causal or document-mask savings, i.e. the full S x S
square is counted, as Megatron and PaLM do. MFU = FLOPs per second / (peak dense bf16 FLOP/s x devices); the
peak comes from `--peak-tflops` or the table below, and MFU is null on CPU or unknown accelerators.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any, TextIO

import torch

from engine.config import ModelConfig

# Dense bf16 peak TFLOP/s per device (no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "B200": 2250.0}
STEP_FIELDS = ("iteration", "loss", "lm_loss", "visual_loss", "visual_targets", "lr", "grad_norm", "tokens_per_sec",
               "mfu", "skipped")


def matmul_params(config: ModelConfig) -> int:
    h, f, kv = config.hidden_size, config.ffn_hidden_size, config.num_query_groups * config.head_dim
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * f
    heads = config.vision_dim * h + h * h + h * h + h * config.vision_dim  # projector + continuous-token head
    return config.num_layers * per_layer + h * config.vocab_size + heads


def flops_per_token(config: ModelConfig) -> float:
    """Training FLOPs per token: 6 * N_matmul + 12 * L * S * H (full attention square, no causal savings)."""
    return 6.0 * matmul_params(config) + 12.0 * config.num_layers * config.seq_length * config.hidden_size


def device_peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated, or this process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform != "darwin" else rss / 2**30


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Writes metrics on the main rank only. Every sink is optional.

    Args:
        jsonl: file receiving one object per optimizer step (append mode: a resumed run continues the file,
            after dropping records of iterations beyond the resumed one, which the resumed run will repeat).
        wandb_project: log to W&B when the `wandb` package is installed.
    """

    def __init__(self, *, enabled: bool, jsonl: str | None, tensorboard_dir: str | None,
                 wandb_project: str | None, wandb_name: str | None, run_config: dict[str, Any],
                 resume_iteration: int = 0, stream: TextIO | None = None):
        self.enabled = enabled
        self.stream = stream
        self.jsonl = None
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        if jsonl:
            path = Path(jsonl)
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                self._truncate_after(path, resume_iteration)
            self.jsonl = open(path, "a")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(tensorboard_dir)
            except ImportError:
                self.log("note: tensorboard is not installed; --tensorboard-dir ignored (pip install tensorboard)")
        if wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=wandb_project, name=wandb_name, config=run_config, resume="allow")
            except ImportError:
                self.log("note: wandb is not installed; --wandb-project ignored (pip install wandb)")

    @staticmethod
    def _truncate_after(path: Path, iteration: int) -> None:
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("iteration", 0) <= iteration:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        path.write_text("".join(k + "\n" for k in kept))

    def log(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream or sys.stdout, flush=True)

    def step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: _finite_or_none(v) for k, v in record.items()}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        it = record["iteration"]
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "iteration"}
        if self.tensorboard is not None:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(f"train/{k}" if not k.startswith("valid") else f"valid/{k}", v, it)
        if self.wandb is not None:
            self.wandb.log(scalars, step=it)

    def progress(self, record: dict[str, Any], train_iters: int, elapsed_ms: float) -> None:
        def fmt(v, spec):
            return "nan" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)

        mfu = record.get("mfu")
        self.log(f" iteration {record['iteration']:8d}/{train_iters:8d} | elapsed time per iteration (ms): "
                 f"{elapsed_ms:.1f} | lr: {record['lr']:.3E} | loss: {fmt(record['loss'], '.5f')} | "
                 f"lm loss: {fmt(record['lm_loss'], '.5f')} | visual loss: {fmt(record['visual_loss'], '.5f')} | "
                 f"grad norm: {fmt(record['grad_norm'], '.3f')} | tokens/s: {record['tokens_per_sec']:.0f} | "
                 f"mfu: {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
                 f"mem: {record.get('memory_gib', 0):.2f} GiB | skipped: {record.get('skipped_total', 0)}")

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()

