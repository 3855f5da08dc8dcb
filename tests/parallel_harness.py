"""Runs a few optimizer steps of the tiny VPiT model under one parallel layout and writes per-step losses and
chosen gradients as JSON. Launched by tests/test_parallel_parity.py with torchrun (gloo, CPU):

    torchrun --nproc-per-node 4 tests/parallel_harness.py --tp 2 --pp 2 --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from engine.config import TOKENS_PER_IMAGE, ModelConfig
from engine.model import IGNORE_INDEX
from engine.parallel import ParallelConfig, build_device_mesh
from engine.parallel.parallel_model import ParallelVPiT

GRAD_PARAMS = ["tok_embeddings.weight", "projector.fc1.weight", "layers.0.attention.wq.weight",
               "layers.1.attention_norm.weight", "layers.3.feed_forward.w2.weight", "norm.weight", "output.weight",
               "visual_head.fc2.weight", "visual_head.fc2.bias"]


def harness_model_config(tie_embeddings: bool = False, awkward: bool = False) -> ModelConfig:
    # 251 real tokens padded to 256 rows: every layout also runs the vocabulary-padding mask.
    if awkward:
        # Sizes a friendly harness never meets: head dim 10, FFN 170 (85 per TP2 rank), hidden 40 (does not divide
        # the 1152-wide visual tokens), 262 rows (131 per TP2 rank; rank 1 holds real rows and the padding 259-261).
        return ModelConfig(vocab_size=262, real_vocab_size=259, hidden_size=40, ffn_hidden_size=170, num_layers=4,
                           num_attention_heads=4, num_query_groups=2, seq_length=160, max_position_embeddings=512,
                           visual_loss_coef=0.5, tie_embeddings=tie_embeddings)
    return ModelConfig(vocab_size=256, real_vocab_size=251, hidden_size=64, ffn_hidden_size=128, num_layers=4,
                       num_attention_heads=4, num_query_groups=2, seq_length=160, max_position_embeddings=512,
                       visual_loss_coef=0.5, tie_embeddings=tie_embeddings)


def synthetic_micro_batch(step: int, index: int, micro_batch_size: int, seq_len: int, vocab: int,
                          vision_dim: int, with_images: bool = True) -> dict:
    """Packed rows of two documents; row 0 has a response image in its second document, row 1 a prompt image."""
    g = torch.Generator().manual_seed(1000 * step + index)
    tokens = torch.randint(0, vocab - 2, (micro_batch_size, seq_len), generator=g)
    split = seq_len // 3
    document_ids = torch.zeros(micro_batch_size, seq_len, dtype=torch.long)
    document_ids[:, split:] = 1
    position_ids = torch.arange(seq_len).expand(micro_batch_size, seq_len).clone()
    position_ids[:, split:] -= split
    loss_mask = torch.rand(micro_batch_size, seq_len, generator=g) < 0.6
    positions, targets = [], []
    is_slot = torch.zeros(micro_batch_size, seq_len, dtype=torch.bool)
    if with_images:
        for row in range(micro_batch_size):
            start = split + 5 if row % 2 == 0 else 4
            slots = torch.arange(start, start + TOKENS_PER_IMAGE)
            is_slot[row, slots] = True
            positions.append(row * seq_len + slots)
            targets.append(torch.full((TOKENS_PER_IMAGE,), row % 2 == 0))
    labels = torch.full((micro_batch_size, seq_len), IGNORE_INDEX)
    nxt = tokens[:, 1:]
    keep = loss_mask[:, 1:] & ~is_slot[:, 1:] & (document_ids[:, 1:] == document_ids[:, :-1])
    labels[:, :-1] = torch.where(keep, nxt, torch.full_like(nxt, IGNORE_INDEX))
    batch = dict(tokens=tokens, position_ids=position_ids, document_ids=document_ids, labels=labels)
    if positions:
        visual = torch.nn.functional.normalize(torch.randn(len(positions) * TOKENS_PER_IMAGE, vision_dim,
                                                           generator=g), dim=-1)
        batch.update(visual_tokens=visual, visual_positions=torch.cat(positions),
                     visual_target_mask=torch.cat(targets))
    return batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp-layers", type=int, default=None, help="--num-layers-per-virtual-pipeline-stage")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--recompute", action="store_true", help="activation checkpointing on every block")
    parser.add_argument("--tie-embeddings", action="store_true", help="LM head tied to the token embedding")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast over fp32 master weights")
    parser.add_argument("--awkward", action="store_true", help="awkward model sizes (harness_model_config)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--global-microbatches", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--no-images-step", type=int, default=2, help="this step's micro-batches carry no image")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    torch.manual_seed(0)
    config = harness_model_config(args.tie_embeddings, args.awkward)
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                              num_layers_per_virtual_pipeline_stage=args.vpp_layers,
                              sequence_parallel=args.sequence_parallel,
                              data_parallel_sharding="fsdp" if args.fsdp else "none")
    mesh = build_device_mesh(parallel, "cpu")
    model = ParallelVPiT(config, parallel, mesh, device="cpu", seed=1234, activation_checkpointing=args.recompute,
                         autocast_dtype=torch.bfloat16 if args.bf16 else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, foreach=False)
    dp_rank, dp_size = mesh.get_local_rank("dp"), mesh.size(mesh_dim=1)
    per_rank = args.global_microbatches // dp_size
    result = {"losses": [], "lm_losses": [], "visual_losses": [], "grad_norms": [], "grads": {},
              "describe": model.describe()}
    for step in range(args.steps):
        with_images = step != args.no_images_step
        mbs = [synthetic_micro_batch(step, i, args.micro_batch_size, config.seq_length, config.num_real_tokens,
                                     config.vision_dim, with_images)
               for i in range(dp_rank * per_rank, (dp_rank + 1) * per_rank)]
        optimizer.zero_grad(set_to_none=True)
        parts = model.forward_backward(mbs)
        model.reduce_gradients()
        norm = model.clip_grad_norm_(1.0)
        if step == 0:
            result["grads"] = gather_grads(model)
        optimizer.step()
        result["losses"].append(parts["loss"])
        result["lm_losses"].append(parts["lm_loss"])
        result["visual_losses"].append(parts["visual_loss"])
        result["grad_norms"].append(norm)
    result["tied_copy_max_diff"] = tied_copy_max_diff(model)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def gather_grads(model: ParallelVPiT) -> dict[str, list[float]]:
    """Full gradients of GRAD_PARAMS; every rank joins the collectives, rank 0 receives what other stages hold."""
    from torch.distributed.tensor import DTensor

    named = dict(model.named_parameters())
    if model.config.tie_embeddings and "tok_embeddings.weight" in named:
        named.setdefault("output.weight", named["tok_embeddings.weight"])  # one tensor without PP
    out = {}
    for name in GRAD_PARAMS:
        grad = None
        if name in named and named[name].grad is not None:
            g = named[name].grad
            grad = g.full_tensor() if isinstance(g, DTensor) else g
        holder = torch.tensor([dist.get_rank() if grad is not None else dist.get_world_size()])
        dist.all_reduce(holder, op=dist.ReduceOp.MIN)
        obj = [grad.flatten()[:64].tolist() + [grad.double().norm().item()] if grad is not None else None]
        dist.broadcast_object_list(obj, src=int(holder.item()))
        out[name] = obj[0]
    return out


def tied_copy_max_diff(model: ParallelVPiT) -> float | None:
    """Largest difference between the first stage's embedding and the last stage's copy (tied embeddings under PP;
    None otherwise), over every embedding group."""
    if not (model.config.tie_embeddings and model.pp_size > 1):
        return None
    diff = torch.zeros(())
    for weight in model._tied_embedding_weights():
        local = weight.to_local() if hasattr(weight, "to_local") else weight
        copies = [torch.empty_like(local) for _ in range(dist.get_world_size(model.embedding_group))]
        dist.all_gather(copies, local.detach().contiguous(), group=model.embedding_group)
        diff = torch.maximum(diff, (copies[0] - copies[-1]).abs().max())
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


if __name__ == "__main__":
    main()
    # Interpreter teardown after a gloo group occasionally aborts or hangs (torch 2.13 CPU); the result file is
    # written and the group destroyed, so skip finalisation (as pretrain_gpt_vision.py does).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
