"""`--targets vae-latents`: every image's VAE latent, computed once offline so no VAE encoder runs in training.

`describe_vae` says which autoencoder a build uses (the manifest's `latents.vae` entry, defined with the store's
format in `engine.data.latents`, which training also reads) without building it; `VaeLatentBackend` decodes image
bytes with the reference's target transform and encodes them.

Target transform (facebookresearch/metaquery `dataset.py`, `target_transform`): resize the shorter side to
`--vae-image-size` (bilinear, antialiased), center-crop a square of that side, scale to [-1, 1]. MetaQuery's
configs use 512 (`target_image_size`), which must be a multiple of the VAE's downsampling factor (8 for SD 1.5's
AutoencoderKL, 32 for Sana's AutoencoderDC).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from engine.data.image_decode import DEFAULT_MAX_IMAGE_PIXELS, ImageDecodeError, open_image_header
from preprocess.config import BuildError

if TYPE_CHECKING:
    import torch


def describe_vae(path: str | Path, image_size: int) -> dict:
    """`engine.data.latents.describe_vae` (the manifest's `latents.vae` entry), its errors as BuildErrors."""
    from engine.data.latents import describe_vae as describe

    try:
        return describe(path, image_size)
    except ValueError as error:
        raise BuildError(str(error)) from None


def target_pixels(data: bytes, image_size: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Image bytes -> float32 [3, S, S] in [-1, 1] by the reference's target transform (module docstring).

    Raises:
        ImageDecodeError: as `engine.data.image_decode` (empty, truncated, not decodable, too large).
    """
    import torch
    from PIL import Image

    from engine.data.image_decode import _classify

    image = open_image_header(data, max_pixels)
    try:
        image.load()
        image = image.convert("RGB")
        width, height = image.size
        scale = image_size / min(width, height)
        # Shorter side to image_size (torchvision's Resize(int)), then the central square (CenterCrop).
        new = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
        image = image.resize(new, Image.Resampling.BILINEAR, reducing_gap=None)
        left, top = (new[0] - image_size) // 2, (new[1] - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
    except Exception as error:  # noqa: BLE001 (PIL raises many types; classified like the SigLIP decode)
        raise _classify(error) from None
    array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    # [S*S*3] -> [S, S, 3] -> [3, S, S], then [0, 255] -> [-1, 1]
    return array.view(image_size, image_size, 3).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class VaeLatentBackend:
    """Decode (target transform) and encode with the build's autoencoder, in fp32.

    Args:
        description: `describe_vae`'s entry; the files must still have its fingerprint.
        device: where the VAE runs.
    """

    def __init__(self, description: dict, device: str | None = None,
                 max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        import diffusers
        import torch

        current = describe_vae(description["path"], description["image_size"])
        if current["fingerprint"] != description["fingerprint"]:
            raise BuildError(f"--vae {description['path']}: its files changed during the build (fingerprint "
                             f"{description['fingerprint'][:12]} -> {current['fingerprint'][:12]})")
        self.description = description
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cls = getattr(diffusers, description["class"])
        self.vae = cls.from_pretrained(description["path"], local_files_only=True, low_cpu_mem_usage=False,
                                       torch_dtype=torch.float32)
        self.vae = self.vae.to(self.device).eval().requires_grad_(False)
        self.image_size = int(description["image_size"])
        self.max_pixels = max_pixels

    def decode_batch(self, blobs) -> list:
        """Per blob: float32 [3, S, S] in [-1, 1], or the ImageDecodeError that stopped it."""
        out = []
        for data in blobs:
            try:
                out.append(target_pixels(data, self.image_size, self.max_pixels))
            except ImageDecodeError as error:
                out.append(error)
        return out

    def encode(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """[3, S, S] tensors -> bf16 rows [n, *row_shape] on CPU (module docstring of engine.data.latents)."""
        import torch

        with torch.no_grad():
            batch = torch.stack(pixels).to(self.device, torch.float32)
            encoded = self.vae.encode(batch)
            if self.description["kind"] == "gaussian":
                posterior = encoded.latent_dist
                rows = torch.cat([posterior.mean, posterior.std], dim=1)
            else:
                rows = encoded.latent
        return rows.to(torch.bfloat16).cpu()


def check_latents(out: Path, manifest: dict, faults: list[str]) -> None:
    """`preprocess verify`: the latent store mirrors the embedding store row for row, and every value is finite."""
    import numpy as np

    latents, embeddings = manifest["latents"], manifest["embeddings"]
    if latents["rows"] != embeddings["rows"]:
        faults.append(f"manifest.json: latents.rows {latents['rows']} != embeddings.rows {embeddings['rows']}")
    mirror = [(s["shard"], s["rows"]) for s in embeddings["segments"]]
    if [(s["shard"], s["rows"]) for s in latents["segments"]] != mirror:
        faults.append("manifest.json: latent segments do not mirror the embedding segments (shard, rows)")
    shape = tuple(latents["row_shape"])
    for segment in latents["segments"]:
        path = out / segment["path"]
        expected = segment["rows"] * int(np.prod(shape)) * 2
        if not path.is_file() or path.stat().st_size != expected:
            faults.append(f"{segment['path']}: {path.stat().st_size if path.is_file() else 'no'} bytes, "
                          f"{segment['rows']} rows of {list(shape)} bf16 need {expected}")
            continue
        bits = np.memmap(path, dtype="<u2", mode="r").reshape(segment["rows"], -1)
        bad = np.flatnonzero(((bits & 0x7F80) == 0x7F80).any(axis=1))  # bf16 exponent all ones: NaN or Inf
        if bad.size:
            faults.append(f"{segment['path']}: row {int(bad[0])} holds NaN or Inf (latents must be finite)")
