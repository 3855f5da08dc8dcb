"""Memory per GPU of a layout: model state (exact, per rank) and activations (a documented per-token model).

Model state
-----------
Every parameter tensor of the VPiT model (`TensorSpec`, shapes from the `ModelConfig`) is placed the way the trainer
places it: pipeline stages from `engine.parallel.pipeline.pipeline_layer_split` / `stage_ids_for_rank`, tensor
parallel shards following `engine.parallel.tensor_parallel`'s plans (column-parallel weights split on dim 0,
row-parallel on dim 1, the vocabulary-parallel embedding and LM head on rows, norms and row-parallel biases
replicated), then FSDP2's dim-0 shards over the data-parallel ranks (storage padded to `ceil(rows / dp)` rows per
rank). Bytes per element: fp32 master weights (4), fp32 gradients (4) for trainable tensors
(`engine.training.optim.stage_trainable`), AdamW's exp_avg + exp_avg_sq (8, on the unpadded shard) and its
`step` scalar (4 per tensor).

Activations (bytes per token per transformer block, a = 2 under bf16 autocast else 4, residual stream fp32,
t = TP size, kv = KV heads x head dim, F = FFN width, FlashAttention-style kernels that keep no S x S scores):

    none:       16 H / s  +  c a H  +  a (2 H + 2 kv + 4 F) / t
    selective:   4 H / s  +  a (H + kv + F) / t  +  a H / t  +  a H      (torchtitan's every-second-matmul policy)
    full:        4 H / s                                                  (the block input only)

where s = t with `--sequence-parallel`, else 1, and c = 5 under autocast (each of wq, wk, wv, w1, w3 saves its own
bf16 cast of the normalised input: autocast caches casts of weights, not of activations), else 2 (the two norm
outputs). The 16 H are the two RMSNorms' fp32 inputs and normalised outputs; then q and the attention output (2 H),
k and v (2 kv), and SwiGLU's four F-wide tensors. `none` and `full` are measured on CPU by
tests/test_plan.py (saved-tensor bytes per token of a block, fp32 and bf16, within 2%); `selective`'s cached outputs
are not visible to saved-tensor hooks and are not validated. A pipeline rank holds the activations of its
in-flight micro-batches (1F1B: pp - rank; interleaved: torch's warm-up count, each chunk with its own layers). The
last stage adds the LM head's logits for the labelled rows (bf16/fp32 logits, fp32 upcast and softmax:
(a + 8) V / t bytes per labelled token; with --fused-linear-cross-entropy one chunk of at most 2^27 logits) for one
micro-batch; full recompute adds one block's activations while it is
recomputed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from engine.config import ModelConfig
from engine.parallel.pipeline import pipeline_layer_split, stage_ids_for_rank
from engine.planning.hardware import Calibration, GiB
from engine.planning.layout import Layout

FP32 = 4
FUSED_CE_CHUNK_LOGITS = 1 << 27


@dataclass(frozen=True)
class TensorSpec:
    """A parameter: its name in `VPiTModel`, global shape, and the dim tensor parallelism splits (None: replicated)."""

    name: str
    shape: tuple[int, ...]
    tp_dim: int | None


def stage_tensors(cfg: ModelConfig, layer_ids: list[int], *, first: bool, last: bool) -> list[TensorSpec]:
    """Parameters of one pipeline stage (or of the whole model: all layers, first and last)."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vision_dim
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_query_groups * cfg.head_dim
    specs: list[TensorSpec] = []
    if first:
        specs += [TensorSpec("tok_embeddings.weight", (cfg.vocab_size, h), 0),
                  TensorSpec("projector.fc1.weight", (h, d), 0), TensorSpec("projector.fc1.bias", (h,), 0),
                  TensorSpec("projector.fc2.weight", (h, h), 1), TensorSpec("projector.fc2.bias", (h,), None)]
    for i in layer_ids:
        p = f"layers.{i}."
        specs += [TensorSpec(p + "attention_norm.weight", (h,), None),
                  TensorSpec(p + "attention.wq.weight", (q, h), 0), TensorSpec(p + "attention.wk.weight", (kv, h), 0),
                  TensorSpec(p + "attention.wv.weight", (kv, h), 0), TensorSpec(p + "attention.wo.weight", (h, q), 1),
                  TensorSpec(p + "ffn_norm.weight", (h,), None),
                  TensorSpec(p + "feed_forward.w1.weight", (f, h), 0),
                  TensorSpec(p + "feed_forward.w3.weight", (f, h), 0),
                  TensorSpec(p + "feed_forward.w2.weight", (h, f), 1)]
    if last:
        specs.append(TensorSpec("norm.weight", (h,), None))
        if not (cfg.tie_embeddings and first):
            specs.append(TensorSpec("output.weight", (cfg.vocab_size, h), 0))
        specs += [TensorSpec("visual_head.fc1.weight", (h, h), 0), TensorSpec("visual_head.fc1.bias", (h,), 0),
                  TensorSpec("visual_head.fc2.weight", (d, h), 1), TensorSpec("visual_head.fc2.bias", (d,), None)]
    return specs


