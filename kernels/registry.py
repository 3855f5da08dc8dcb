"""Which optional accelerated backends this process can use.

Each probe imports lazily and never raises: the portable path (torch ops, SDPA/FlexAttention) is always there.
"""

from __future__ import annotations

import importlib.util


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_backends() -> dict[str, bool]:
    """Returns {backend name: importable} for the optional accelerated backends."""
    return {
        "triton": _has("triton"),
        "transformer_engine": _has("transformer_engine"),
        "flash_attn": _has("flash_attn"),
        "apex": _has("apex") and _has("apex.normalization"),
        "torchao": _has("torchao"),
    }
