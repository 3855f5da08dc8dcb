"""`python -m preprocess verify OUT`: checksums, index consistency and finite embeddings of a finished build.

Every fault is collected (not just the first) and named by file; the exit status is non-zero if any.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engine.data.indexed_dataset import read_index
from engine.data.manifest import MANIFEST_NAME, ManifestError, build_dir_of, check_manifest_bytes, sha256_file
from engine.data.shards import IMAGE_FIELDS, ROW_BYTES, ROW_SHAPE

# Embedding rows checked for NaN/Inf per read (bf16 bit patterns: exponent all ones).
_FINITE_CHUNK = 256

_TEMP_SUFFIX = ".tmp"


def verify_build(path: str | Path) -> tuple[list[str], list[str]]:
    """Check a build. Returns (faults, warnings); the build is sound when `faults` is empty."""
    out = build_dir_of(path)
    faults: list[str] = []
    warnings: list[str] = []
    manifest_path = out / MANIFEST_NAME
    if not out.is_dir():
        return [f"{out}: no such directory"], warnings
    if not manifest_path.is_file():
        return [f"{MANIFEST_NAME}: missing (not a finished build)"], warnings
    try:
        manifest = check_manifest_bytes(manifest_path.read_bytes())
    except ManifestError as error:
        return [str(error)], warnings

    corrupt = set()
    for relative, digest in manifest["sha256"].items():
        file_path = out / relative
        if not file_path.is_file():
            faults.append(f"{relative}: missing")
            corrupt.add(relative)
        elif file_path.stat().st_size != manifest["bytes"].get(relative):
            faults.append(f"{relative}: size {file_path.stat().st_size} != {manifest['bytes'].get(relative)} in the manifest")
            corrupt.add(relative)
        elif sha256_file(file_path) != digest:
            faults.append(f"{relative}: sha256 mismatch (modified or corrupted)")
            corrupt.add(relative)
    for root, _, names in os.walk(out):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), out)
            if relative != MANIFEST_NAME and relative not in manifest["sha256"]:
                message = f"{relative}: not listed in the manifest"
                (faults if name.endswith(_TEMP_SUFFIX) else warnings).append(
                    message + (" (left over by an interrupted write)" if name.endswith(_TEMP_SUFFIX) else ""))

    try:
        _check_tokenizer(out, manifest, faults)
        rows_total = _check_embeddings(out, manifest, faults)
        if "latents" in manifest:  # --targets vae-latents
            from preprocess.vae_latents import check_latents

            check_latents(out, manifest, faults)
        totals = {key: 0 for key in ("sequences", "documents", "images", "tokens")}
        for shard in manifest["shards"]:
            shard_files = [f for f in manifest["sha256"] if f.startswith(shard["tokens"] + ".")]
            if corrupt.intersection(shard_files):
                continue  # already reported; structure checks on corrupt bytes would only add noise
            try:
                _check_shard(out, manifest, shard, rows_total, faults, totals)
            except Exception as error:  # noqa: BLE001 - any failure to read is a fault of that shard
                faults.append(f"{shard['tokens']}: unreadable ({type(error).__name__}: {error})")
        if not corrupt:
            for key, value in totals.items():
                if manifest["counts"][key] != value:
                    faults.append(f"{MANIFEST_NAME}: counts.{key} = {manifest['counts'][key]} but the shards hold {value}")
    except Exception as error:  # noqa: BLE001
        faults.append(f"structure check failed: {type(error).__name__}: {error}")
    return faults, warnings


def _check_tokenizer(out: Path, manifest: dict, faults: list[str]) -> None:
    from engine.tokenizer import load_saved_tokenizer

    try:
        tokenizer = load_saved_tokenizer(out / manifest["tokenizer"]["dir"])
    except Exception as error:  # noqa: BLE001
        faults.append(f"{manifest['tokenizer']['dir']}: cannot load the saved tokenizer ({error})")
        return
    if tokenizer.fingerprint() != manifest["tokenizer"]["fingerprint"]:
        faults.append(f"{manifest['tokenizer']['dir']}: tokenizer fingerprint differs from the manifest")


def _check_finite(path: Path, rows: int) -> int | None:
    """First embedding row of a segment holding a NaN or Inf (any bf16 with an all-ones exponent), or None."""
    data = np.memmap(path, dtype="<u2", mode="r", shape=(rows, ROW_SHAPE[0] * ROW_SHAPE[1]))
    for start in range(0, rows, _FINITE_CHUNK):
        bad = ((data[start:start + _FINITE_CHUNK] & 0x7F80) == 0x7F80).any(axis=1)
        if bad.any():
            return start + int(np.argmax(bad))
    return None


def _check_embeddings(out: Path, manifest: dict, faults: list[str]) -> int:
    embeddings = manifest["embeddings"]
    rows = 0
    for segment in embeddings["segments"]:
        size = (out / segment["path"]).stat().st_size if (out / segment["path"]).is_file() else -1
        if size != segment["rows"] * ROW_BYTES:
            faults.append(f"{segment['path']}: {size} bytes, expected {segment['rows']} rows x {ROW_BYTES}")
        elif segment["rows"]:
            bad = _check_finite(out / segment["path"], segment["rows"])
            if bad is not None:
                faults.append(f"{segment['path']}: row {bad} holds NaN or Inf (embeddings must be finite)")
        rows += segment["rows"]
    if rows != embeddings["rows"]:
        faults.append(f"{MANIFEST_NAME}: embedding segments hold {rows} rows, manifest says {embeddings['rows']}")
    try:
        index = np.load(out / embeddings["index"], allow_pickle=False)
        if index.shape != (embeddings["rows"],):
            faults.append(f"{embeddings['index']}: {index.shape[0]} entries for {embeddings['rows']} rows")
        elif rows:
            expected = np.concatenate([np.arange(s["rows"]) for s in embeddings["segments"]])
            if not np.array_equal(index["row"], expected):
                faults.append(f"{embeddings['index']}: row offsets inconsistent with the segments")
            if len(set(index["sha256"].tolist())) != rows:
                faults.append(f"{embeddings['index']}: duplicate image hashes (deduplication broken)")
    except Exception as error:  # noqa: BLE001
        faults.append(f"{embeddings['index']}: unreadable ({error})")
    return rows


class _IndexedStream:
    """One stream as (parsed index, memory map): item k is sequence k."""

    def __init__(self, prefix: Path) -> None:
        size = os.path.getsize(f"{prefix}.bin")
        self.index = read_index(str(prefix), size)
        self.data = np.memmap(f"{prefix}.bin", dtype=self.index.dtype, mode="r") if size else \
            np.zeros(0, dtype=self.index.dtype)
        self.starts = self.index.pointers // self.index.dtype.itemsize

    def __len__(self) -> int:
        return self.index.lengths.shape[0]

    def __getitem__(self, k: int) -> np.ndarray:
        return self.data[self.starts[k]:self.starts[k] + self.index.lengths[k]]


def _check_shard(out: Path, manifest: dict, shard: dict, rows_total: int, faults: list[str], totals: dict) -> None:
    seq_length = manifest["seq_length"]
    tokenizer = manifest["tokenizer"]
    per_image = manifest["tokens_per_image"]
    name = shard["tokens"]
    streams = {key: _IndexedStream(out / shard[key]) for key in ("tokens", "loss_mask", "doc_bounds", "images")}
    count = shard["counts"]["sequences"]
    for key, dataset in streams.items():
        if len(dataset) != count:
            faults.append(f"{shard[key]}: {len(dataset)} sequences, manifest says {count}")
            return
        if not np.array_equal(dataset.index.documents, np.arange(count + 1)):
            faults.append(f"{shard[key]}: megatron document index is not one document per sequence")
    for key in ("tokens", "loss_mask"):
        if not (streams[key].index.lengths == seq_length).all():
            faults.append(f"{shard[key]}: a sequence is not exactly seq_length={seq_length} long")
            return
    tokens = np.memmap(out / (name + ".bin"), dtype=np.int32, mode="r").reshape(count, seq_length)
    loss = np.memmap(out / (shard["loss_mask"] + ".bin"), dtype=np.uint8, mode="r").reshape(count, seq_length)
    if tokens.min() < 0 or tokens.max() >= tokenizer["vocab_size"]:
        faults.append(f"{name}.bin: token id outside [0, {tokenizer['vocab_size']})")
    if loss.max() > 1:
        faults.append(f"{shard['loss_mask']}.bin: loss mask values other than 0/1")
    image_rows = np.load(out / shard["image_rows"], allow_pickle=False)
    if image_rows.size and (image_rows.min() < 0 or image_rows.max() >= rows_total):
        faults.append(f"{shard['image_rows']}: embedding row outside [0, {rows_total})")
    documents = images = real = 0
    for k in range(count):
        bounds = streams["doc_bounds"][k]
        where = f"{name} sequence {k}"
        if bounds.shape[0] < 2 or bounds[0] != 0 or (np.diff(bounds) <= 0).any() or bounds[-1] > seq_length:
            faults.append(f"{shard['doc_bounds']}: {where}: document bounds {bounds.tolist()[:8]}... are invalid")
            continue
        documents += bounds.shape[0] - 1
        real += int(bounds[-1])
        if (tokens[k, bounds[-1]:] != tokenizer["pad_id"]).any() or loss[k, bounds[-1]:].any():
            faults.append(f"{name}.bin: {where}: padding holds non-pad tokens or loss targets")
        record = streams["images"][k]
        if record.shape[0] != 1 + IMAGE_FIELDS * int(record[0]):
            faults.append(f"{shard['images']}: {where}: image record length does not match its count")
            continue
        for slot, ref, is_response in record[1:].reshape(-1, IMAGE_FIELDS):
            images += 1
            if not (1 <= slot and slot + per_image < bounds[-1]) or ref >= image_rows.shape[0]:
                faults.append(f"{shard['images']}: {where}: image at slot {slot} (ref {ref}) out of range")
                continue
            block = tokens[k, slot - 1:slot + per_image + 1]
            if block[0] != tokenizer["image_start_id"] or block[-1] != tokenizer["image_end_id"] \
                    or (block[1:-1] != tokenizer["image_start_id"]).any():
                faults.append(f"{name}.bin: {where}: image block at slot {slot} is not <image_start> 64 slots <image_end>")
            if (loss[k, slot:slot + per_image] != int(is_response)).any():
                faults.append(f"{shard['loss_mask']}.bin: {where}: image at slot {slot} has a loss mask that "
                              f"disagrees with is_response={bool(is_response)}")
    with open(out / shard["documents"], encoding="utf-8") as handle:
        provenance = sum(1 for _ in handle)
    for key, value in (("documents", documents), ("images", images), ("tokens", real)):
        if shard["counts"][key] != value:
            faults.append(f"{name}: counts.{key} = {shard['counts'][key]} but the streams hold {value}")
    if provenance != documents:
        faults.append(f"{shard['documents']}: {provenance} lines for {documents} documents")
    totals["sequences"] += count
    totals["documents"] += documents
    totals["images"] += images
    totals["tokens"] += real