def _chunk(size: int, parts: int, index: int) -> int:
    """Length of piece `index` of `size` split like torch.chunk (what DTensor's Shard and FSDP2 use)."""
    step = math.ceil(size / parts)
    return max(0, min(step, size - index * step))


@dataclass
class RankState:
    """Model-state bytes of one rank, plus the element counts the activation/communication models need."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0
    local_elements: int = 0  # this rank's parameter elements before data-parallel sharding (TP/PP local)
    trainable_local_elements: int = 0  # the same, trainable only
    matmul_local_elements: int = 0  # weights of matrix multiplies (the autocast bf16 copies)
    tensors: list[str] = field(default_factory=list)


def rank_layer_ids(cfg: ModelConfig, layout: Layout, pp_rank: int,
                   pipeline_split: list[int] | None = None) -> list[list[int]]:
    """The global layer ids of each model chunk this pipeline rank holds (one chunk unless interleaved)."""
    virtual = layout.virtual_stages(cfg.num_layers)
    num_stages = layout.pp * virtual
    splits = pipeline_layer_split(cfg.num_layers, num_stages, pipeline_split)
    return [splits[s] for s in stage_ids_for_rank(pp_rank, layout.pp, virtual)]


_STATE_CACHE: dict[tuple, RankState] = {}


def rank_state(cfg: ModelConfig, layout: Layout, *, pp_rank: int = 0, tp_rank: int = 0, dp_rank: int = 0,
               stage: int = 2, train_visual_head: bool = False, pipeline_split: list[int] | None = None) -> RankState:
    """Parameter, gradient and AdamW-state bytes held by one rank between steps (treat the result as read-only:
    it is cached, since the planner asks for the same rank of thousands of layouts)."""
    key = (json.dumps(cfg.to_dict(), sort_keys=True, default=str), layout.tp, layout.pp, layout.dp,
           layout.vpp_layers, layout.sharding in ("fsdp", "distopt"), pp_rank, tp_rank, dp_rank, stage,
           train_visual_head, tuple(pipeline_split or ()))
    if key not in _STATE_CACHE:
        if len(_STATE_CACHE) > 100_000:
            _STATE_CACHE.clear()
        _STATE_CACHE[key] = _rank_state(cfg, layout, pp_rank, tp_rank, dp_rank, stage, train_visual_head,
                                        pipeline_split)
    return _STATE_CACHE[key]


def _rank_state(cfg: ModelConfig, layout: Layout, pp_rank: int, tp_rank: int, dp_rank: int, stage: int,
                train_visual_head: bool, pipeline_split: list[int] | None) -> RankState:
    from engine.training.optim import stage_trainable

    virtual = layout.virtual_stages(cfg.num_layers)
    num_stages = layout.pp * virtual
    splits = pipeline_layer_split(cfg.num_layers, num_stages, pipeline_split)
    shard_dp = layout.sharding in ("fsdp", "distopt") and layout.dp > 1
    state = RankState()
    for s in stage_ids_for_rank(pp_rank, layout.pp, virtual):
        for spec in stage_tensors(cfg, splits[s], first=s == 0, last=s == num_stages - 1):
            shape = list(spec.shape)
            if spec.tp_dim is not None and layout.tp > 1:
                shape[spec.tp_dim] = _chunk(shape[spec.tp_dim], layout.tp, tp_rank)
            local = math.prod(shape)
            rest = local // shape[0] if shape[0] else 0
            if shard_dp:
                stored = math.ceil(shape[0] / layout.dp) * rest  # FSDP2 pads every rank's shard to the same rows
                owned = _chunk(shape[0], layout.dp, dp_rank) * rest
            else:
                stored = owned = local
            trainable = stage_trainable(spec.name, stage, train_visual_head)
            state.params += FP32 * stored
            state.local_elements += local
            if len(spec.shape) == 2 and not spec.name.startswith("tok_embeddings"):
                state.matmul_local_elements += local
            if trainable:
                state.grads += FP32 * stored
                state.optimizer += 2 * FP32 * owned + FP32  # exp_avg, exp_avg_sq, step
                state.trainable_local_elements += local
            state.tensors.append(spec.name)
    return state


# ------------------------------------------------------------------------------------------------ activations
def block_activation_bytes_per_token(cfg: ModelConfig, layout: Layout) -> float:
    """Bytes one transformer block keeps for backward per token of a micro-batch (see the module docstring)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    kv = cfg.num_query_groups * cfg.head_dim
    a = 2 if layout.bf16 else 4
    t = layout.tp
    s = t if layout.sequence_parallel else 1
    if layout.recompute == "full":
        return 4 * h / s
    if layout.recompute == "selective":
        return 4 * h / s + a * (h + kv + f) / t + a * h / t + a * h
    casts = 5 if layout.bf16 else 2
    return 16 * h / s + casts * a * h + a * (2 * h + 2 * kv + 4 * f) / t


