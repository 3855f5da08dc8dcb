"""Parallel layouts the trainer can run, their enumeration, and the launch flags of one.

A `Layout` is one choice of tensor (TP, with or without sequence parallelism), pipeline (PP, interleaved with
virtual stages or not), data parallelism (DP: replicated DDP, FSDP2, or the distributed optimizer), micro-batch
size, activation checkpointing and FP8. Validity is the trainer's own: `engine.parallel.validate_parallel_config`
and `TrainerSupport` (what `engine.training.Trainer` accepts today), so the planner never proposes a layout the
trainer refuses.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from engine.config import ModelConfig
from engine.parallel.config import ParallelConfig, validate_parallel_config
from engine.planning.hardware import GpuSpec

Sharding = Literal["none", "fsdp", "distopt"]
Recompute = Literal["none", "selective", "full"]

# The two tokens VPiT appends to the tokenizer (<image_start>, <image_end>) before Megatron's padding.
IMAGE_TOKENS = 2


@dataclass(frozen=True, kw_only=True)
class TrainerSupport:
    """What `engine.training.Trainer` accepts, per kind of layout (`current()` reads it from the code;
    tests/test_plan.py checks the result against the trainer's behaviour).

    Args:
        flags: the training CLI's option strings (`--fp8-format`, `--recompute-granularity`, ...).
        bf16_model_parallel: `--bf16` together with TP or PP > 1.
        fast_paths_model_parallel: FP8 and selective recompute applied under TP/PP (the model-parallel wrapper takes
            the trainer's block transforms: `ParallelVPiT(block_transforms=...)`).
        distributed_optimizer_model_parallel: `--use-distributed-optimizer` with TP/PP (FSDP2 over dp without
            resharding after forward: `ParallelConfig.fsdp_reshard_after_forward`).
    """

    flags: frozenset[str] = field(default_factory=frozenset)
    bf16_model_parallel: bool = False
    fast_paths_model_parallel: bool = False
    distributed_optimizer_model_parallel: bool = False

    @classmethod
    def current(cls) -> TrainerSupport:
        """Read from the code: the training CLI's flags, and what the model-parallel wrapper takes: an autocast
        dtype (`ParallelVPiT(autocast_dtype=...)`, how the trainer runs --bf16 under TP/PP), block transforms (FP8,
        selective recompute) and a ZeRO-2 FSDP layout (the distributed optimizer). tests/test_plan.py checks each
        against what the trainer accepts."""
        import dataclasses
        import inspect

        from engine.parallel.config import ParallelConfig
        from engine.parallel.parallel_model import ParallelVPiT
        from engine.training.config import build_parser

        flags = frozenset(opt for action in build_parser()._actions for opt in action.option_strings)
        takes = inspect.signature(ParallelVPiT.__init__).parameters
        return cls(flags=flags, bf16_model_parallel="autocast_dtype" in takes,
                   fast_paths_model_parallel="block_transforms" in takes,
                   distributed_optimizer_model_parallel="fsdp_reshard_after_forward" in
                   {f.name for f in dataclasses.fields(ParallelConfig)})

    def has(self, flag: str) -> bool:
        return flag in self.flags


@dataclass(frozen=True, kw_only=True)
class Layout:
    """One parallel layout of `tp * pp * dp` GPUs.

    Args:
        vpp_layers: `--num-layers-per-virtual-pipeline-stage` (interleaved 1F1B), None for plain 1F1B.
        sharding: `none` (replicated: DDP, or ParallelVPiT's all-reduce under TP/PP), `fsdp` (FSDP2) or
            `distopt` (`--use-distributed-optimizer`: gradients and optimizer state sharded, parameters gathered
            once per step).
        recompute: activation checkpointing of every block: `full` or `selective` (per op type).
        bf16: bf16 autocast with fp32 master weights; otherwise fp32 throughout.
        fused_ce: `--fused-linear-cross-entropy` (LM head + cross-entropy in chunks: no [N, V] logits kept, the
            chunk's logits recomputed in backward).
    """

    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    global_batch_size: int
    vpp_layers: int | None = None
    sequence_parallel: bool = False
    sharding: Sharding = "none"
    recompute: Recompute = "none"
    fp8: bool = False
    bf16: bool = True
    fused_ce: bool = False

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    def virtual_stages(self, num_layers: int) -> int:
        return num_layers // (self.vpp_layers * self.pp) if self.vpp_layers else 1

    @property
    def model_parallel(self) -> bool:
        return self.tp * self.pp > 1

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                              num_layers_per_virtual_pipeline_stage=self.vpp_layers,
                              sequence_parallel=self.sequence_parallel,
                              data_parallel_sharding="fsdp" if self.sharding == "fsdp" else "none")

    def describe(self) -> str:
        parts = [f"TP{self.tp}" + ("+SP" if self.sequence_parallel else ""), f"PP{self.pp}"]
        if self.vpp_layers:
            parts[-1] += f"(v{self.vpp_layers}L)"
        parts.append(f"DP{self.dp}" + {"none": "", "fsdp": "-FSDP", "distopt": "-DO"}[self.sharding])
        return " ".join(parts)


def padded_model_config(model: ModelConfig, tp: int, *, make_vocab_size_divisible_by: int = 128,
                        tokenizer_vocab: int | None = None) -> ModelConfig:
    """The model the trainer builds for a TP size: the tokenizer's vocabulary plus VPiT's two image tokens, padded
    to a multiple of `make_vocab_size_divisible_by` x TP (what `Trainer` does with the shards' vocabulary)."""
    from engine.training.data import padded_vocab_size

    base = tokenizer_vocab if tokenizer_vocab is not None else model.vocab_size + IMAGE_TOKENS
    return model.replace(vocab_size=padded_vocab_size(base, make_vocab_size_divisible_by, tp))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(model: ModelConfig, gpus: int, global_batch_size: int, gpu: GpuSpec,
                      support: TrainerSupport | None = None, *, max_micro_batch: int = 16,
                      make_vocab_size_divisible_by: int = 128, tokenizer_vocab: int | None = None
                      ) -> Iterator[tuple[Layout, ModelConfig]]:
    """Every layout of `gpus` GPUs that the trainer accepts for this model and global batch, with the model config
    (padded vocabulary) it would build. TP stays inside a node (TP groups are adjacent ranks)."""
    support = support or TrainerSupport.current()
    fp8_options = [False] + ([True] if gpu.fp8_tflops and support.has("--fp8-format") else [])
    for tp in _divisors(min(gpus, gpu.gpus_per_node)):
        if gpus % tp:
            continue
        cfg = padded_model_config(model, tp, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                  tokenizer_vocab=tokenizer_vocab)
        for pp in _divisors(gpus // tp):
            dp = gpus // (tp * pp)
            if global_batch_size % dp:
                continue
            vpp_options: list[int | None] = [None]
            if pp > 1:
                vpp_options += [v for v in _divisors(cfg.num_layers)
                                if cfg.num_layers % (v * pp) == 0 and cfg.num_layers // (v * pp) >= 2]
            micro = [b for b in (2**i for i in range(int(math.log2(max_micro_batch)) + 1))
                     if global_batch_size % (b * dp) == 0]
            model_parallel = tp * pp > 1
            shardings: list[Sharding] = ["none"]
            if dp > 1:
                shardings.append("fsdp")
                if support.has("--use-distributed-optimizer") and (
                        not model_parallel or support.distributed_optimizer_model_parallel):
                    shardings.append("distopt")
            recomputes: list[Recompute] = ["none", "full"]
            if support.has("--recompute-granularity") and (not model_parallel or support.fast_paths_model_parallel):
                recomputes.append("selective")
            bf16 = not model_parallel or support.bf16_model_parallel
            fused_ce_options = [False] + ([True] if support.has("--fused-linear-cross-entropy") else [])
            for vpp in vpp_options:
                for mbs in micro:
                    m = global_batch_size // (mbs * dp)
                    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                              num_layers_per_virtual_pipeline_stage=vpp)
                    try:
                        validate_parallel_config(parallel, cfg, gpus, num_microbatches=m)
                    except ValueError:
                        continue
                    for sp in ([False, True] if tp > 1 else [False]):
                        if sp and cfg.seq_length % tp:
                            continue
                        for sharding in shardings:
                            for recompute in recomputes:
                                for fp8 in fp8_options:
                                    if fp8 and (not bf16 or (model_parallel and not support.fast_paths_model_parallel)):
                                        continue
                                    for fused_ce in fused_ce_options:
                                        yield Layout(tp=tp, pp=pp, dp=dp, micro_batch_size=mbs,
                                                     global_batch_size=global_batch_size, vpp_layers=vpp,
                                                     sequence_parallel=sp, sharding=sharding, recompute=recompute,
                                                     fp8=fp8, bf16=bf16, fused_ce=fused_ce), cfg


def launch_flags(layout: Layout, *, model_preset: str | None, seq_length: int) -> list[str]:
    """pretrain_gpt_vision.py flags that run `layout` (flag names as the training CLI defines them)."""
    flags: list[str] = []
    if model_preset:
        flags += ["--model-preset", model_preset]
    flags += ["--seq-length", str(seq_length),
              "--tensor-model-parallel-size", str(layout.tp),
              "--pipeline-model-parallel-size", str(layout.pp)]
    if layout.vpp_layers:
        flags += ["--num-layers-per-virtual-pipeline-stage", str(layout.vpp_layers)]
    if layout.sequence_parallel:
        flags.append("--sequence-parallel")
    flags += ["--micro-batch-size", str(layout.micro_batch_size),
              "--global-batch-size", str(layout.global_batch_size)]
    if layout.sharding == "fsdp":
        flags += ["--data-parallel-sharding", "fsdp"]
    elif layout.sharding == "distopt":
        flags.append("--use-distributed-optimizer")
    # Always explicit, so the flags override a --config that sets recomputation (the MetaMorph recipes recompute
    # every block: appended to them, "none" printed nothing and the run kept full recomputation).
    if layout.recompute == "full":
        flags += ["--recompute-granularity", "full", "--recompute-num-layers", "-1"]
    elif layout.recompute == "selective":
        flags += ["--recompute-granularity", "selective", "--recompute-num-layers", "-1"]
    else:
        flags += ["--recompute-num-layers", "0"]
    if layout.bf16:
        flags.append("--bf16")
    if layout.fp8:
        flags += ["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"]
    if layout.fused_ce:
        flags.append("--fused-linear-cross-entropy")
    return flags
