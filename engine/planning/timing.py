"""Step time of a layout: a FLOP model at a calibrated efficiency, plus TP/PP/DP communication over given bandwidths.

Compute (per token, per transformer block; t = TP size):

    forward  = 2 P_block / t + 2 S H / t          (P_block: the block's matmul weights; causal attention: half of
                                                   QK^T + AV's 4 S H, i.e. the FLOPs a FlashAttention kernel runs)
    backward = 2 x forward;  full recompute adds 1 forward; selective adds the recomputed matmuls (wk, wo, w3)

plus the LM head on labelled rows (6 H V / t each, 8 with the fused cross-entropy, which recomputes logits) and the projector / continuous-token head on the first / last
stage. Matmul FLOPs run at `efficiency x peak` (bf16 peak with --bf16, the fp32 peak otherwise); with FP8 the
block linears run at `efficiency x fp8_relative_efficiency x fp8 peak`.

Communication (ring collectives, bytes moved per GPU = 2 (n-1)/n x message for all-reduce, (n-1)/n for all-gather or
reduce-scatter; bandwidth = intra-node if the group fits in a node, else inter-node):

- TP: 2 all-reduces of the [b, s, H] activation per block in forward and 2 in backward (all-gather +
  reduce-scatter pairs under sequence parallelism: the same bytes), 2 more per block with full recompute, and one
  for the vocabulary-parallel embedding; not overlapped with compute.
- PP: one [b, s, H] send forward and one backward per micro-batch and model chunk.
- DP: DDP all-reduces fp32 gradients once per step, overlapped with the last micro-batch's backward (data-parallel
  runs) or after it (ParallelVPiT under TP/PP); FSDP2 all-gathers parameters in forward and backward of every
  micro-batch and reduce-scatters gradients (every micro-batch under TP/PP, the last one otherwise), overlapped with
  compute; the distributed optimizer gathers parameters once per step and reduce-scatters gradients once.
- Optimizer: a memory-bound pass over parameters, gradients and both moments (28 bytes per trainable element).

Pipeline: a rank's time per micro-batch T (its chunks' compute + TP + PP traffic); a step is (m + (pp - 1) / v) T
for m micro-batches and v virtual stages, so the bubble is ((pp - 1) / v) / (m + (pp - 1) / v) of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import ModelConfig
from engine.parallel.pipeline import stage_ids_for_rank
from engine.planning.hardware import COLLECTIVE_LATENCY_S, Calibration, GpuSpec
from engine.planning.layout import Layout
from engine.planning.memory import rank_layer_ids, rank_state

GB = 1e9


def _block_matmul_params(cfg: ModelConfig) -> int:
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_query_groups * cfg.head_dim
    return 2 * h * q + 2 * h * kv + 3 * h * f


def _collective_s(message_bytes: float, group: int, bandwidth_gbs: float, kind: str) -> float:
    if group <= 1 or message_bytes <= 0:
        return 0.0
    factor = 2 * (group - 1) / group if kind == "all_reduce" else (group - 1) / group
    return COLLECTIVE_LATENCY_S + factor * message_bytes / (bandwidth_gbs * GB)


def group_bandwidth(layout: Layout, gpu: GpuSpec, dim: str) -> float:
    """Ranks are laid out tp fastest, then dp, then pp (engine.parallel.mesh): a group stays in one node when its
    span of ranks does."""
    span = {"tp": layout.tp, "dp": layout.tp * layout.dp, "pp": layout.tp * layout.dp * layout.pp}[dim]
    return gpu.intra_node_gbs if span <= gpu.gpus_per_node else gpu.inter_node_gbs


@dataclass
class StepTime:
    compute_s: float
    tp_comm_s: float
    pp_comm_s: float
    dp_exposed_s: float
    optimizer_s: float
    bubble_fraction: float
    step_s: float
    flops_per_step: float  # the FLOPs the GPUs execute in a step (all ranks)


def step_time(cfg: ModelConfig, layout: Layout, gpu: GpuSpec, calibration: Calibration, *,
              loss_token_fraction: float = 1.0) -> StepTime:
    h, v_size, s = cfg.hidden_size, cfg.vocab_size, cfg.seq_length
    t = layout.tp
    tokens = layout.micro_batch_size * s
    a = 2 if layout.bf16 else 4
    peak = (gpu.bf16_tflops if layout.bf16 else gpu.fp32_tflops) * 1e12 * calibration.efficiency
    fp8_peak = (gpu.fp8_tflops or gpu.bf16_tflops) * 1e12 * calibration.efficiency * calibration.fp8_relative_efficiency
    p_block = _block_matmul_params(cfg)
    kv = cfg.num_query_groups * cfg.head_dim
    linear_fwd = 2 * p_block / t  # per token
    attn_fwd = 2 * s * h / t
    recompute_linear = {"none": 0.0, "full": linear_fwd,
                        # torchtitan's policy recomputes every second block matmul: wk, wo, w3.
                        "selective": 2 * h * (kv + cfg.num_attention_heads * cfg.head_dim + cfg.ffn_hidden_size) / t}
    recompute_attn = attn_fwd if layout.recompute == "full" else 0.0
    linear_flops = 3 * linear_fwd + recompute_linear[layout.recompute]
    attn_flops = 3 * attn_fwd + recompute_attn
    block_s = tokens * (linear_flops / (fp8_peak if layout.fp8 else peak) + attn_flops / peak)
    # The fused LM head + cross-entropy recomputes each chunk's logits in backward: one more head forward.
    head_passes = 8 if layout.fused_ce else 6
    head_flops = head_passes * h * v_size / t * loss_token_fraction + 6 * (h * h + h * cfg.vision_dim) / t
    embed_flops = 6 * (cfg.vision_dim * h + h * h) / t

    tp_bw, pp_bw, dp_bw = (group_bandwidth(layout, gpu, d) for d in ("tp", "pp", "dp"))
    act_bytes = tokens * h * a
    collectives_per_block = 4 + (2 if layout.recompute == "full" else 0)
    tp_per_block = collectives_per_block * _collective_s(act_bytes, t, tp_bw, "all_reduce")
    virtual = layout.virtual_stages(cfg.num_layers)
    num_stages = layout.pp * virtual

    per_rank = []
    for pp_rank in range(layout.pp):
        layers = sum(len(c) for c in rank_layer_ids(cfg, layout, pp_rank))
        stages = stage_ids_for_rank(pp_rank, layout.pp, virtual)
        compute = layers * block_s
        tp = layers * tp_per_block
        if 0 in stages:
            compute += tokens * embed_flops / peak
            tp += _collective_s(act_bytes, t, tp_bw, "all_reduce")
        if num_stages - 1 in stages:
            compute += tokens * head_flops / peak
        pp = 0.0
        if layout.pp > 1:
            pp = 2 * virtual * (COLLECTIVE_LATENCY_S + act_bytes / (pp_bw * GB))
        per_rank.append((compute + tp + pp, compute, tp, pp, pp_rank))
    per_mb, compute_mb, tp_mb, pp_mb, slow_rank = max(per_rank)

    m = layout.num_microbatches
    pipeline_units = m + (layout.pp - 1) / virtual
    bubble = ((layout.pp - 1) / virtual) / pipeline_units if layout.pp > 1 else 0.0

    # Data-parallel traffic of the slowest rank.
    state = rank_state(cfg, layout, pp_rank=slow_rank)
    grad_bytes = state.trainable_local_elements * 4
    param_bytes = state.local_elements * (2 if layout.bf16 else 4)
    dp = layout.dp
    exposed = 0.0
    if dp > 1:
        backward_mb = compute_mb * 2 / 3
        if layout.sharding == "none":
            ar = _collective_s(grad_bytes, dp, dp_bw, "all_reduce")
            exposed = ar if layout.model_parallel else max(0.0, ar - backward_mb)
        elif layout.sharding == "fsdp":
            gathers = 2 * _collective_s(param_bytes, dp, dp_bw, "all_gather")
            scatter = _collective_s(grad_bytes, dp, dp_bw, "reduce_scatter")
            if layout.model_parallel:
                exposed = m * max(0.0, gathers + scatter - compute_mb)
            else:
                exposed = m * max(0.0, gathers - compute_mb) + max(0.0, scatter - backward_mb)
        else:  # distopt
            exposed = max(0.0, _collective_s(param_bytes, dp, dp_bw, "all_gather") - compute_mb) \
                + max(0.0, _collective_s(grad_bytes, dp, dp_bw, "reduce_scatter") - backward_mb)
    sharded = layout.sharding in ("fsdp", "distopt") and dp > 1
    optimizer_s = 28 * state.trainable_local_elements / (dp if sharded else 1) / (gpu.hbm_tbs * 1e12)

    step = pipeline_units * per_mb + exposed + optimizer_s
    flops_mb_all = 0.0
    for pp_rank in range(layout.pp):
        layers = sum(len(c) for c in rank_layer_ids(cfg, layout, pp_rank))
        flops_mb_all += layers * tokens * (linear_flops + attn_flops)
    flops_mb_all += tokens * (head_flops + embed_flops)
    flops_per_step = flops_mb_all * t * m * dp
    return StepTime(compute_s=pipeline_units * compute_mb, tp_comm_s=pipeline_units * tp_mb,
                    pp_comm_s=pipeline_units * pp_mb, dp_exposed_s=exposed, optimizer_s=optimizer_s,
                    bubble_fraction=bubble, step_s=step, flops_per_step=flops_per_step)
