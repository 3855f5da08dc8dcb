"""Image embedding backends: where an image's pixels become its stored row.

`describe_backend` says which encoder a build uses (its manifest entry and fingerprint) without building
anything; `build_backend` makes the backend itself, only in a process that meets an image.

  * `EncoderBackend`: decode (PIL or DALI) + the SigLIP encoder of `engine.vision_encoder`.
  * `PrecomputedBackend`: `--embeddings-dir` files, parsed and pooled (`preprocess.images.decode_embedding`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from preprocess.config import BuildConfig, BuildError

if TYPE_CHECKING:
    import torch


def describe_backend(config: BuildConfig) -> dict:
    """The manifest's `vision_encoder` entry: name, shapes, decoder, dtype, feature layer, fingerprint.

    Raises:
        BuildError: the encoder spec is not a directory with a config and weights nor a random encoder, or
            the feature layer is out of range, or DALI was asked for and is not installed.
    """
    if config.embeddings_dir:
        return {"name": "precomputed", "fingerprint": None, "declared_encoder": config.vision_encoder}
    from engine.vision_encoder import describe_vision_encoder

    try:
        info = describe_vision_encoder(config.vision_encoder, device=config.device, decoder=config.image_decoder,
                                       feature_layer=config.vision_feature_layer,
                                       post_layernorm=config.vision_post_layernorm)
    except (OSError, ValueError, RuntimeError) as error:
        raise BuildError(f"--vision-encoder {config.vision_encoder}: {error}") from None
    return dataclasses.asdict(info)


class EncoderBackend:
    """Pixels through the SigLIP encoder."""

    def __init__(self, config: BuildConfig, expected_fingerprint: str | None) -> None:
        from engine.vision_encoder import build_vision_encoder

        self.encoder = build_vision_encoder(
            config.vision_encoder, device=config.device, decoder=config.image_decoder,
            feature_layer=config.vision_feature_layer, post_layernorm=config.vision_post_layernorm,
            max_pixels=config.max_image_pixels, decode_batch=config.encode_batch_size)
        if expected_fingerprint is not None and self.encoder.fingerprint() != expected_fingerprint:
            # The build was planned with another encoder (weights changed on disk, DALI appeared, ...).
            raise BuildError(f"--vision-encoder {config.vision_encoder}: the encoder this process built "
                             f"(fingerprint {self.encoder.fingerprint()[:12]}) differs from the build's "
                             f"({expected_fingerprint[:12]}); its files changed during the build")

    def decode_batch(self, blobs):
        return self.encoder.decode(blobs)

    def take_pil_fallbacks(self) -> int:
        """Images the DALI decoder handed to PIL since the last call (GIF; 0 with the PIL decoder)."""
        decoder = self.encoder.decoder
        count = getattr(decoder, "pil_fallbacks", 0)
        if count:
            decoder.pil_fallbacks = 0
        return count

    def encode(self, decoded: list[torch.Tensor]) -> torch.Tensor:
        import torch

        return self.encoder.encode_pixels(torch.stack(decoded))


class PrecomputedBackend:
    """Embeddings read from --embeddings-dir: 'decode' parses the file, 'encode' casts to bf16."""

    def take_pil_fallbacks(self) -> int:
        """No images are decoded here (the backends' common interface with EncoderBackend)."""
        return 0

    def decode_batch(self, blobs):
        from preprocess.images import decode_embedding
        from preprocess.records import RecordError

        out = []
        for blob in blobs:
            try:
                out.append(decode_embedding(blob))
            except RecordError as error:
                out.append(error)
        return out

    def encode(self, decoded: list[torch.Tensor]) -> torch.Tensor:
        import torch

        return torch.stack(decoded).to(torch.bfloat16)


def build_backend(config: BuildConfig, expected_fingerprint: str | None = None):
    """The backend for `config`; an encoder whose fingerprint is not `expected_fingerprint` is refused."""
    if config.embeddings_dir:
        return PrecomputedBackend()
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            # torch's weights-only unpickler warns about any protocol above 2 before it reads (or refuses) a *.bin;
            # the warning says nothing to a user, and printed a stack line above the one-line refusal below.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return EncoderBackend(config, expected_fingerprint)
    except pickle.UnpicklingError:  # transformers read a *.bin with torch.load(weights_only=True), which refused it
        raise BuildError(f"--vision-encoder {config.vision_encoder}: a pickle-format weight file holds more than "
                         "tensors: refused by torch.load(weights_only=True), nothing in it ran") from None
    except (OSError, ValueError, RuntimeError) as error:
        if isinstance(error, BuildError):
            raise
        raise BuildError(f"--vision-encoder {config.vision_encoder}: {' '.join(str(error).split())}") from None
