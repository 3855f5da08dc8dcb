"""The (pp, dp, tp) device mesh.

Ranks are laid out with tensor parallelism fastest-varying (adjacent ranks, i.e. one node's NVLink domain, share
a TP group), then data parallelism, then pipeline stages, as in Megatron. A context-parallel dimension would sit
between dp and tp.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from engine.parallel.config import ParallelConfig

MESH_DIMS = ("pp", "dp", "tp")


def build_device_mesh(parallel: ParallelConfig, device_type: str, world_size: int | None = None) -> DeviceMesh:
    """A 3-D mesh named ("pp", "dp", "tp"); needs an initialised default process group."""
    world_size = world_size if world_size is not None else dist.get_world_size()
    shape = (parallel.pp, parallel.data_parallel_size(world_size), parallel.tp)
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


def describe_mesh(mesh: DeviceMesh) -> str:
    """One line for the log: this rank's coordinates and group sizes."""
    coords = {name: mesh.get_local_rank(name) for name in MESH_DIMS}
    sizes = {name: mesh.size(mesh_dim=i) for i, name in enumerate(MESH_DIMS)}
    return " ".join(f"{n}={coords[n]}/{sizes[n]}" for n in MESH_DIMS)
