"""Precomputed embeddings (`--embeddings-dir`): the bytes `ImageSource` returns for them -> pooled tokens.

Where image bytes come from (files, WebDataset tars, embedding files) is `engine.data.image_source`; its
names are re-exported here.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from engine.config import TOKENS_PER_IMAGE, VISION_DIM
from engine.data.image_source import TAR_SEPARATOR, ImageSource, confine  # noqa: F401 (re-exported)
from engine.data.records import RecordError
from engine.vision_encoder import pool_and_normalize


def decode_embedding(blob: bytes) -> torch.Tensor:
    """A precomputed embedding file (as returned by `ImageSource.read`) -> [64, 1152] float32 unit-norm tokens.

    Accepts [64, 1152] (already pooled) or [729, 1152] / [27, 27, 1152] (SigLIP patch tokens, pooled here with
    the same bilinear 8x8 resize the encoder path uses). Both are L2-normalised (idempotent for pooled inputs).
    Raises RecordError("embedding_bad") otherwise.
    """
    try:
        if blob.startswith(b"SAFETENSORS\0"):
            from safetensors.torch import load

            tensors = load(blob[len(b"SAFETENSORS\0"):])
            if len(tensors) == 1:
                (tensor,) = tensors.values()
            else:
                tensor = tensors.get("embedding", tensors.get("embeddings"))
                if tensor is None:
                    raise ValueError(f"several tensors {sorted(tensors)} and none named 'embedding'")
        else:
            array = np.load(io.BytesIO(blob[len(b"NPY\0"):]), allow_pickle=False)
            tensor = torch.from_numpy(np.ascontiguousarray(array))
    except Exception as error:  # noqa: BLE001 - any parse failure is this record's problem
        raise RecordError("embedding_bad", f"cannot read precomputed embedding: {error}") from None
    if tensor.is_complex() or tensor.dtype == torch.bool:  # .float() would drop the imaginary part silently
        raise RecordError("embedding_bad", f"precomputed embedding has dtype {str(tensor.dtype).removeprefix('torch.')}"
                          "; expected real numbers")
    tensor = tensor.float()
    if tensor.dim() == 3:
        tensor = tensor.reshape(-1, tensor.shape[-1])  # [g, g, D] -> [g*g, D]
    if tensor.dim() != 2 or tensor.shape[1] != VISION_DIM or tensor.shape[0] not in (TOKENS_PER_IMAGE, 729):
        raise RecordError("embedding_bad", f"precomputed embedding has shape {tuple(tensor.shape)}; expected "
                          f"[{TOKENS_PER_IMAGE}, {VISION_DIM}] or [729, {VISION_DIM}]")
    if not torch.isfinite(tensor).all():
        raise RecordError("embedding_bad", "precomputed embedding contains NaN or Inf")
    pooled = pool_and_normalize(tensor[None])[0]
    if not bool((pooled.norm(dim=-1) > 0.5).all()):  # a zero token cannot be L2-normalised: no direction to learn
        raise RecordError("embedding_bad", "precomputed embedding has a token of zero norm (all zeros?)")
    return pooled
