"""Validates the layout planner's model-state memory on CPU: predicted parameter, gradient and AdamW-state bytes per
rank (engine.planning.rank_state) against what the real trainer holds, for several layouts (TP2, TP2+SP stage 1,
PP2 uneven, PP2 interleaved, DP2 DDP / FSDP2 / distributed optimizer, TP2xPP2, TP2xDP2 FSDP2, PP2xDP2, TP2xDP2 distributed optimizer).

    python benchmarks/plan_memory_cpu.py [--out plan_memory_cpu.json]

Each group of layouts with the same world size runs in one `torchrun` (gloo) launch; every rank builds
`engine.training.Trainer` from the training CLI's flags (--mock-data, the tiny preset with 6 layers), runs one step,
and records the bytes of the storage behind its parameters (after the step), its gradients (just before
`optimizer.step`) and its optimizer state (after the step), deduplicated by storage. The driver compares each
rank with the planner's prediction for that rank's (pp, tp, dp) coordinates. Exit status 1 if any error exceeds
--tolerance (default 10%).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--mock-data", "--mock-data-sequences", "32", "--model-preset", "tiny", "--num-layers", "6",
        "--ffn-hidden-size", "170",
        "--make-vocab-size-divisible-by", "3",
        "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "1", "--lr", "1e-3",
        "--lr-warmup-iters", "0", "--num-workers", "0", "--log-interval", "100", "--seed", "5"]
LAYOUTS: dict[int, dict[str, list[str]]] = {
    2: {
        "TP2": ["--tensor-model-parallel-size", "2"],
        "TP2+SP stage 1": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--stage", "1"],
        "PP2 split 4+2": ["--pipeline-model-parallel-size", "2", "--pipeline-layer-split", "4", "2"],
        "PP2 interleaved": ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
        "DP2 DDP": [],
        "DP2 FSDP2": ["--data-parallel-sharding", "fsdp"],
        "DP2 distributed optimizer": ["--use-distributed-optimizer"],
    },
    4: {
        "TP2xPP2": ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
        "TP2xDP2 FSDP2": ["--tensor-model-parallel-size", "2", "--data-parallel-sharding", "fsdp"],
        "PP2xDP2": ["--pipeline-model-parallel-size", "2"],
        "TP2xDP2 distributed optimizer": ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer"],
    },
}


# ------------------------------------------------------------------------------------------------- child (rank)
def _storage_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        storage = local.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _optimizers(optimizer) -> list:
    return [o for o in getattr(optimizer, "optimizers", [optimizer]) if o is not None]


def measure(flags: list[str]) -> dict:
    from engine.training import Trainer, build_device_mesh, parse_training_config

    config = parse_training_config([*BASE, *flags])
    info = build_device_mesh(parallel=config.parallel_config())
    trainer = Trainer(config, info, log=lambda message: None)
    model = trainer.parallel_model if trainer.parallel_model is not None else trainer.model
    params = list(model.parameters())
    record: dict = {}
    step = trainer.optimizer.step

    def step_and_measure() -> None:
        record["grads"] = _storage_bytes(p.grad for p in params if p.requires_grad)
        step()

    trainer.optimizer.step = step_and_measure
    trainer.train()
    states = [v for opt in _optimizers(trainer.optimizer) for s in opt.state.values() for v in s.values()
              if hasattr(v, "untyped_storage")]
    mesh = info.mesh
    return {"params": _storage_bytes(params), "grads": record["grads"], "optimizer": _storage_bytes(states),
            "pp_rank": mesh.get_local_rank("pp"), "dp_rank": mesh.get_local_rank("dp"),
            "tp_rank": mesh.get_local_rank("tp"), "model": trainer.model_config.to_dict(),
            "stage": config.stage, "flags": flags}


def child(out_dir: Path, world: int) -> None:
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    results = {name: measure(flags) for name, flags in LAYOUTS[world].items()}
    (out_dir / f"world{world}-rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter finalisation after gloo runs (see tests/test_training_distributed.py)


# ------------------------------------------------------------------------------------------------- driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, out_dir: Path, timeout: int = 600) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), str(Path(__file__).resolve()), "--child",
           "--world", str(world), "--out-dir", str(out_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun ({world} ranks) failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def predicted(result: dict, name: str) -> dict:
    from engine.config import ModelConfig
    from engine.planning import Layout, rank_state
    from engine.training import parse_training_config

    config = parse_training_config([*BASE, *result["flags"]])
    world = next(w for w, group in LAYOUTS.items() if name in group)
    tp, pp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size
    sharding = "distopt" if config.use_distributed_optimizer else config.data_parallel_sharding
    layout = Layout(tp=tp, pp=pp, dp=world // (tp * pp), micro_batch_size=config.micro_batch_size,
                    global_batch_size=config.global_batch_size, vpp_layers=config.num_layers_per_virtual_pipeline_stage,
                    sequence_parallel=config.sequence_parallel, sharding=sharding)
    split = [int(x) for x in config.pipeline_layer_split] if config.pipeline_layer_split else None
    state = rank_state(ModelConfig.from_dict(result["model"]), layout, pp_rank=result["pp_rank"],
                       tp_rank=result["tp_rank"], dp_rank=result["dp_rank"], stage=result["stage"],
                       pipeline_split=split)
    return {"params": state.params, "grads": state.grads, "optimizer": state.optimizer}


def compare(out_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(out_dir.glob("world*-rank*.json")):
        rank = int(path.stem.split("rank")[1])
        for name, result in json.loads(path.read_text()).items():
            pred = predicted(result, name)
            for kind in ("params", "grads", "optimizer"):
                measured = result[kind]
                error = abs(pred[kind] - measured) / measured if measured else (0.0 if pred[kind] == 0 else 1.0)
                rows.append({"layout": name, "rank": rank, "kind": kind, "predicted": pred[kind],
                             "measured": measured, "error": error,
                             "coords": (result["pp_rank"], result["dp_rank"], result["tp_rank"])})
    return rows


def validate(out_dir: Path, worlds=(2, 4)) -> list[dict]:
    for world in worlds:
        run_world(world, out_dir)
    return compare(out_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="write every comparison row here (JSON)")
    parser.add_argument("--tolerance", type=float, default=0.10)
    args = parser.parse_args()
    if args.child:
        child(Path(args.out_dir), args.world)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        rows = validate(Path(tmp))
    print(f"{'layout':<27} {'rank':>4} (pp,dp,tp) {'kind':<9} {'predicted':>10} {'measured':>10} {'error':>7}")
    for r in rows:
        print(f"{r['layout']:<27} {r['rank']:>4} {r['coords']!s:<10} {r['kind']:<9} {r['predicted']:>10} "
              f"{r['measured']:>10} {100 * r['error']:>6.2f}%")
    worst = max(rows, key=lambda r: r["error"])
    print(f"worst error {100 * worst['error']:.2f}% ({worst['layout']}, rank {worst['rank']}, {worst['kind']}) "
          f"over {len(rows)} comparisons")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0 if worst["error"] <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
