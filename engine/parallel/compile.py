"""Regional compilation: `torch.compile` applied to each transformer block, as torchtitan does.

Compiling block by block instead of the whole model keeps compile time to one block's graph (every block has the
same code, so the first compilation is reused by the others), leaves the embedding, visual splicing and the loss
(with their data-dependent row selection) eager, and composes with the other wrappers applied from outside:
tensor parallelism (DTensor plans) and FP8 conversion before it, activation checkpointing around the block
before it, FSDP2 after it (torchtitan's order). `nn.Module.compile` compiles in place, so parameter and
checkpoint names do not change (no `_orig_mod.` prefix).
"""

from __future__ import annotations

from torch import nn


def compile_transformer_blocks(model: nn.Module, *, backend: str = "inductor", fullgraph: bool = False,
                               dynamic: bool | None = None) -> int:
    """Compiles every block of `model.layers` (a VPiTModel or a pipeline stage of one) in place.

    Returns the number of blocks compiled. `fullgraph=False` allows graph breaks around the optional kernels
    that torch.compile cannot trace (Transformer Engine, the Triton attention kernels' host code).
    """
    count = 0
    for block in model.layers.values():
        block.compile(backend=backend, fullgraph=fullgraph, dynamic=dynamic)
        count += 1
    return count
