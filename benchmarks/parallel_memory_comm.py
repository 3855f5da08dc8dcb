"""Per-rank memory and communication of the tensor/pipeline-parallel layouts, measured against the analytic model.

Memory: parameter + gradient + AdamW-state bytes held by each rank after one optimizer step (local shards of
DTensors), against total / (TP x PP).
Communication: the payload of every collective and point-to-point transfer of one training step on each rank
(functional collectives are counted by a dispatch mode, c10d calls by wrapping them), against Megatron's formulas.

    python benchmarks/parallel_memory_comm.py --layouts 1x1 2x1 4x1 1x2 2x2 4x2 --json out.json

Each layout (TPxPP) runs as its own `torchrun` job on CPU/gloo; run it on a machine with >= 8 cores for 4x2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.config import ModelConfig  # noqa: E402


def bench_config() -> ModelConfig:
    # Shaped like a (small) LLaMA: 8 layers, GQA, a vocabulary that dominates like in the real models.
    return ModelConfig(vocab_size=16384, hidden_size=512, ffn_hidden_size=1536, num_layers=8, num_attention_heads=8,
                       num_query_groups=4, seq_length=512, max_position_embeddings=1024)


class CollectiveCounter(TorchDispatchMode):
    """Counts the bytes of c10d functional collectives (what DTensor redistributions issue)."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        out = func(*args, **kwargs)
        if "_c10d_functional" in name and any(c in name for c in ("all_reduce", "all_gather", "reduce_scatter",
                                                                   "all_to_all", "broadcast")):
            op = name.split(".")[-1]
            if "all_gather" in op:
                nbytes = out.numel() * out.element_size()  # the gathered tensor
            else:
                first = args[0]
                nbytes = first.numel() * first.element_size()
            self.log[f"tp:{op.rstrip('_')}"] += nbytes
        return out


def _wrap_c10d(log):
    """Counts our own c10d all-reduces and the pipeline schedule's point-to-point sends; returns an undo list."""
    from torch.distributed.pipelining import schedules

    undo = []
    original_all_reduce = dist.all_reduce

    def all_reduce(tensor, *args, **kwargs):
        log["c10d:all_reduce"] += tensor.numel() * tensor.element_size()
        return original_all_reduce(tensor, *args, **kwargs)

    original_batch_p2p = schedules._batch_p2p

    def batch_p2p(p2p_ops, desc=None):
        for op in p2p_ops:
            if op.op is dist.isend:
                log["pp:send"] += op.tensor.numel() * op.tensor.element_size()
        return original_batch_p2p(p2p_ops, desc)

    dist.all_reduce = all_reduce
    schedules._batch_p2p = batch_p2p
    undo.append((dist, "all_reduce", original_all_reduce))
    undo.append((schedules, "_batch_p2p", original_batch_p2p))
    return undo


