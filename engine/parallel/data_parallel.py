"""Data parallelism along the mesh's "dp" dimension.

`none` keeps full replicas and sums gradients with bucketed all-reduces after backward
(`ParallelVPiT.reduce_gradients`): it works unchanged with DTensor (tensor-parallel) parameters and pipeline stages.
`fsdp` shards parameters, gradients and optimizer state with FSDP2 (`fully_shard`), one unit per transformer block.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, reshard_after_forward: bool = True,
               param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """FSDP2 over `dp_mesh`, one unit per transformer block plus the root.

    FSDP2 averages gradients over `dp_mesh`; `ParallelVPiT` multiplies its globally normalised loss by the dp size
    to turn that average back into the sum (a custom divide factor would need PREMUL_SUM, which gloo lacks).

    Mixed precision (torchtitan's policy): `param_dtype` bf16 all-gathers and computes with bf16 parameters while
    the sharded master weights, their gradients and the optimizer state stay fp32; `reduce_dtype` fp32
    reduce-scatters gradients in fp32 (Megatron's `--accumulate-allreduce-grads-in-fp32`).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype if param_dtype else None)
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    return model
