"""Helpers for the kernel tests (CPU interpreter or GPU) and the benchmarks' `--smoke` modes."""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import torch


def load_kernels(name: str) -> ModuleType:
    """Imports `chrysalis_kernels.<name>`: compiled when CUDA is available, else under Triton's interpreter.

    Without CUDA this sets TRITON_INTERPRET=1 for the rest of the process: Triton fixes interpreted vs compiled
    when a kernel is decorated, and its interpreter reads the variable again while running (restoring it after
    the import breaks the interpreter). It only concerns Triton kernels; torch.compile on CPU generates C++.
    triton.language's own @jit helpers are fixed when triton is first imported, so the variable must be set
    before that (tests/conftest.py sets it at the start of a CPU test session); this raises otherwise.
    """
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        language = sys.modules.get("triton.language")
        if language is not None:
            from triton.runtime.jit import JITFunction

            if isinstance(language.zeros, JITFunction):
                raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set, so its own @jit helpers "
                                   "are compiled and the interpreter cannot run them: set the variable before "
                                   "anything imports triton (tests/conftest.py does)")
    return importlib.import_module(f"chrysalis_kernels.{name}")


def kernel_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in fp64 (Frobenius norms)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def document_ids_from_lengths(rows: list[list[int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, S] document ids from per-row document lengths (every row must sum to the same S)."""
    lengths = {sum(r) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"rows have different total lengths {sorted(lengths)}")
    ids = [torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows]
    return torch.stack(ids).to(device)


def random_document_lengths(total: int, generator: torch.Generator, max_len: int | None = None) -> list[int]:
    """Uneven random document lengths summing to `total`, always including a document of length 1."""
    max_len = max_len or max(2, total // 2)
    lengths = [1]
    while sum(lengths) < total:
        lengths.append(min(int(torch.randint(1, max_len + 1, (1,), generator=generator)), total - sum(lengths)))
    order = torch.randperm(len(lengths), generator=generator).tolist()
    return [lengths[i] for i in order]