def full_block_activation_bytes_per_token(cfg: ModelConfig, layout: Layout) -> float:
    """The same without any recompute (what one block holds while it is recomputed)."""
    from dataclasses import replace

    return block_activation_bytes_per_token(cfg, replace(layout, recompute="none"))


def in_flight_chunks(layout: Layout, pp_rank: int, virtual: int) -> int:
    """Model chunks x micro-batches whose activations a pipeline rank holds at its peak (torch.distributed.pipelining's
    warm-up counts: 1F1B pp - rank; interleaved (v - 1) pp + 2 (pp - 1 - rank) + 1, capped by the work)."""
    m = layout.num_microbatches
    if layout.pp == 1:
        return 1
    if virtual == 1:
        return min(m, layout.pp - pp_rank)
    warmup = (virtual - 1) * layout.pp + 2 * (layout.pp - 1 - pp_rank)
    return min(m * virtual, warmup + 1)


@dataclass
class MemoryBreakdown:
    """Bytes per GPU at the peak of a step (the worst pipeline rank)."""

    params: int
    grads: int
    optimizer: int
    activations: float
    transient: float  # logits / one recomputed block / FSDP-gathered parameters / bucket buffers
    overhead: float  # CUDA context and workspaces + allocator fragmentation
    pp_rank: int

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.transient + self.overhead

    def gib(self) -> dict[str, float]:
        return {k: v / GiB for k, v in (("params", self.params), ("grads", self.grads), ("optimizer", self.optimizer),
                                         ("activations", self.activations), ("transient", self.transient),
                                         ("overhead", self.overhead), ("total", self.total))}


