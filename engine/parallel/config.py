"""Parallel layout configuration and its validation (flag names follow Megatron-LM)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.config import ModelConfig


@dataclass(kw_only=True)
class ParallelConfig:
    """How one job spreads over `world_size` processes: pp x dp x tp (dp is derived).

    Args:
        tensor_model_parallel_size: `--tensor-model-parallel-size`.
        pipeline_model_parallel_size: `--pipeline-model-parallel-size`.
        num_layers_per_virtual_pipeline_stage: `--num-layers-per-virtual-pipeline-stage`; set -> interleaved 1F1B.
        sequence_parallel: `--sequence-parallel`: shard activations along the sequence in norm regions (TP > 1).
        data_parallel_sharding: `--data-parallel-sharding`: `none` (replicated, gradients all-reduced) or `fsdp`.
        pipeline_layer_split: explicit layers per stage (uneven splits), e.g. [3, 5]; default: as even as possible.
        fsdp_reshard_after_forward: with `fsdp`, free the gathered parameters after each block's forward (ZeRO-3,
            the default); False keeps them from forward through backward (ZeRO-2: Megatron's distributed optimizer,
            `--use-distributed-optimizer` under TP/PP).
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    num_layers_per_virtual_pipeline_stage: int | None = None
    sequence_parallel: bool = False
    data_parallel_sharding: Literal["none", "fsdp"] = "none"
    pipeline_layer_split: list[int] | None = None
    fsdp_reshard_after_forward: bool = True

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp)

    def virtual_stages_per_rank(self, num_layers: int) -> int:
        if not self.num_layers_per_virtual_pipeline_stage:
            return 1
        return num_layers // (self.num_layers_per_virtual_pipeline_stage * self.pp)

    @property
    def schedule_name(self) -> str:
        if self.pp == 1:
            return "none"
        return "interleaved-1f1b" if self.num_layers_per_virtual_pipeline_stage else "1f1b"


def tensor_parallel_indivisible(model: ModelConfig, tp: int) -> dict[str, tuple[str, int]]:
    """The model dimensions the tensor-parallel plans need `tp` to divide and it does not: {flag: (what, size)}.

    Attention heads and KV groups are sharded whole (KV heads are not replicated). The FFN width is split between
    the column-parallel w1/w3 and the row-parallel w2, whose input DTensor assumes equal shards: an uneven split
    (100 at TP3: 34 + 34 + 32) fails in DTensor's sharding propagation at the first forward. The hidden size is
    heads x head dim. The vocabulary may be split unevenly (`engine.model.losses.shard_start`): generation runs any
    checkpoint's vocabulary; training pads it to a multiple of TP anyway."""
    sizes = {"--num-attention-heads": ("attention heads", model.num_attention_heads),
             "--num-query-groups": ("KV groups", model.num_query_groups),
             "--ffn-hidden-size": ("FFN hidden size", model.ffn_hidden_size)}
    return {flag: size for flag, size in sizes.items() if size[1] % tp}


def tensor_parallel_refusal(model: ModelConfig, tp: int, whose: str) -> str | None:
    """The one-line refusal of a TP size that leaves `model`'s dimensions indivisible (`whose`: "the model's", "the
    frozen LLM's (--llm X)"), or None; for the tools that shard a checkpoint's model as it is (generation,
    MetaQuery's frozen LLM) rather than validating flags."""
    indivisible = tensor_parallel_indivisible(model, tp)
    if not indivisible:
        return None
    return (f"--tensor-model-parallel-size {tp} must divide {whose} attention heads, KV groups and FFN hidden size; "
            "it does not divide the " + ", ".join(f"{what} ({size})" for what, size in indivisible.values()))


def validate_parallel_config(parallel: ParallelConfig, model: ModelConfig, world_size: int,
                             num_microbatches: int | None = None) -> None:
    """Raises ValueError listing every incompatibility, each naming the flag to change."""
    problems = []
    tp, pp = parallel.tp, parallel.pp
    if tp < 1 or pp < 1:
        problems.append("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    elif world_size % (tp * pp):
        problems.append(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                        f"--pipeline-model-parallel-size {pp}")
    if tp > 1:
        for flag, (_, value) in tensor_parallel_indivisible(model, tp).items():
            note = " (KV heads are sharded, not replicated)" if flag == "--num-query-groups" else ""
            problems.append(f"{flag} {value} is not divisible by --tensor-model-parallel-size {tp}{note}")
        if model.hidden_size % tp:
            problems.append(f"--hidden-size {model.hidden_size} is not divisible by --tensor-model-parallel-size {tp}")
        if model.vocab_size % tp:
            problems.append(f"vocabulary {model.vocab_size} is not divisible by --tensor-model-parallel-size {tp}: "
                            "raise --make-vocab-size-divisible-by (which pads the tokenizer's vocabulary), or give "
                            f"--vocab-size a multiple of {tp} (--vocab-size is used as given, never padded)")
        if parallel.sequence_parallel and model.seq_length % tp:
            problems.append(f"--seq-length {model.seq_length} is not divisible by --tensor-model-parallel-size {tp} "
                            "(needed by --sequence-parallel)")
    elif parallel.sequence_parallel:
        problems.append("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if pp > 1:
        vpp = parallel.num_layers_per_virtual_pipeline_stage
        if parallel.pipeline_layer_split is not None:
            split = parallel.pipeline_layer_split
            if vpp:
                problems.append("--pipeline-layer-split cannot be combined with --num-layers-per-virtual-pipeline-stage")
            if len(split) != pp or sum(split) != model.num_layers or min(split) < 1:
                problems.append(f"--pipeline-layer-split {split} must give {pp} stages of >= 1 layer summing to "
                                f"--num-layers {model.num_layers}")
        elif vpp:
            if model.num_layers % (vpp * pp):
                problems.append(f"--num-layers {model.num_layers} is not divisible by "
                                f"--num-layers-per-virtual-pipeline-stage {vpp} x --pipeline-model-parallel-size {pp}")
            elif model.num_layers // (vpp * pp) < 2:
                problems.append("interleaving needs >= 2 virtual stages per rank: lower "
                                "--num-layers-per-virtual-pipeline-stage")
        elif model.num_layers < pp:
            problems.append(f"--num-layers {model.num_layers} is smaller than --pipeline-model-parallel-size {pp}")
        if num_microbatches is not None:
            if num_microbatches < pp:
                problems.append(f"{num_microbatches} micro-batches per step is fewer than the {pp} pipeline stages: "
                                "raise --global-batch-size or lower --micro-batch-size")
            if vpp and num_microbatches % pp:
                problems.append(f"interleaved 1F1B needs the micro-batches per step ({num_microbatches}) to be a "
                                f"multiple of --pipeline-model-parallel-size {pp}")
    elif parallel.num_layers_per_virtual_pipeline_stage:
        problems.append("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
    if parallel.data_parallel_sharding not in ("none", "fsdp"):
        problems.append(f"--data-parallel-sharding must be 'none' or 'fsdp', got {parallel.data_parallel_sharding!r}")
    if problems:
        raise ValueError("invalid parallel layout: " + "; ".join(problems))  # one error: line
