"""What the GPU fast paths do to each model part, in torchtitan's order around tensor parallelism:
FP8 conversion before the TP plans (torchao's Float8Linear takes the DTensor weights they create), activation
checkpointing (full or selective) and per-block compilation after them, FSDP2 last (by the caller).

The single-device/DP trainer path applies the same steps itself (`Trainer._apply_fast_paths`); `ParallelVPiT`
calls `before_tensor_parallel` / `after_tensor_parallel` on every pipeline stage it builds.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(kw_only=True)
class BlockTransforms:
    """Args:
        fp8: an `engine.model.fp8.Fp8Config`, or None for no FP8.
        recompute: None, "full" or "selective" activation checkpointing of every block.
        compile: torch.compile every block (regional compilation).
        compile_backend: torch.compile backend (`inductor`; tests use `aot_eager`).
    """

    fp8: object | None = None
    recompute: str | None = None
    compile: bool = False
    compile_backend: str = "inductor"

    def before_tensor_parallel(self, part: nn.Module) -> None:
        if self.fp8 is not None:
            from engine.model.fp8 import convert_to_fp8

            convert_to_fp8(part, self.fp8)

    def after_tensor_parallel(self, part: nn.Module) -> None:
        if self.recompute:
            from engine.parallel.activation_checkpointing import apply_activation_checkpointing

            apply_activation_checkpointing(part, self.recompute)
        if self.compile:
            from engine.parallel.compile import compile_transformer_blocks

            compile_transformer_blocks(part, backend=self.compile_backend)
