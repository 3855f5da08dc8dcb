"""Typed training configuration, parsed from Megatron-style flags and an optional YAML file.

Every flag lives in one table (`_FLAGS`) naming the dataclass section and field it sets, so the command line, the
YAML file and the dataclasses cannot drift apart. Precedence: flag on the command line > YAML (`--config`) >
dataclass default. YAML keys are flag names with or without the leading dashes, `-` or `_` alike:

    micro-batch-size: 4
    data_path: [0.7, /data/a, 0.3, /data/b]
    model-preset: tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.config import ModelConfig, add_model_args, model_config_from_args

LrDecayStyle = Literal["cosine", "linear", "constant"]
DataParallelSharding = Literal["none", "fsdp"]
RecomputeGranularity = Literal["full", "selective"]
Fp8Format = Literal["e4m3", "hybrid"]
Fp8Recipe = Literal["tensorwise", "rowwise", "delayed"]
Fp8Backend = Literal["torchao", "te"]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(kw_only=True)
class DataConfig:
    """Args:
        data_path: `[W1] DIR1 [W2 DIR2 ...]`, or `DIR1 DIR2 ...` without weights (each build in proportion to
            its packed sequences, as Megatron's unweighted list).
        split: train,valid,test proportions of each dataset's packed sequences (contiguous ranges, as Megatron).
        mock_data: train on `SyntheticDataset` instead of shards (Megatron's `--mock-data`).
        make_vocab_size_divisible_by: Megatron's vocabulary padding (times the tensor-parallel size).
        verify_checksums: the main rank re-hashes every shard file against its manifest at start (the others
            check sizes); turn off for multi-terabyte builds already checked with `python -m preprocess verify`.
    """

    data_path: list[str] = field(default_factory=list)
    split: str = "98,2,0"
    num_workers: int = 2
    mock_data: bool = False
    mock_data_sequences: int = 4096
    make_vocab_size_divisible_by: int = 128
    verify_checksums: bool = True

    def split_fractions(self) -> tuple[float, float, float]:
        parts = [float(p) for p in self.split.replace("/", ",").split(",")]
        parts += [0.0] * (3 - len(parts))
        if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
            raise ValueError(f"--split {self.split!r} must be up to three non-negative numbers, e.g. 98,2,0")
        total = sum(parts)
        return parts[0] / total, parts[1] / total, parts[2] / total

    def weighted_paths(self) -> list[tuple[float | None, str]]:
        """`--data-path` as (weight, path) pairs; a lone path has weight 1. A list of paths without any weight
        (Megatron's `--data-path A B C`) has weight None for each: every build contributes in proportion to its
        number of packed sequences in the split (`BlendedSamples`), as Megatron concatenates unweighted prefixes."""
        items = list(self.data_path)
        if len(items) == 1:
            return [(1.0, items[0])]
        if len(items) > 1 and not any(_is_number(item) for item in items):
            return [(None, str(item)) for item in items]
        if len(items) % 2:
            raise ValueError("--data-path takes a single DIR or pairs 'W1 DIR1 W2 DIR2 ...'; got an odd count")
        pairs = []
        for w, p in zip(items[0::2], items[1::2]):
            try:
                weight = float(w)
            except ValueError:
                raise ValueError(f"--data-path: {w!r} is not a weight; give 'W1 DIR1 W2 DIR2 ...'") from None
            if weight < 0:
                raise ValueError(f"--data-path: weight {weight} of {p} is negative")
            pairs.append((weight, str(p)))
        if sum(w for w, _ in pairs) <= 0:
            raise ValueError("--data-path: the weights sum to zero")
        return pairs


@dataclass(kw_only=True)
class OptimizerConfig:
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_warmup_fraction: float | None = None
    lr_warmup_iters: int = 0
    lr_decay_style: LrDecayStyle = "cosine"
    lr_decay_iters: int | None = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass(kw_only=True)
class CheckpointConfig:
    """Args:
        load: a training checkpoint directory (resume), or a model-only Chrysalis checkpoint (weights only).
        finetune: load only the model weights from `load` and start at iteration 0 (also automatic when the
            checkpoint's `--stage` differs from this run's).
        keep_last: keep this many newest complete checkpoints of this run (0 keeps all); other runs' checkpoints
            in the same directory are never pruned.
        verify: check every checkpoint file's sha256 before resuming.
        load_if_exists: a `load` path that does not exist (or holds no checkpoint) starts from scratch instead of
            being an error (the first launch of a job that is requeued with the same flags).
        load_partial: weights-only loads (`--finetune`, another stage, a model-only checkpoint) may leave tensors
            the checkpoint lacks initialised and ignore tensors the model lacks; both are listed.
    """

    load: str | None = None
    load_hf: str | None = None
    save: str | None = None
    save_interval: int | None = None
    keep_last: int = 0
    finetune: bool = False
    verify: bool = True
    load_if_exists: bool = False
    load_partial: bool = False


@dataclass(kw_only=True)
class LoggingConfig:
    log_interval: int = 10
    log_jsonl: str | None = None
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    eval_interval: int | None = None
    eval_iters: int = 10
    peak_tflops: float | None = None


@dataclass(kw_only=True)
class TrainingConfig:
    """The whole run. `model.vocab_size` is replaced by the data's padded vocabulary unless `vocab_size_from_flag`.

    Args:
        stage: 1 trains the projector and the new token rows (plus the continuous-token head when
            `stage1_train_visual_head`); 2 trains everything.
        recompute_num_layers: activation checkpointing on the first N transformer blocks (Megatron's
            `--recompute-method block`); -1 = every block.
        recompute_granularity: `full` recomputes whole blocks (with `recompute_num_layers`); `selective` keeps
            matmul and attention outputs and recomputes the cheap ops, per op type (torchtitan's policy), on
            `recompute_num_layers` blocks or, when that is 0, on every block.
        compile: torch.compile each transformer block (regional compilation).
        fp8_format: None (no FP8), `e4m3` or `hybrid`: FP8 GEMMs in the transformer blocks (engine.model.fp8).
        fp8_recipe / fp8_backend: `tensorwise` | `rowwise` | `delayed` scaling, by `torchao` or `te`.
        use_distributed_optimizer: shard optimizer state and gradients over the data-parallel ranks where DDP
            would be used (Megatron's distributed optimizer: reduce-scatter gradients, all-gather parameters).
        max_skipped_steps: abort when more than this many consecutive steps had a non-finite loss or gradient.
        bf16: mixed precision: bf16 autocast (FSDP2: bf16 parameter all-gathers) over fp32 master weights, fp32
            gradients and fp32 optimizer state; losses and softmax in fp32 (docs/training.md, "Precision").
        accumulate_allreduce_grads_in_fp32: reduce data-parallel gradients in fp32 (the default, which Megatron
            also forces under bf16); `--grad-reduce-in-bf16` halves the reduction's bytes at bf16 precision.
        fp16: refused with a message (use bf16; see docs/training.md).
        exit_signal_handler: on `exit_signal`, finish the step, save a checkpoint and exit 0 (on by default;
            Megatron's `--exit-signal-handler` is accepted, `--no-exit-signal-handler` turns it off).
    """

    model: ModelConfig
    vocab_size_from_flag: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    micro_batch_size: int = 1
    global_batch_size: int | None = None
    train_iters: int = 100
    exit_interval: int | None = None
    distributed_timeout_minutes: float = 10.0
    seed: int = 1234
    stage: int = 2
    stage1_train_visual_head: bool = False
    bf16: bool = False
    fp16: bool = False
    accumulate_allreduce_grads_in_fp32: bool = True
    recompute_num_layers: int = 0
    recompute_granularity: RecomputeGranularity = "full"
    compile: bool = False
    fp8_format: Fp8Format | None = None
    fp8_recipe: Fp8Recipe = "tensorwise"
    fp8_backend: Fp8Backend = "torchao"
    use_distributed_optimizer: bool = False
    data_parallel_sharding: DataParallelSharding = "none"
    max_skipped_steps: int = 10
    exit_signal_handler: bool = True
    exit_signal: str = "SIGTERM"
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    num_layers_per_virtual_pipeline_stage: int | None = None
    sequence_parallel: bool = False
    pipeline_layer_split: list[int] | None = None

    def parallel_config(self):
        """The model-parallel layout (engine.parallel.ParallelConfig) of this run."""
        from engine.parallel import ParallelConfig

        split = [int(x) for x in self.pipeline_layer_split] if self.pipeline_layer_split else None
        return ParallelConfig(tensor_model_parallel_size=self.tensor_model_parallel_size,
                              pipeline_model_parallel_size=self.pipeline_model_parallel_size,
                              num_layers_per_virtual_pipeline_stage=self.num_layers_per_virtual_pipeline_stage,
                              # Megatron-LM drops --sequence-parallel at TP 1 (launch scripts pass it for every TP
                              # size); so do we, with a note from the trainer
                              sequence_parallel=self.sequence_parallel and self.tensor_model_parallel_size > 1,
                              # Megatron's distributed optimizer under TP/PP: FSDP2 over dp without resharding
                              # after forward (ZeRO-2), as shard_optimizer_state does without model parallelism
                              data_parallel_sharding="fsdp" if self.use_distributed_optimizer
                              else self.data_parallel_sharding,
                              fsdp_reshard_after_forward=not self.use_distributed_optimizer,
                              pipeline_layer_split=split)

    @property
    def grad_reduce_in_bf16(self) -> bool:
        """Whether data-parallel gradients are reduced in bf16: `--grad-reduce-in-bf16` under `--bf16` only. The fp32
        gradients of an fp32 run are reduced in fp32 whatever the flag, as in Megatron, in every layout."""
        return self.bf16 and not self.accumulate_allreduce_grads_in_fp32

    @property
    def model_parallel(self) -> bool:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size > 1

    def validate(self, data_parallel_size: int = 1) -> None:
        """Raises ValueError naming the flag to change."""
        problems = []
        gbs = self.global_batch_size or self.micro_batch_size * data_parallel_size
        if self.micro_batch_size <= 0:
            problems.append(f"--micro-batch-size must be positive, got {self.micro_batch_size}")
        elif gbs % (self.micro_batch_size * data_parallel_size):
            problems.append(f"--global-batch-size {gbs} must be a multiple of --micro-batch-size "
                            f"{self.micro_batch_size} x data-parallel size {data_parallel_size}")
        if self.train_iters <= 0:
            problems.append(f"--train-iters must be positive, got {self.train_iters}")
        if self.stage not in (1, 2):
            problems.append(f"--stage must be 1 or 2, got {self.stage}")
        if not self.data.mock_data and not self.data.data_path:
            problems.append("give --data-path (preprocessed shards) or --mock-data")
        if self.data.data_path:
            try:
                self.data.weighted_paths()
                self.data.split_fractions()
            except ValueError as err:
                problems.append(str(err))
        if self.checkpoint.load and self.checkpoint.load_hf:
            problems.append("give either --load or --load-hf, not both")
        if self.checkpoint.save_interval is not None and self.checkpoint.save_interval <= 0:
            problems.append("--save-interval must be positive")
        if (self.checkpoint.save_interval or self.exit_interval) and not self.checkpoint.save:
            problems.append("--save-interval/--exit-interval need --save DIR")
        o = self.optimizer
        if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
            problems.append(f"need 0 <= --min-lr ({o.min_lr}) <= --lr ({o.lr}) and --lr > 0")
        if o.lr_warmup_fraction is not None and not 0 <= o.lr_warmup_fraction <= 1:
            problems.append(f"--lr-warmup-fraction must be in [0, 1], got {o.lr_warmup_fraction}")
        if self.logging.eval_interval is not None and self.logging.eval_interval <= 0:
            problems.append("--eval-interval must be positive")
        if self.max_skipped_steps < 0:
            problems.append("--max-skipped-steps must be >= 0")
        if self.fp16:
            problems.append("--fp16 is not supported: use --bf16 (same speed on A100/H100/H200, fp32's exponent "
                            "range, no loss scaling; docs/training.md explains)")
        if self.model_parallel and self.recompute_num_layers not in (0, -1):
            problems.append("with tensor/pipeline parallelism --recompute-num-layers must be 0 or -1 (all blocks)")
        if self.recompute_granularity not in ("full", "selective"):
            problems.append(f"--recompute-granularity must be full or selective, got {self.recompute_granularity!r}")
        if self.fp8_format is not None and self.fp8_recipe == "delayed" and self.fp8_backend != "te":
            problems.append("--fp8-recipe delayed needs --fp8-backend te (torchao removed delayed scaling)")
        if self.use_distributed_optimizer and self.data_parallel_sharding == "fsdp":
            problems.append("--use-distributed-optimizer is for replicated data parallelism: FSDP2 "
                            "(--data-parallel-sharding fsdp) already shards the optimizer state")
        if self.model.fused_visual_head_loss and self.tensor_model_parallel_size > 1:
            problems.append("--fused-visual-head-loss does not support a tensor-parallel visual head: drop it with "
                            "--tensor-model-parallel-size > 1")
        if self.pipeline_model_parallel_size == 1 and (self.num_layers_per_virtual_pipeline_stage
                                                       or self.pipeline_layer_split):
            problems.append("--num-layers-per-virtual-pipeline-stage and --pipeline-layer-split need "
                            "--pipeline-model-parallel-size > 1")
        if self.pipeline_layer_split:
            try:
                [int(x) for x in self.pipeline_layer_split]
            except ValueError:
                problems.append(f"--pipeline-layer-split takes integers, got {self.pipeline_layer_split}")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))  # one error: line

    def resolved_global_batch_size(self, data_parallel_size: int) -> int:
        return self.global_batch_size or self.micro_batch_size * data_parallel_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)


# flag -> (section or "" for TrainingConfig itself, field, type, help). `bool` flags are store_true.
_FLAGS: dict[str, tuple[str, str, Any, str]] = {
    "--data-path": ("data", "data_path", list, "[W1] DIR1 [W2 DIR2 ...]: preprocessed shard directories"),
    "--split": ("data", "split", str, "train,valid,test proportions, e.g. 98,2,0"),
    "--num-workers": ("data", "num_workers", int, "background loader processes per rank"),
    "--mock-data": ("data", "mock_data", bool, "synthetic packed sequences instead of shards"),
    "--mock-data-sequences": ("data", "mock_data_sequences", int, "size of the synthetic dataset"),
    "--make-vocab-size-divisible-by": ("data", "make_vocab_size_divisible_by", int, "vocabulary padding"),
    "--no-verify-data-checksums": ("data", "verify_checksums", "store_false", "skip sha256 of shards at start"),
    "--lr": ("optimizer", "lr", float, "peak learning rate"),
    "--min-lr": ("optimizer", "min_lr", float, "final learning rate of the decay"),
    "--lr-warmup-fraction": ("optimizer", "lr_warmup_fraction", float, "warm-up as a fraction of the decay"),
    "--lr-warmup-iters": ("optimizer", "lr_warmup_iters", int, "warm-up iterations (if no fraction)"),
    "--lr-decay-style": ("optimizer", "lr_decay_style", str, "cosine | linear | constant"),
    "--lr-decay-iters": ("optimizer", "lr_decay_iters", int, "decay length (default --train-iters)"),
    "--weight-decay": ("optimizer", "weight_decay", float, "AdamW decoupled weight decay"),
    "--adam-beta1": ("optimizer", "adam_beta1", float, ""),
    "--adam-beta2": ("optimizer", "adam_beta2", float, ""),
    "--adam-eps": ("optimizer", "adam_eps", float, ""),
    "--clip-grad": ("optimizer", "clip_grad", float, "global gradient-norm clip (0 = off)"),
    "--load": ("checkpoint", "load", str, "checkpoint directory to resume from"),
    "--load-hf": ("checkpoint", "load_hf", str, "Hugging Face LLaMA directory to start from"),
    "--save": ("checkpoint", "save", str, "checkpoint directory"),
    "--save-interval": ("checkpoint", "save_interval", int, "save every N iterations"),
    "--keep-last": ("checkpoint", "keep_last", int, "keep the N newest checkpoints (0 = all)"),
    "--finetune": ("checkpoint", "finetune", bool, "load model weights only, start at iteration 0"),
    "--no-verify-checkpoint": ("checkpoint", "verify", "store_false", "skip sha256 checks when resuming"),
    "--load-if-exists": ("checkpoint", "load_if_exists", bool, "start from scratch when --load does not exist"),
    "--load-partial": ("checkpoint", "load_partial", bool,
                       "weights-only loads may leave missing tensors initialised (listed)"),
    "--log-interval": ("logging", "log_interval", int, "progress line every N iterations"),
    "--log-jsonl": ("logging", "log_jsonl", str, "one JSON object per optimizer step"),
    "--tensorboard-dir": ("logging", "tensorboard_dir", str, ""),
    "--wandb-project": ("logging", "wandb_project", str, ""),
    "--wandb-exp-name": ("logging", "wandb_exp_name", str, ""),
    "--eval-interval": ("logging", "eval_interval", int, "validate every N iterations"),
    "--eval-iters": ("logging", "eval_iters", int, "global batches per validation"),
    "--peak-tflops": ("logging", "peak_tflops", float, "accelerator peak for MFU (default: known GPUs)"),
    "--micro-batch-size": ("", "micro_batch_size", int, ""),
    "--global-batch-size": ("", "global_batch_size", int, "default: micro-batch x data-parallel size"),
    "--train-iters": ("", "train_iters", int, "length of the run (and of the LR schedule)"),
    "--exit-interval": ("", "exit_interval", int, "save and exit when iteration %% N == 0"),
    "--distributed-timeout-minutes": ("", "distributed_timeout_minutes", float,
                                      "how long a collective may wait for the other ranks before the process group "
                                      "fails (Megatron-LM's flag and default)"),
    "--seed": ("", "seed", int, "initialisation and data order"),
    "--stage": ("", "stage", int, "1: projector + new token rows; 2: everything"),
    "--stage1-train-visual-head": ("", "stage1_train_visual_head", bool, "also train the visual head in stage 1"),
    "--bf16": ("", "bf16", bool, "bf16 mixed precision with fp32 master weights, grads and optimizer state"),
    "--fp16": ("", "fp16", bool, "not supported (refused with a message): use --bf16"),
    "--accumulate-allreduce-grads-in-fp32": ("", "accumulate_allreduce_grads_in_fp32", bool,
                                             "reduce data-parallel gradients in fp32 (the default)"),
    "--grad-reduce-in-bf16": ("", "accumulate_allreduce_grads_in_fp32", "store_false",
                              "reduce data-parallel gradients in bf16 (half the bytes) under --bf16"),
    "--recompute-num-layers": ("", "recompute_num_layers", int, "activation checkpointing on the first N blocks"),
    "--recompute-granularity": ("", "recompute_granularity", str,
                                "full (whole blocks) | selective (per op type: keep matmuls and attention)"),
    "--compile": ("", "compile", bool, "torch.compile each transformer block (regional compilation)"),
    "--fp8-format": ("", "fp8_format", str, "FP8 GEMMs in the transformer blocks: e4m3 | hybrid (e5m2 grads)"),
    "--fp8-recipe": ("", "fp8_recipe", str, "tensorwise | rowwise | delayed (te only) scaling"),
    "--fp8-backend": ("", "fp8_backend", str, "torchao (float8 training) | te (Transformer Engine)"),
    "--use-distributed-optimizer": ("", "use_distributed_optimizer", bool,
                                    "shard optimizer state over data-parallel ranks (Megatron's)"),
    "--data-parallel-sharding": ("", "data_parallel_sharding", str, "none (DDP) | fsdp (FSDP2)"),
    "--max-skipped-steps": ("", "max_skipped_steps", int, "abort after this many consecutive non-finite steps"),
    "--exit-signal-handler": ("", "exit_signal_handler", bool,
                              "on --exit-signal save a checkpoint and exit 0 (the default)"),
    "--no-exit-signal-handler": ("", "exit_signal_handler", "store_false", "die on --exit-signal instead"),
    "--exit-signal": ("", "exit_signal", str, "signal that triggers save-and-exit (default SIGTERM)"),
    "--tensor-model-parallel-size": ("", "tensor_model_parallel_size", int, "TP size (DTensor plans)"),
    "--pipeline-model-parallel-size": ("", "pipeline_model_parallel_size", int, "PP stages"),
    "--num-layers-per-virtual-pipeline-stage": ("", "num_layers_per_virtual_pipeline_stage", int,
                                                "interleaved 1F1B with this many layers per virtual stage"),
    "--sequence-parallel": ("", "sequence_parallel", bool, "shard norm regions along the sequence (TP > 1)"),
    "--pipeline-layer-split": ("", "pipeline_layer_split", list, "layers per pipeline stage, e.g. 3 5"),
    # Section "model": fields of ModelConfig that only change how the losses are computed (chrysalis_kernels).
    "--fused-linear-cross-entropy": ("model", "fused_linear_cross_entropy", bool,
                                     "LM head + cross-entropy in chunks, no [tokens, vocab] logits (Triton)"),
    "--fused-visual-head-loss": ("model", "fused_visual_head_loss", bool,
                                 "continuous-token head + cosine loss, activations recomputed in backward (Triton)"),
}
_CHOICES = {"--lr-decay-style": ["cosine", "linear", "constant"], "--data-parallel-sharding": ["none", "fsdp"],
            "--stage": [1, 2], "--exit-signal": ["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"]}

_CHOICES.update({"--recompute-granularity": ["full", "selective"], "--fp8-format": ["e4m3", "hybrid"],
                 "--fp8-recipe": ["tensorwise", "rowwise", "delayed"], "--fp8-backend": ["torchao", "te"]})


def build_parser() -> argparse.ArgumentParser:
    """All training flags plus the model flags of `engine.config`. Defaults are None: unset flags fall through
    to YAML, then to the dataclass defaults."""
    from engine.training import megatron_flags as mf

    parser = mf.MegatronCompatibleParser(usage=mf.USAGE, allow_abbrev=False,
                                         description="VPiT pretraining (stage 1 / stage 2). Flags are Megatron-LM's "
                                                     "where the concept is shared; see docs/training.md.")
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="YAML file setting any flag; the command line wins")
    # Rendering only (groups like Megatron's, readable metavars, dataclass defaults); the table stays as written.
    groups = {title: parser.add_argument_group(title) for title in mf.GROUP_ORDER}
    for flag, (section, name, typ, help_text) in _FLAGS.items():
        dest = _dest(section, name)
        title = mf.help_group(section, name)
        group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        help_text = mf.help_with_default(help_text, typ, _default_of(section, name))
        if typ is bool:
            group.add_argument(flag, dest=dest, action="store_true", default=None, help=help_text)
        elif typ == "store_false":
            group.add_argument(flag, dest=dest, action="store_false", default=None, help=help_text)
        elif typ is list:
            group.add_argument(flag, dest=dest, nargs="+", default=None, metavar=mf.metavar(flag), help=help_text)
        else:
            group.add_argument(flag, dest=dest, type=typ, default=None, choices=_CHOICES.get(flag),
                               metavar=None if flag in _CHOICES else mf.metavar(flag), help=help_text)
    add_model_args(parser)
    for action in parser._actions:  # model-shape flags: say where an unset one comes from
        if action.help is None and action.option_strings and action.dest not in ("help", "model_preset"):
            action.help = "(default: the --model-preset's value)"
    mf.add_megatron_flags(parser)
    return parser


def _default_of(section: str, name: str) -> Any:
    """The dataclass default of a `_FLAGS` entry (shown in --help), None when it has none."""
    cls = {"": TrainingConfig, "data": DataConfig, "optimizer": OptimizerConfig, "checkpoint": CheckpointConfig,
           "logging": LoggingConfig, "model": ModelConfig}.get(section)
    for f in dataclasses.fields(cls) if cls else ():
        if f.name == name:
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            return None if f.default is dataclasses.MISSING else f.default
    return None


def _dest(section: str, name: str) -> str:
    return f"{section}__{name}" if section else name


def _yaml_defaults(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    import yaml

    text = Path(path).read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of flag names to values")
    by_flag = {}
    for action in parser._actions:
        for option in action.option_strings:
            by_flag[option.lstrip("-").replace("_", "-")] = action
    defaults: dict[str, Any] = {}
    unknown = []
    for key, value in data.items():
        action = by_flag.get(str(key).lstrip("-").replace("_", "-"))
        if action is None or action.dest == "config":
            unknown.append(str(key))
            continue
        if value is not None and action.type is not None and action.nargs is None:
            value = action.type(value)
        if action.nargs == "+" and not isinstance(value, list):
            value = str(value).split()
        if action.nargs == "+":
            value = [str(v) for v in value]
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"{path}: {key}: {value!r} is not one of {action.choices}")
        defaults[action.dest] = value
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)} (use the flag names, e.g. micro-batch-size)")
    return defaults


def parse_training_config(argv: list[str] | None = None) -> TrainingConfig:
    """Flags (+ `--config run.yaml`) -> a TrainingConfig, not yet validated against the data-parallel size."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_yaml_defaults(pre.config, parser))
    args = parser.parse_args(argv)
    from engine.training.megatron_flags import apply_megatron_flags, print_notes

    print_notes(apply_megatron_flags(args, parser))  # Megatron-LM aliases -> our flags; accepted flags checked
    sections: dict[str, dict[str, Any]] = {"": {}, "data": {}, "optimizer": {}, "checkpoint": {}, "logging": {},
                                           "model": {}}
    for flag, (section, name, _, _) in _FLAGS.items():
        value = getattr(args, _dest(section, name))
        if value is not None:
            sections[section][name] = value
    if sections[""].get("recompute_granularity") == "full" and not sections[""].get("recompute_num_layers"):
        # Megatron-core refuses full recompute without a layer count too; here it silently recomputed nothing.
        raise ValueError("--recompute-granularity full needs --recompute-num-layers N (the first N blocks; -1 = "
                         "every block)")
    timeout = sections[""].get("distributed_timeout_minutes", 10.0)
    if not (math.isfinite(timeout) and timeout > 0):  # checked here: the process group is made before validate()
        raise ValueError(f"--distributed-timeout-minutes must be a positive number, got {timeout}")
    if not args.model_preset and args.num_layers is None:
        args.model_preset = "tiny" if sections["data"].get("mock_data") else None
    model = model_config_from_args(args).replace(**sections.pop("model"))
    kv_channels = getattr(args, "megatron_accepted__kv_channels", None)  # Megatron's --kv-channels
    if kv_channels is not None and str(kv_channels) != str(model.head_dim):
        raise ValueError(f"--kv-channels {kv_channels}: the head dimension here is --hidden-size {model.hidden_size} / "
                         f"--num-attention-heads {model.num_attention_heads} = {model.head_dim}")
    return TrainingConfig(
        model=model,
        vocab_size_from_flag=args.vocab_size is not None,
        data=DataConfig(**sections["data"]),
        optimizer=OptimizerConfig(**sections["optimizer"]),
        checkpoint=CheckpointConfig(**sections["checkpoint"]),
        logging=LoggingConfig(**sections["logging"]),
        **sections[""],
    )


def training_config_from_dict(data: dict[str, Any]) -> TrainingConfig:
    """Inverse of `TrainingConfig.to_dict` (used to read the config stored in a checkpoint)."""
    data = dict(data)
    return TrainingConfig(
        model=ModelConfig.from_dict(data.pop("model")),
        data=DataConfig(**data.pop("data")),
        optimizer=OptimizerConfig(**data.pop("optimizer")),
        checkpoint=CheckpointConfig(**data.pop("checkpoint")),
        logging=LoggingConfig(**data.pop("logging")),
        **data,
    )