def rank_peak_memory(cfg: ModelConfig, layout: Layout, pp_rank: int, calibration: Calibration, *, stage: int = 2,
                     loss_token_fraction: float = 1.0) -> MemoryBreakdown:
    """Peak memory of pipeline rank `pp_rank` (TP/DP rank 0, the largest shard)."""
    state = rank_state(cfg, layout, pp_rank=pp_rank, stage=stage)
    virtual = layout.virtual_stages(cfg.num_layers)
    chunks = rank_layer_ids(cfg, layout, pp_rank)
    tokens = layout.micro_batch_size * cfg.seq_length
    a = 2 if layout.bf16 else 4
    per_block = block_activation_bytes_per_token(cfg, layout) * tokens
    layers_per_chunk = max(len(c) for c in chunks)
    activations = in_flight_chunks(layout, pp_rank, virtual) * layers_per_chunk * per_block
    s = layout.tp if layout.sequence_parallel else 1
    # Per-stage extras: the embedding output on the first stage, the final norm + LM head on the last.
    num_stages = layout.pp * virtual
    has_last = (num_stages - 1) in stage_ids_for_rank(pp_rank, layout.pp, virtual)
    transient = 0.0
    if has_last:
        labelled = loss_token_fraction * tokens
        logits = labelled * cfg.vocab_size / layout.tp
        if layout.fused_ce:  # one chunk of at most 2**27 logits at a time (chrysalis_kernels.linear_cross_entropy)
            logits = min(logits, FUSED_CE_CHUNK_LOGITS)
        transient += labelled * a * cfg.hidden_size + (a + 8) * logits + tokens * 8 * cfg.hidden_size / s
    if layout.recompute != "none":
        transient += full_block_activation_bytes_per_token(cfg, layout) * tokens
    param_bytes = 2 if layout.bf16 else 4
    if layout.sharding == "fsdp" and layout.dp > 1:
        # Two blocks gathered (current + prefetched) and their unsharded gradients before the reduce-scatter.
        block_elems = state.local_elements / max(1, sum(len(c) for c in chunks) + 2)
        transient += 2 * block_elems * (param_bytes + FP32)
        if not layout.model_parallel and layout.num_microbatches > 1:
            # Data-parallel FSDP2 skips gradient sync until the last micro-batch: unsharded gradients accumulate,
            # in the fp32 reduce dtype (FSDPParam.to_accumulated_grad_if_needed).
            transient += state.trainable_local_elements * FP32
    elif layout.sharding == "distopt" and layout.dp > 1:
        # ZeRO-2 style: every block's parameters stay gathered from forward through backward.
        transient += state.local_elements * param_bytes
        if layout.num_microbatches > 1:
            transient += state.trainable_local_elements * FP32
    elif layout.dp > 1:
        if layout.model_parallel:
            transient += 2 * (1 << 24) * FP32  # ParallelVPiT's flat all-reduce buckets
        else:
            transient += state.trainable_local_elements * FP32  # DDP's gradient buckets (not bucket views)
    if layout.bf16 and layout.sharding == "none":
        # Autocast keeps a bf16 copy of every matmul weight for the forward and backward of each micro-batch.
        transient += 2 * state.matmul_local_elements * (1 if layout.pp == 1 else min(layout.num_microbatches,
                                                                                       layout.pp - pp_rank))
    overhead = calibration.fixed_overhead_gib * GiB + calibration.fragmentation * (activations + transient)
    return MemoryBreakdown(params=state.params, grads=state.grads, optimizer=state.optimizer,
                           activations=activations, transient=transient, overhead=overhead, pp_rank=pp_rank)


def peak_memory(cfg: ModelConfig, layout: Layout, calibration: Calibration, *, stage: int = 2,
                loss_token_fraction: float = 1.0) -> MemoryBreakdown:
    """The worst pipeline rank's peak."""
    return max((rank_peak_memory(cfg, layout, r, calibration, stage=stage, loss_token_fraction=loss_token_fraction)
                for r in range(layout.pp)), key=lambda m: m.total)
