"""Checkpoints across vocabulary paddings.

The vocabulary is padded to a multiple of `--make-vocab-size-divisible-by` x TP, so the embedding and LM head (and
their AdamW moments) have more rows at TP2 than at TP1. The padding rows are zero and never receive a gradient
(`ModelConfig.real_vocab_size`, `engine.model.losses`), so a checkpoint saved with one padding loads into another
by copying the rows both have and zeroing the rest: the real rows are identical, and so is every loss after resume.

`engine.training.checkpoint` calls `swap_in_stored_rows` before `dcp.load` (each mismatched vocabulary tensor is
replaced by a full CPU tensor of the stored shape, which DCP fills from any saved layout) and `copy_back` after it
(the rows go into the local shard of the live tensor, and the live tensor goes back into the state dict).
The stand-in is a full [V_saved, H] tensor on every rank, for the duration of a load whose padding changed.
"""

from __future__ import annotations

from typing import Any

import torch

VOCAB_MATRICES = ("tok_embeddings.weight", "output.weight")


def is_vocab_key(key: str) -> bool:
    """A vocabulary matrix, under its model name or as a flattened optimizer-state entry
    (`state.<fqn>.exp_avg`)."""
    if key in VOCAB_MATRICES:
        return True
    if key.startswith("state."):
        return key[len("state."):].rsplit(".", 1)[0] in VOCAB_MATRICES
    return False


def real_vocab_of(model_config: dict[str, Any]) -> int | None:
    """The real vocabulary recorded in a checkpoint's model config (dict form), or None if it has none."""
    if not isinstance(model_config, dict) or not isinstance(model_config.get("vocab_size"), int):
        return None
    real = model_config.get("real_vocab_size")
    return real if isinstance(real, int) else model_config["vocab_size"]


Pending = list[tuple[str, torch.Tensor]]


def swap_in_stored_rows(state: dict[str, Any], stored: dict[str, tuple[int, ...]], prefix: str) -> Pending:
    """Replaces, in `state`, each vocabulary tensor whose stored shape differs from its own only in the number of
    rows by a CPU tensor of the stored shape, and returns [(key, live tensor)]. `stored` maps `prefix + key` to
    the global shape in the checkpoint. Any other difference is left for the caller to report."""
    pending: Pending = []
    for key, tensor in list(state.items()):
        if not isinstance(tensor, torch.Tensor) or not is_vocab_key(key):
            continue
        shape = stored.get(prefix + key)
        if shape is None or tuple(shape) == tuple(tensor.shape):
            continue
        if len(shape) != tensor.ndim or tuple(shape[1:]) != tuple(tensor.shape[1:]):
            continue
        state[key] = torch.zeros(tuple(shape), dtype=tensor.dtype, device="cpu")
        pending.append((key, tensor))
    return pending


def _local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's rows of `tensor`, the global index of its first row); DTensors sharded on rows (TP, FSDP2)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tensor.to_local(), int(offset[0]) if len(offset) else 0


@torch.no_grad()
def copy_back(pending: Pending, state: dict[str, Any]) -> None:
    """After the load into `state` (the dict that went to DCP): each live tensor gets the rows it shares with the
    loaded stand-in (rows past those are padding and become zero) and replaces the stand-in in `state`."""
    for key, target in pending:
        if key not in state:
            continue
        loaded = state[key]
        local, first = _local_rows(target)
        local.zero_()
        last = min(first + local.shape[0], loaded.shape[0])
        if last > first:
            local[:last - first].copy_(loaded[first:last].to(local.device))
        state[key] = target


def repad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """A full (unsharded) vocabulary matrix with `rows` rows: the shared rows copied, the rest zero."""
    if tensor.shape[0] == rows:
        return tensor
    out = tensor.new_zeros(rows, *tensor.shape[1:])
    keep = min(rows, tensor.shape[0])
    out[:keep] = tensor[:keep]
    return out