def worker(args) -> None:
    from engine.parallel import ParallelConfig, build_device_mesh
    from engine.parallel.parallel_model import ParallelVPiT

    sys.path.insert(0, str(REPO / "tests"))
    from parallel_harness import synthetic_micro_batch

    dist.init_process_group("gloo")
    tp, pp = args.tp, args.pp
    config = bench_config()
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              sequence_parallel=args.sequence_parallel and tp > 1)
    mesh = build_device_mesh(parallel, "cpu")
    model = ParallelVPiT(config, parallel, mesh, device="cpu", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    mbs = [synthetic_micro_batch(0, i, args.micro_batch_size, config.seq_length, config.vocab_size,
                                 config.vision_dim) for i in range(args.microbatches)]
    log: dict[str, int] = defaultdict(int)
    undo = _wrap_c10d(log)
    with CollectiveCounter(log):
        model.forward_backward(mbs)
    for module, name, fn in undo:
        setattr(module, name, fn)
    model.reduce_gradients()
    optimizer.step()

    from torch.distributed.tensor import DTensor

    def local_bytes(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = sum(local_bytes(p) for p in model.parameters())
    grads = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    states = sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    replicated = sum(local_bytes(p) for n, p in model.named_parameters()
                     if not isinstance(p, DTensor) or all(pl.is_replicate() for pl in p.placements))
    row = {"rank": dist.get_rank(), "tp": tp, "pp": pp, "pp_rank": mesh.get_local_rank("pp"),
           "params": params, "grads": grads, "optimizer": states, "replicated_param_bytes": replicated,
           "comm": dict(log)}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def megatron_comm_bytes(config: ModelConfig, tp: int, pp: int, mbs: int, n_mb: int, sp: bool) -> dict[str, float]:
    """Megatron's per-rank payload formulas for one step (fp32 activations, 4 bytes), in the same units we count:
    an all-reduce's tensor, an all-gather's output, a reduce-scatter's input.

    TP (Narayanan et al. 2021, Korthikanti et al. 2022): per layer and micro-batch, 2 all-reduces of B*S*H in
    forward and 2 in backward; with sequence parallelism each becomes an all-gather + a reduce-scatter of B*S*H.
    PP: every stage boundary sends B*S*H (/ tp with sequence parallelism) forward per micro-batch and the same
    gradient backward; a rank on an inner stage sends both ways.
    """
    bsh = mbs * config.seq_length * config.hidden_size * 4
    layers_per_rank = config.num_layers / pp
    out = {}
    if tp > 1:
        per_layer = (8 if sp else 4) * bsh  # AG + RS count one B*S*H each
        out["tp_layers"] = per_layer * layers_per_rank * n_mb
    if pp > 1:
        per_boundary = bsh / (tp if sp else 1)
        out["pp_send_max"] = per_boundary * n_mb * (2 if pp > 2 else 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "4x1", "1x2", "2x2", "4x2"])
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    sys.path.insert(0, str(REPO / "tests"))
    from distributed_launch import torchrun

    config = bench_config()
    results = {}
    for layout in args.layouts:
        tp, pp = map(int, layout.split("x"))
        out = Path(f"/tmp/chrysalis_memcomm_{layout}.json")
        flags = ["--worker", "--tp", str(tp), "--pp", str(pp), "--out", str(out),
                 "--micro-batch-size", str(args.micro_batch_size), "--microbatches", str(args.microbatches)]
        if args.sequence_parallel:
            flags.append("--sequence-parallel")
        proc = torchrun(Path(__file__), tp * pp, flags, timeout=1800)
        if proc.returncode != 0:
            print(f"{layout}: failed\n{proc.stderr[-3000:]}")
            continue
        results[layout] = json.loads(out.read_text())

    base = results.get("1x1")
    total = (base[0]["params"] + base[0]["grads"] + base[0]["optimizer"]) if base else None
    print(f"model: {config}")
    print("\n| TPxPP | max rank bytes (param+grad+Adam) | analytic total/(TP*PP) | ratio | replicated param bytes/rank |")
    print("|---|---|---|---|---|")
    summary = {}
    for layout, rows in results.items():
        tp, pp = map(int, layout.split("x"))
        per_rank = [r["params"] + r["grads"] + r["optimizer"] for r in rows]
        ideal = total / (tp * pp) if total else float("nan")
        summary[layout] = {"per_rank_bytes": per_rank, "ideal": ideal, "ratio_max": max(per_rank) / ideal,
                           "replicated": max(r["replicated_param_bytes"] for r in rows),
                           "comm": [r["comm"] for r in rows]}
        print(f"| {layout} | {max(per_rank) / 2**20:.1f} MiB | {ideal / 2**20:.1f} MiB | {max(per_rank) / ideal:.3f} | "
              f"{summary[layout]['replicated'] / 2**10:.1f} KiB |")
    print("\n| TPxPP | rank | measured TP collectives (MiB) | Megatron TP formula (MiB) | measured PP sends (MiB) | "
          "Megatron PP formula, max (MiB) | other (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for layout, rows in results.items():
        tp, pp = map(int, layout.split("x"))
        formula = megatron_comm_bytes(config, tp, pp, args.micro_batch_size, args.microbatches,
                                      args.sequence_parallel and tp > 1)
        for r in rows:
            comm = r["comm"]
            tp_bytes = sum(v for k, v in comm.items() if k.startswith("tp:"))
            pp_bytes = sum(v for k, v in comm.items() if k.startswith("pp:"))
            other = sum(v for k, v in comm.items() if k.startswith("c10d:"))
            print(f"| {layout} | {r['rank']} | {tp_bytes / 2**20:.2f} | {formula.get('tp_layers', 0) / 2**20:.2f} | "
                  f"{pp_bytes / 2**20:.2f} | {formula.get('pp_send_max', 0) / 2**20:.2f} | {other / 2**20:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": config.to_dict(), "layouts": summary}, indent=1))


if __name__ == "__main__":
    main()
