"""(image pixels, visual tokens) pairs from a preprocess build, for training the visualizer.

A build stores each image's embedding with the sha256 of the image file's bytes (`embeddings/index.npy`), not the
pixels. The pixels are found again by reading the build's input records (the manifest lists the `--input` files;
pass `inputs` when they moved) and resolving their image references under the build's `--image-root` with
preprocess's own `ImageSource` (plain files and WebDataset `tar::member` references, confined to the root). An
image whose bytes hash to a stored row is paired with that row; each stored row is used once. Builds made with
`--embeddings-dir` store hashes of the embedding files, so they cannot be paired and are refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from engine.vision_encoder import decode_image_pil


def find_image_rows(build: str | Path, image_root: str | Path, inputs: list[str] | None = None
                    ) -> list[tuple[str, int]]:
    """(image reference, global embedding row) for every stored image found under `image_root`.

    Raises:
        ValueError: for an `--embeddings-dir` build, or when no image is found (wrong root or inputs).
    """
    from engine.data.image_source import ImageSource
    from engine.data.records import RecordError, detect_kind, iter_json_array, iter_jsonl
    from engine.data.shards import ShardReader

    reader = ShardReader(build)
    manifest = reader.manifest
    if manifest["settings"].get("embeddings_dir"):
        raise ValueError(f"{build} was built from precomputed embeddings (--embeddings-dir): its index holds "
                         "hashes of embedding files, so the images cannot be paired with their rows")
    index = np.load(Path(reader.out_dir) / manifest["embeddings"]["index"])
    row_of = {bytes(digest): row for row, digest in enumerate(index["sha256"])}
    source = ImageSource(str(image_root))
    paths = inputs or [item["path"] for item in manifest["inputs"]]
    pairs: list[tuple[str, int]] = []
    seen: set[int] = set()
    try:
        for path in paths:
            if not Path(path).is_file():
                raise FileNotFoundError(f"input file {path} (from {build}/manifest.json) not found; "
                                        "pass the build's inputs with --input")
            records = iter_jsonl(path) if detect_kind(Path(path)) == "jsonl" else iter_json_array(path)
            for raw in records:
                if raw.error is not None or not isinstance(raw.value, dict):
                    continue
                images = raw.value.get("image") or []
                for reference in [images] if isinstance(images, str) else images:
                    if not isinstance(reference, str):
                        continue
                    try:
                        data = source.read(reference)
                    except RecordError:
                        continue
                    row = row_of.get(hashlib.sha256(data).digest())
                    if row is not None and row not in seen:
                        seen.add(row)
                        pairs.append((reference, row))
    finally:
        source.close()
    if not pairs:
        raise ValueError(f"no image of {build}'s inputs under {image_root} matches a stored embedding: "
                         "check --image-root (the build's) and --input")
    return pairs


class ImageEmbeddingPairs(torch.utils.data.Dataset):
    """Item i: (pixels [3, R, R] in [-1, 1], visual tokens [64, 1152] float32) of pair i.

    Pixels are decoded with the encoder's PIL path (RGB, bicubic resize to R x R) and mapped to [-1, 1], the
    VAE's input range.
    """

    def __init__(self, build: str | Path, image_root: str | Path, resolution: int,
                 inputs: list[str] | None = None):
        self.build = str(build)
        self.image_root = str(image_root)
        self.resolution = resolution
        self.pairs = find_image_rows(build, image_root, inputs)
        self._reader = None
        self._source = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from engine.data.image_source import ImageSource
        from engine.data.shards import ShardReader

        if self._reader is None:  # opened lazily, once per DataLoader worker
            self._reader = ShardReader(self.build)
            self._source = ImageSource(self.image_root)
        reference, row = self.pairs[i]
        pixels = decode_image_pil(self._source.read(reference), self.resolution) * 2 - 1
        return pixels, self._reader.embeddings([row])[0].float()
