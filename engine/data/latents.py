"""VAE latents of a build's images (`preprocess build --targets vae-latents`): the store MetaQuery trains from.

The latent store sits beside the SigLIP embedding store and shares its row numbering: global latent row r is
the latent of the image whose SigLIP embedding is global row r (same deduplication by the image bytes' sha256,
same segments, one per shard that met the image first; `embeddings/index.npy` gives the hash of every row).
Every image of the build has a latent, prompt images included, so the same build trains VPiT (SigLIP rows)
and MetaQuery (prompt SigLIP rows, target latents), and a future recipe conditioning on source latents.

    latents/lat-00000.bin     bf16 [rows, *row_shape], raw little-endian, one segment per embedding segment
    manifest.json "latents"   {"dtype": "bfloat16", "row_shape", "rows", "segments": [{"path", "rows", "shard"}],
                               "vae": {name, class, kind, latent_channels, downsample, image_size, scaling_factor,
                                       shift_factor, resize, fingerprint, ...}}

Row layout by `vae.kind`:
  * "gaussian" (AutoencoderKL): [2C, h, w] = the posterior's mean then its standard deviation, so training draws
    `mean + std * noise` each time it reads the row, as the reference's online `latent_dist.sample()` does.
  * "deterministic" (AutoencoderDC, Sana's): [C, h, w] = `encode(x).latent`.
Latents are stored raw (before `shift_factor` / `scaling_factor`); `LatentStore.scaled` applies them as the
reference does (`(z - shift) * scale`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.data.atomic import replace_atomic

if TYPE_CHECKING:
    import torch

LATENT_DIR = "latents"
LATENT_KINDS = ("gaussian", "deterministic")
VAE_CLASSES = ("AutoencoderKL", "AutoencoderDC")
VAE_RESIZE = "shorter-side-bilinear-antialias+center-crop"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_VOLATILE = ("_diffusers_version", "_name_or_path")


def resolve_vae_dir(path: str | Path) -> Path:
    """The autoencoder's own directory: `path` when its config.json is an AutoencoderKL/DC, else `path/vae`
    (a diffusers pipeline directory such as Stable Diffusion 1.5's or Sana's). Raises ValueError."""
    import json

    path = Path(path)
    for candidate in (path, path / "vae"):
        config = candidate / "config.json"
        if config.is_file():
            try:
                data = json.loads(config.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"--vae {path}: {config} is not valid JSON ({error})") from None
            if isinstance(data, dict) and data.get("_class_name") in VAE_CLASSES:
                return candidate
    raise ValueError(f"--vae {path}: neither {path / 'config.json'} nor {path / 'vae' / 'config.json'} describes a "
                     f"diffusers {' or '.join(VAE_CLASSES)} (nothing is downloaded at run time)")


def downsample_factor(class_name: str, config: dict) -> int:
    if class_name == "AutoencoderKL":
        return 2 ** (len(config.get("block_out_channels", (64,))) - 1)
    return 2 ** (len(config.get("encoder_block_out_channels", (128, 256, 512, 512, 1024, 1024))) - 1)


def describe_vae(path: str | Path, image_size: int) -> dict:
    """The manifest's `latents.vae` entry for an autoencoder directory and image size, from files only: name,
    class, kind, latent channels, downsampling, row shape, scaling/shift factors and a fingerprint of the config,
    the weight files, the size, the transform and the compute dtype (everything that changes a stored row).
    Training compares it with the build's to check a decoder directory's vae/. Raises ValueError."""
    import hashlib
    import json

    from engine.data.manifest import sha256_file

    directory = resolve_vae_dir(path)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    class_name = config["_class_name"]
    weights = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not weights:
        raise ValueError(f"--vae {path}: no weight files (*.safetensors) in {directory}")
    factor = downsample_factor(class_name, config)
    if image_size < factor or image_size % factor:
        raise ValueError(f"--vae-image-size {image_size} must be a positive multiple of the VAE's downsampling "
                         f"factor {factor} ({class_name} in {directory})")
    channels = int(config.get("latent_channels", 4 if class_name == "AutoencoderKL" else 32))
    kind = "gaussian" if class_name == "AutoencoderKL" else "deterministic"
    side = image_size // factor
    scaling, shift = config.get("scaling_factor"), config.get("shift_factor")
    meta = {"config": {k: v for k, v in config.items() if k not in _VOLATILE},
            "weights": {p.name: sha256_file(p) for p in weights}, "image_size": image_size, "resize": VAE_RESIZE,
            "range": "[-1, 1]", "compute_dtype": "float32", "kind": kind, "storage": "bfloat16"}
    fingerprint = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()
    return {"name": directory.parent.name if directory.name == "vae" else directory.name, "class": class_name,
            "kind": kind, "latent_channels": channels, "downsample": factor, "image_size": image_size,
            "row_shape": [2 * channels if kind == "gaussian" else channels, side, side],
            "scaling_factor": 1.0 if scaling is None else float(scaling),
            "shift_factor": None if shift is None else float(shift), "resize": VAE_RESIZE, "compute_dtype": "float32",
            "fingerprint": fingerprint, "path": str(directory.resolve())}


def latent_segment_path(shard: int) -> str:
    return f"{LATENT_DIR}/lat-{shard:05d}.bin"


def row_bytes(row_shape) -> int:
    return int(np.prod(row_shape)) * 2


class LatentPartWriter:
    """Appends bf16 latent rows [n, *row_shape] to a raw file; renamed into place by `commit`."""

    def __init__(self, path: str | Path, row_shape) -> None:
        self.path = str(path)
        self.row_shape = tuple(int(d) for d in row_shape)
        self.handle = open(self.path + ".tmp", "wb")  # noqa: SIM115 (closed by commit, as EmbeddingPartWriter)
        self.rows = 0

    def append(self, rows: torch.Tensor) -> None:
        import torch

        if rows.dtype != torch.bfloat16 or tuple(rows.shape[1:]) != self.row_shape:
            raise ValueError(f"latent rows must be bf16 [n, {', '.join(map(str, self.row_shape))}], got "
                             f"{rows.dtype} {tuple(rows.shape)}")
        # bf16 has no numpy dtype: its bit pattern as little-endian int16 (as the embedding store).
        self.handle.write(rows.contiguous().cpu().view(torch.int16).numpy().astype("<i2", copy=False).tobytes())
        self.rows += rows.shape[0]

    def commit(self) -> None:
        self.handle.close()
        replace_atomic(self.path + ".tmp", self.path)


def finalize_latent_part(part: Path, final: Path, local_rows: int, keep: list[int]) -> bool:
    """The shard's latent segment with its first-seen rows only (the embedding segment's `keep` list); returns
    whether a segment was written. A rename when every row is new (the common case)."""
    import os

    if not part.exists():
        return False
    if not keep:
        part.unlink()
        return False
    if len(keep) == local_rows:
        os.replace(part, final)
        return True
    data = np.memmap(part, dtype=np.uint8, mode="r").reshape(local_rows, -1)
    with open(str(final) + ".tmp", "wb") as handle:
        handle.writelines(data[local].tobytes() for local in keep)
    del data
    replace_atomic(str(final) + ".tmp", final)
    part.unlink()
    return True


class LatentStore:
    """Random access to a build's latent rows (memory-mapped segments).

    Args:
        out_dir: the build directory.
        manifest: its manifest (already checked by `engine.data.manifest.load_manifest`).

    Raises:
        ValueError: the build has no latents (`--targets vae-latents` was not given), naming the fix.
    """

    def __init__(self, out_dir: str | Path, manifest: dict) -> None:
        info = manifest.get("latents")
        out_dir = Path(out_dir)
        if not isinstance(info, dict):
            raise ValueError(f"{out_dir}: the build has no VAE latents; rebuild it with "  # noqa: TRY004 (bad input)
                             "`python -m preprocess build ... --targets vae-latents --vae VAE_DIR`")
        self.info = info
        self.vae = info["vae"]
        self.row_shape = tuple(int(d) for d in info["row_shape"])
        self.kind = self.vae["kind"]
        if self.kind not in LATENT_KINDS:
            raise ValueError(f"{out_dir}/manifest.json: latents.vae.kind {self.kind!r} is not one of {LATENT_KINDS}")
        segments = info["segments"]
        self._first = np.concatenate([[0], np.cumsum([s["rows"] for s in segments])]).astype(np.int64)
        if int(self._first[-1]) != int(info["rows"]):
            raise ValueError(f"{out_dir}/manifest.json: latent segments hold {int(self._first[-1])} rows, "
                             f"latents.rows says {info['rows']}")
        self._segments = [np.memmap(out_dir / s["path"], dtype="<i2", mode="r", shape=(s["rows"], *self.row_shape))
                          if s["rows"] else None for s in segments]

    @property
    def rows(self) -> int:
        return int(self._first[-1])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """[C, h, w] of one latent (half the stored channels for a gaussian row)."""
        c, h, w = self.row_shape
        return (c // 2 if self.kind == "gaussian" else c, h, w)

    def rows_of(self, rows) -> torch.Tensor:
        """Global rows -> bf16 [n, *row_shape] (a fresh tensor)."""
        import torch

        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((rows.shape[0], *self.row_shape), dtype="<i2")
        if rows.size:
            if rows.min() < 0 or rows.max() >= self.rows:
                raise IndexError(f"latent row out of range [0, {self.rows})")
            segments = np.searchsorted(self._first, rows, side="right") - 1
            for slot, (segment, row) in enumerate(zip(segments, rows)):
                out[slot] = self._segments[segment][row - self._first[segment]]
        return torch.from_numpy(out).view(torch.bfloat16)

    def scaled(self, stored: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Stored rows [n, *row_shape] -> the decoder's latents [n, C, h, w] in fp32: a posterior sample (mean +
        std * noise; the mean when `noise` is None) for gaussian rows, then `(z - shift_factor) * scaling_factor`."""
        z = stored.float()
        if self.kind == "gaussian":
            mean, std = z.chunk(2, dim=1)
            z = mean if noise is None else mean + std * noise
        shift = self.vae.get("shift_factor")
        if shift is not None:
            z = z - float(shift)
        return z * float(self.vae["scaling_factor"])
