"""Process groups and model wrapping, applied from outside the single-device model (torchtitan's approach).

`build_device_mesh` is the one place the mesh is made: ("pp", "dp", "tp") from engine.parallel (pp = tp = 1 for
pure data parallelism). Every consumer takes the mesh (or its "dp" sub-mesh) as an argument.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh


@dataclass
class ParallelInfo:
    """Where this process sits. `mesh` is None for a plain single-process run (no process group)."""

    mesh: DeviceMesh | None
    device: torch.device
    dp_rank: int = 0
    dp_size: int = 1
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_group(self):
        return self.mesh.get_group("dp") if self.mesh is not None else None

    @property
    def world_group(self):
        """Every rank (checkpoint collectives); None means the default group."""
        return None

    @property
    def dp_mesh(self) -> DeviceMesh | None:
        return self.mesh["dp"] if self.mesh is not None else None


def build_device_mesh(timeout_s: float = 600.0, parallel=None) -> ParallelInfo:
    """Initialises the process group from torchrun's environment and builds the ("pp", "dp", "tp") mesh: gloo on
    CPU, NCCL on GPU. Without torchrun variables (`WORLD_SIZE` unset or 1) it returns a mesh-less single process.

    Args:
        parallel: an `engine.parallel.ParallelConfig` (TrainingConfig.parallel_config()); None = data parallel only.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world == 1 and not dist.is_initialized():
        return ParallelInfo(mesh=None, device=device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    from engine.parallel import ParallelConfig
    from engine.parallel.mesh import build_device_mesh as build_3d_mesh

    parallel = parallel or ParallelConfig()
    world = dist.get_world_size()
    if world % (parallel.tp * parallel.pp):
        raise ValueError(f"world size {world} is not divisible by --tensor-model-parallel-size {parallel.tp} x "
                         f"--pipeline-model-parallel-size {parallel.pp}")
    mesh = build_3d_mesh(parallel, device.type, world)
    return ParallelInfo(mesh=mesh, device=device, dp_rank=mesh.get_local_rank("dp"), dp_size=mesh.size(mesh_dim=1),
                        rank=dist.get_rank(), world_size=world)


def apply_activation_checkpointing(model: nn.Module, num_layers: int) -> None:
    """Recomputes the first `num_layers` transformer blocks in backward (-1: all). Uses PyTorch's
    checkpoint_wrapper, whose state-dict hooks keep parameter names unchanged in checkpoints."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    keys = list(model.layers.keys())
    count = len(keys) if num_layers < 0 else min(num_layers, len(keys))
    for key in keys[:count]:
        model.layers[key] = checkpoint_wrapper(model.layers[key], preserve_rng_state=False)


def parallelize(model: nn.Module, info: ParallelInfo, sharding: str, bf16: bool,
                reduce_in_fp32: bool = True, units=None) -> nn.Module:
    """DDP (`none`) or FSDP2 (`fsdp`, one unit per block + the root) over the dp mesh; identity on one process.

    Master weights, gradients and optimizer state are fp32 in both. With bf16, FSDP2 uses
    MixedPrecisionPolicy(param bf16, reduce fp32) over fp32 sharded master weights (torchtitan's policy) and DDP
    all-reduces the fp32 gradients of bf16 autocast. `reduce_in_fp32=False` (`--grad-reduce-in-bf16`) reduces in
    bf16 instead: FSDP2's reduce_dtype, DDP's bf16 compression hook. `units`: the FSDP2 units besides the root
    (default the transformer blocks, `model.layers`; another recipe's module names its own).
    """
    if info.mesh is None:
        return model
    dp_mesh = info.dp_mesh
    if sharding == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                      reduce_dtype=torch.float32 if reduce_in_fp32 else torch.bfloat16) if bf16 \
            else MixedPrecisionPolicy()
        for block in (model.layers.values() if units is None else units):
            fully_shard(block, mesh=dp_mesh, mp_policy=policy)
        fully_shard(model, mesh=dp_mesh, mp_policy=policy)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, process_group=dp_mesh.get_group(),
                                  device_ids=[info.device.index] if info.device.type == "cuda" else None,
                                  broadcast_buffers=False)
    if bf16 and not reduce_in_fp32:
        group = dp_mesh.get_group()
        if dist.get_backend(group) == "nccl":
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

            ddp.register_comm_hook(group, bf16_compress_hook)
        else:  # torch's hook refuses anything but NCCL/XCCL (a TypeError at the first backward); same math here
            ddp.register_comm_hook(group, _bf16_compress_hook)
    return ddp


def _bf16_compress_hook(process_group, bucket):
    """DDP communication hook: the bucket averaged over the group in bf16 (torch's `bf16_compress_hook`, which
    checks for NCCL >= 2.10, without that check, for gloo)."""
    group = process_group if process_group is not None else dist.group.WORLD
    compressed = bucket.buffer().to(torch.bfloat16).div_(group.size())
    future = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def decompress(fut):
        out = bucket.buffer()
        out.copy_(fut.value()[0])
        return out

    return future.then(decompress)


def unwrap(model: nn.Module) -> nn.Module:
    """The VPiTModel inside a DDP wrapper (FSDP2 modifies the module in place)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(values: list[float], info: ParallelInfo, dtype=torch.float64) -> list[float]:
    """Sums a few scalars over the dp group (one collective). float64 keeps token counts exact."""
    if info.mesh is None:
        return list(values)
    t = torch.tensor(values, dtype=dtype, device=info.device if dist.get_backend(info.dp_group) == "nccl" else "cpu")
    dist.all_reduce(t, group=info.dp_group)
    return t.tolist()
