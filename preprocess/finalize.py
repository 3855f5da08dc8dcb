"""After every shard is built: global image deduplication and each shard's embedding segment.

  * `assign_rows` (rank 0): walk the parts in shard order and give every distinct image hash one global row.
  * `finalize_shard` (the rank that built the shard): keep only the shard's first-seen rows in its segment
    (a rename when all are new, the common case) and write its `image_rows.npy`; with `--targets vae-latents`
    the shard's latent segment keeps the same rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from engine.data.atomic import naming, save_npy_atomic
from engine.data.latents import finalize_latent_part, latent_segment_path
from engine.data.manifest import sha256_file
from engine.data.shards import ROW_BYTES, segment_path, shard_prefix
from preprocess.config import BuildError
from preprocess.shard_builder import part_path


def assign_rows(out: Path, num_shards: int, fingerprint: str | None
                ) -> tuple[list[dict], list[list[int]], list[list[int]], list[str]]:
    """Global dedup over all parts, in shard order -> (summaries, keep lists, row maps, row hashes).

    Raises:
        BuildError: a part made with another encoder than `fingerprint` (rows of two encoders never mix).
    """
    summaries, keeps, maps, row_hashes = [], [], [], []
    rows: dict[str, int] = {}
    for shard in range(num_shards):
        path = part_path(out, shard, ".json")
        summary = json.loads(path.read_text())
        if summary.get("vision_encoder") != fingerprint:
            raise BuildError(f"{path.relative_to(out)}: made with encoder fingerprint "
                             f"{str(summary.get('vision_encoder'))[:12]}, the build's is {str(fingerprint)[:12]}; "
                             "refusing to mix encoders in one build")
        keep, mapping = [], []
        for local, digest in enumerate(summary["hashes"]):
            if digest not in rows:
                rows[digest] = len(row_hashes)
                row_hashes.append(digest)
                keep.append(local)
            mapping.append(rows[digest])
        summaries.append(summary)
        keeps.append(keep)
        maps.append(mapping)
    return summaries, keeps, maps, row_hashes


def finalize_shard(out: Path, shard: int, local_rows: int, keep: list[int], mapping: list[int],
                   has_streams: bool) -> dict:
    """Write a shard's embedding segment (first-seen rows only) and image_rows.npy; return their digests."""
    part = part_path(out, shard, ".emb")
    final = out / segment_path(shard)
    if keep and part.exists():
        if len(keep) == local_rows:
            os.replace(part, final)  # the common case: no cross-shard duplicates, no copy
        else:
            data = np.memmap(part, dtype=np.uint8, mode="r").reshape(local_rows, ROW_BYTES)
            with naming(str(final) + ".tmp"), open(str(final) + ".tmp", "wb") as handle:
                for local in keep:
                    handle.write(data[local].tobytes())
            del data
            os.replace(str(final) + ".tmp", final)
            part.unlink()
    elif part.exists():
        part.unlink()
    files = {}
    if keep:
        files[segment_path(shard)] = [sha256_file(final), final.stat().st_size]
    latent_part = part_path(out, shard, ".lat")  # --targets vae-latents: the same rows of the latent store
    if latent_part.exists() and finalize_latent_part(latent_part, out / latent_segment_path(shard), local_rows, keep):
        latents = out / latent_segment_path(shard)
        files[latent_segment_path(shard)] = [sha256_file(latents), latents.stat().st_size]
    if not has_streams:
        return files
    rows_path = out / f"{shard_prefix(shard)}.image_rows.npy"
    save_npy_atomic(rows_path, np.asarray(mapping, dtype=np.int64))
    files[str(rows_path.relative_to(out))] = [sha256_file(rows_path), rows_path.stat().st_size]
    return files
