"""Step metrics: the JSON-lines log, TensorBoard, Weights & Biases, the progress line, FLOPs/MFU and memory.

FLOPs (forward + backward = 3x forward, 2 FLOPs per multiply-add; the PaLM / Megatron convention), counted on the
work the model actually does in a step (`step_flops`), so packing and prompt masking cannot inflate MFU:

    6 * N_block * tokens                       every transformer block matmul (q, k, v, o, w1, w2, w3), every token
  + 6 * H * V * text_rows                      the LM head, on labelled rows only (VPiT projects no other row)
  + 6 * (1152 * H + H * H) * visual_slots      the projector, on the visual-token slots
  + 6 * (H * H + H * 1152) * visual_targets    the continuous-token head, on the rows predicting a visual token
  + 12 * L * Hq * D * attended_pairs           QK^T and AV, causal within each document

attended_pairs = sum over documents of n (n + 1) / 2: causal attention counted as half of the square, over each
packed document rather than the whole row. The embedding lookup, norms and elementwise ops are not counted.

`flops_per_token(config)` is the convention published figures use (NeMo, Megatron-Bridge, torchtitan): one
unpacked document per row, every token through every matmul, causal attention as half of the S x S square; the
GPU benchmark reports MFU both ways. MFU = FLOPs / (step time x devices x dense BF16 peak); with FP8 GEMMs it is
also given against the FP8 peak (`mfu_fp8_peak`). Peaks come from `--peak-tflops` or the table below; MFU is null
on CPU or unknown accelerators.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO

import torch

from engine.config import ModelConfig

# Dense peak TFLOP/s (no sparsity) per GPU, as (BF16, FP8); more specific names first (matched as substrings of
# torch.cuda.get_device_name). SXM figures unless the name says otherwise.
PEAK_TFLOPS: dict[str, tuple[float, float | None]] = {
    "H100 PCIe": (756.0, 1513.0), "H100 NVL": (835.0, 1671.0), "GH200": (989.0, 1979.0), "H200": (989.0, 1979.0),
    "H100": (989.0, 1979.0), "H800": (989.0, 1979.0), "GB200": (2500.0, 5000.0), "B200": (2250.0, 4500.0),
    "A100": (312.0, None), "A800": (312.0, None), "L40S": (362.0, 733.0), "L4": (121.0, 242.0), "A10": (125.0, None),
}
STEP_FIELDS = ("iteration", "loss", "lm_loss", "visual_loss", "visual_targets", "lr", "grad_norm", "tokens_per_sec",
               "mfu", "skipped")


def block_matmul_params(config: ModelConfig) -> int:
    """Weights of one transformer block's matmuls: q, o (H x H), k, v (H x kv), w1, w2, w3 (H x F)."""
    h, f, kv = config.hidden_size, config.ffn_hidden_size, config.num_query_groups * config.head_dim
    return h * h * 2 + h * kv * 2 + 3 * h * f


def visual_matmul_params(config: ModelConfig) -> tuple[int, int]:
    """(projector, continuous-token head) matmul weights."""
    h = config.hidden_size
    return config.vision_dim * h + h * h, h * h + h * config.vision_dim


def matmul_params(config: ModelConfig) -> int:
    """Every matmul weight: the blocks, the LM head and the projector / continuous-token head."""
    return config.num_layers * block_matmul_params(config) + config.hidden_size * config.vocab_size + \
        sum(visual_matmul_params(config))


def attention_flops_per_pair(config: ModelConfig) -> float:
    """Training FLOPs of one (query, key) pair over all layers: QK^T and AV (2 * 2 * Hq * D forward) x 3."""
    return 12.0 * config.num_layers * config.num_attention_heads * config.head_dim


def flops_per_token(config: ModelConfig) -> float:
    """The published convention: 6 * N_matmul + causal attention over an unpacked row of seq_length tokens (a
    token at position t attends t + 1 keys: (S + 1) / 2 on average)."""
    return 6.0 * matmul_params(config) + attention_flops_per_pair(config) * (config.seq_length + 1) / 2


def attended_pairs(document_ids: torch.Tensor | None, batch: int, seq_len: int) -> int:
    """Causal (query, key) pairs within documents: sum of n (n + 1) / 2 over the documents (runs of equal ids)."""
    if document_ids is None:
        return batch * seq_len * (seq_len + 1) // 2
    from engine.model.attention import packed_document_bounds

    cu, _ = packed_document_bounds(document_ids, batch, seq_len, document_ids.device)
    n = (cu[1:] - cu[:-1]).long()
    return int((n * (n + 1) // 2).sum().item())


@dataclass
class StepCounts:
    """What one step computed: tokens through the blocks, rows through the LM head, the projector and the
    continuous-token head, and causal attention pairs."""

    tokens: int = 0
    text_rows: int = 0
    visual_slots: int = 0
    visual_targets: int = 0
    attention_pairs: int = 0

    @classmethod
    def from_batches(cls, batches: Sequence[Any]) -> "StepCounts":
        """From `engine.training.data.Batch`es (tokens, document_ids, visual_tokens, lm/visual target counts)."""
        counts = cls()
        for b in batches:
            rows, seq = b.tokens.shape[:2]
            counts.tokens += rows * seq
            counts.text_rows += int(b.lm_targets)
            counts.visual_targets += int(b.visual_targets)
            counts.visual_slots += 0 if b.visual_tokens is None else int(b.visual_tokens.shape[0])
            counts.attention_pairs += attended_pairs(b.document_ids, rows, seq)
        return counts

    def scaled(self, factor: int) -> "StepCounts":
        return StepCounts(*(factor * getattr(self, f) for f in ("tokens", "text_rows", "visual_slots",
                                                                  "visual_targets", "attention_pairs")))


def step_flops(config: ModelConfig, counts: StepCounts) -> float:
    """Training FLOPs of a step (see the module docstring)."""
    projector, head = visual_matmul_params(config)
    return 6.0 * (config.num_layers * block_matmul_params(config) * counts.tokens
                  + config.hidden_size * config.vocab_size * counts.text_rows
                  + projector * counts.visual_slots + head * counts.visual_targets) \
        + attention_flops_per_pair(config) * counts.attention_pairs


def device_peak_flops(device: torch.device, override_tflops: float | None, fp8: bool = False) -> float | None:
    """Dense peak FLOP/s of `device` (BF16, or FP8 with `fp8`), from `--peak-tflops` or PEAK_TFLOPS."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, fp8_peak) in PEAK_TFLOPS.items():
        if key in name:
            peak = fp8_peak if fp8 else bf16
            return None if peak is None else peak * 1e12
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

