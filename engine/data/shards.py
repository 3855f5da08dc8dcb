"""The on-disk shard format: writing one shard, and `ShardReader`, the memory-mapped reader training uses.

The format belongs to the engine (as megatron-core holds `indexed_dataset`): `preprocess` writes it through
this module and training, inspection and the visualizer read it through this module.

Layout of a build directory (full specification in docs/data_format.md):

    manifest.json                          written last; format_version, shards, counts, sha256, fingerprints
    tokenizer/                             the tokenizer, saved (load with engine.tokenizer.load_saved_tokenizer)
    shards/shard-00000.{bin,idx}           tokens, int32, one IndexedDataset sequence (and document) per packed
                                           sequence of exactly seq_length tokens
    shards/shard-00000.loss_mask.{bin,idx} uint8 [seq_length] per sequence, 1 = training target
    shards/shard-00000.doc_bounds.{bin,idx} int32 [D + 1] per sequence: 0, end of document 1, ..., end of
                                           document D (= real tokens; the rest is padding)
    shards/shard-00000.images.{bin,idx}    int32 [1 + 3 * n] per sequence: n, then (slot_start, image,
                                           is_response) per image, `image` indexing shard-00000.image_rows.npy
                                           (the leading count keeps the .bin non-empty for text-only shards:
                                           megatron's IndexedDataset cannot memory-map an empty file)
    shards/shard-00000.image_rows.npy      int64 [U]: shard-local image -> global embedding row
    shards/shard-00000.documents.jsonl     provenance: one line per document (sequence, offset, length, source)
    embeddings/emb-00000.bin               bf16 [rows, 64, 1152], raw little-endian, one segment per shard
    embeddings/index.npy                   structured [N]: (segment int32, row int64, sha256 S32) per global row
    rejects.jsonl                          one line per skipped record: file, line, id, reason, message
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.config import TOKENS_PER_IMAGE, VISION_DIM
from engine.data.atomic import naming, replace_atomic, save_npy_atomic, write_bytes_atomic  # noqa: F401 (re-exported)
from engine.data.indexed_dataset import AtomicIndexedDataset, ShardFormatError, read_index

if TYPE_CHECKING:  # imported where used: writing text-only shards needs no torch
    import torch

SHARD_DIR = "shards"
EMBEDDING_DIR = "embeddings"
ROW_SHAPE = (TOKENS_PER_IMAGE, VISION_DIM)
ROW_BYTES = TOKENS_PER_IMAGE * VISION_DIM * 2
SIDE_STREAMS = {"loss_mask": np.uint8, "doc_bounds": np.int32, "images": np.int32}
IMAGE_FIELDS = 3  # slot_start, shard-local image, is_response


def shard_prefix(shard: int) -> str:
    """Relative IndexedDataset prefix of a shard's token stream."""
    return f"{SHARD_DIR}/shard-{shard:05d}"


def segment_path(shard: int) -> str:
    return f"{EMBEDDING_DIR}/emb-{shard:05d}.bin"


def shard_files(shard: int) -> dict[str, str]:
    """Every file of one shard, by role (relative paths)."""
    prefix = shard_prefix(shard)
    files = {"tokens.bin": prefix + ".bin", "tokens.idx": prefix + ".idx"}
    for name in SIDE_STREAMS:
        files[f"{name}.bin"] = f"{prefix}.{name}.bin"
        files[f"{name}.idx"] = f"{prefix}.{name}.idx"
    files["documents"] = prefix + ".documents.jsonl"
    return files



class ShardWriter:
    """Writes one shard's token and side streams (not its embeddings: see `EmbeddingPartWriter`).

    Args:
        out_dir: the build directory.
        shard: shard number.
        seq_length: every sequence is padded to exactly this many tokens.
        pad_id: token written in padding positions (loss mask 0, document id -1).
    """

    def __init__(self, out_dir: str | Path, shard: int, seq_length: int, pad_id: int) -> None:
        self.out_dir = Path(out_dir)
        self.shard = shard
        self.seq_length = seq_length
        self.pad_id = pad_id
        prefix = str(self.out_dir / shard_prefix(shard))
        self.tokens = AtomicIndexedDataset(prefix, np.int32)
        self.side = {name: AtomicIndexedDataset(f"{prefix}.{name}", dtype) for name, dtype in SIDE_STREAMS.items()}
        self.documents_tmp = prefix + ".documents.jsonl.tmp"
        self.documents = open(self.documents_tmp, "w", encoding="utf-8")
        self.sequences = 0

    def add_sequence(self, documents, image_refs: list[list[int]], input_names: list[str]) -> int:
        """Write one packed sequence made of `documents` (in order); returns its real-token count.

        Args:
            documents: packing.Document objects.
            image_refs: per document, the shard-local image index of each of its images.
            input_names: input file paths, for provenance.
        """
        seq_length = self.seq_length
        tokens = np.full(seq_length, self.pad_id, dtype=np.int32)
        loss_mask = np.zeros(seq_length, dtype=np.uint8)
        bounds = [0]
        images: list[int] = [0]
        offset = 0
        for doc_index, (document, refs) in enumerate(zip(documents, image_refs)):
            length = len(document)
            tokens[offset:offset + length] = document.tokens
            loss_mask[offset:offset + length] = document.loss_mask
            for (slot_start, _, is_response), ref in zip(document.images, refs):
                images.extend((offset + slot_start, ref, int(is_response)))
            file_index, line, record_id = document.source
            with naming(self.documents_tmp):
                self.documents.write(json.dumps({
                    "sequence": self.sequences, "document": doc_index, "offset": offset, "length": length,
                    "file": input_names[file_index], "line": line, "id": record_id, "truncated": document.truncated,
                }, ensure_ascii=False) + "\n")
            offset += length
            bounds.append(offset)
        images[0] = (len(images) - 1) // IMAGE_FIELDS
        if offset > seq_length:
            raise ValueError(f"packed {offset} tokens into a sequence of {seq_length}")
        self.tokens.add(tokens)
        self.side["loss_mask"].add(loss_mask)
        self.side["doc_bounds"].add(np.asarray(bounds, dtype=np.int32))
        self.side["images"].add(np.asarray(images, dtype=np.int32))
        self.sequences += 1
        return offset

    def commit(self) -> None:
        """Rename every stream into place (each file atomically)."""
        with naming(self.documents_tmp):
            self.documents.close()
        replace_atomic(self.documents_tmp, self.documents_tmp[:-len(".tmp")])
        for stream in (self.tokens, *self.side.values()):
            stream.commit()


class EmbeddingPartWriter:
    """Appends bf16 rows [n, 64, 1152] to a raw file; renamed into place by `commit`."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.handle = open(self.path + ".tmp", "wb")
        self.rows = 0

    def append(self, rows: torch.Tensor) -> None:
        import torch

        if rows.dtype != torch.bfloat16 or tuple(rows.shape[1:]) != ROW_SHAPE:
            raise ValueError(f"embedding rows must be bf16 [n, {ROW_SHAPE[0]}, {ROW_SHAPE[1]}], got "
                             f"{rows.dtype} {tuple(rows.shape)}")
        # bf16 has no numpy dtype: store its bit pattern as little-endian uint16.
        with naming(self.path + ".tmp"):
            self.handle.write(rows.contiguous().view(torch.int16).numpy().astype("<i2", copy=False).tobytes())
        self.rows += rows.shape[0]

    def commit(self) -> None:
        with naming(self.path + ".tmp"):
            self.handle.close()
        replace_atomic(self.path + ".tmp", self.path)


# -------------------------------------------------------------------------------------------------------------
# Reading
# -------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedSequence:
    """One packed training sequence. Arrays are read-only numpy views into memory maps where possible.

    Args:
        tokens: int32 [S]; image slots hold `image_start_id` as a placeholder.
        loss_mask: uint8 [S]; 1 where the token is a training target.
        document_ids: int32 [S]; 0..D-1 per document in order, -1 on padding.
        image_slot_starts: int32 [n]; position of each image's first slot (`<image_start>` is one before it).
        image_rows: int64 [n]; global embedding row of each image (for `ShardReader.embeddings`).
        image_is_response: bool [n]; True for images in assistant turns (targets of the visual loss).
        document_bounds: int32 [D + 1]; 0, then each document's end (cu_seqlens style, without padding).
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    document_ids: np.ndarray
    image_slot_starts: np.ndarray
    image_rows: np.ndarray
    image_is_response: np.ndarray
    document_bounds: np.ndarray

    def position_ids(self) -> np.ndarray:
        """int64 [S]: positions restarting at 0 at each document (padding continues counting from its start)."""
        positions = np.arange(self.tokens.shape[0], dtype=np.int64)
        starts = np.repeat(self.document_bounds[:-1].astype(np.int64), np.diff(self.document_bounds))
        real = starts.shape[0]
        positions[:real] -= starts
        positions[real:] -= real
        return positions


class _Stream:
    """Raw access to one IndexedDataset: a memmap of its .bin plus its parsed index."""

    def __init__(self, prefix: str) -> None:
        size = os.path.getsize(prefix + ".bin")
        index = read_index(prefix, size)
        self.dtype = index.dtype
        self.starts = (index.pointers // self.dtype.itemsize).astype(np.int64)
        self.lengths = index.lengths.astype(np.int64)
        self.data = (np.memmap(prefix + ".bin", dtype=self.dtype, mode="r") if size
                     else np.zeros(0, dtype=self.dtype))

    def __len__(self) -> int:
        return self.lengths.shape[0]

    def get(self, index: int) -> np.ndarray:
        start = self.starts[index]
        return self.data[start:start + self.lengths[index]]


class _ShardStreams:
    def __init__(self, out_dir: Path, shard: dict) -> None:
        self.tokens = _Stream(str(out_dir / shard["tokens"]))
        self.loss_mask = _Stream(str(out_dir / shard["loss_mask"]))
        self.doc_bounds = _Stream(str(out_dir / shard["doc_bounds"]))
        self.images = _Stream(str(out_dir / shard["images"]))
        self.sequences = len(self.tokens)
        expected = shard["counts"]["sequences"]
        for key in ("tokens", "loss_mask", "doc_bounds", "images"):
            if len(getattr(self, key)) != expected:
                raise ShardFormatError(f"{shard[key]}.idx: {len(getattr(self, key))} sequences, the manifest "
                                       f"says {expected}")
        try:
            self.image_rows = np.load(out_dir / shard["image_rows"], mmap_mode="r", allow_pickle=False) \
                if shard["counts"]["unique_images"] else np.zeros(0, dtype=np.int64)
        except (OSError, ValueError) as error:
            raise ShardFormatError(f"{shard['image_rows']}: unreadable ({error})") from None


class ShardReader:
    """Random access to the packed sequences of a build (all shards, in manifest order).

    Args:
        path: the build directory (or its manifest.json).
        check_sha256: re-hash every file against the manifest first (slow for big builds; `verify` does it too).

    Opening always checks `format_version` and every file's size against the manifest.
    """

    def __init__(self, path: str | Path, *, check_sha256: bool = False) -> None:
        from engine.data.manifest import build_dir_of, load_manifest

        self.out_dir = build_dir_of(path)
        self.manifest = load_manifest(self.out_dir, check_sha256=check_sha256)
        self.seq_length = int(self.manifest["seq_length"])
        self._shards = [_ShardStreams(self.out_dir, shard) for shard in self.manifest["shards"]]
        counts = [shard.sequences for shard in self._shards]
        self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        segments = self.manifest["embeddings"]["segments"]
        self._segment_first = np.concatenate([[0], np.cumsum([s["rows"] for s in segments])]).astype(np.int64)
        self._segments = [
            np.memmap(self.out_dir / s["path"], dtype="<i2", mode="r", shape=(s["rows"], *ROW_SHAPE))
            if s["rows"] else None
            for s in segments
        ]

    def __len__(self) -> int:
        return int(self._first[-1])

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def num_embeddings(self) -> int:
        return int(self._segment_first[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """Global sequence index -> (shard, sequence within the shard)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"sequence {index} out of range for {len(self)} sequences")
        index %= len(self)
        shard = int(np.searchsorted(self._first, index, side="right")) - 1
        return shard, index - int(self._first[shard])

    def __getitem__(self, index: int) -> PackedSequence:
        return self.sequence(*self.locate(index))

    def sequence(self, shard: int, index: int) -> PackedSequence:
        """Sequence `index` of shard `shard`."""
        streams = self._shards[shard]
        bounds = streams.doc_bounds.get(index)
        images = streams.images.get(index)[1:].reshape(-1, IMAGE_FIELDS)
        document_ids = np.full(self.seq_length, -1, dtype=np.int32)
        document_ids[:bounds[-1]] = np.repeat(np.arange(bounds.shape[0] - 1, dtype=np.int32), np.diff(bounds))
        return PackedSequence(
            tokens=streams.tokens.get(index),
            loss_mask=streams.loss_mask.get(index),
            document_ids=document_ids,
            image_slot_starts=images[:, 0],
            image_rows=np.asarray(streams.image_rows[images[:, 1]], dtype=np.int64),
            image_is_response=images[:, 2].astype(bool),
            document_bounds=bounds,
        )

    def embeddings(self, rows) -> torch.Tensor:
        """Global embedding rows -> bf16 [n, 64, 1152] (a fresh tensor, safe to pin / move to GPU)."""
        import torch

        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((rows.shape[0], *ROW_SHAPE), dtype="<i2")
        if rows.size:
            if rows.min() < 0 or rows.max() >= self.num_embeddings:
                raise IndexError(f"embedding row out of range [0, {self.num_embeddings})")
            segments = np.searchsorted(self._segment_first, rows, side="right") - 1
            for slot, (segment, row) in enumerate(zip(segments, rows)):
                out[slot] = self._segments[segment][row - self._segment_first[segment]]
        return torch.from_numpy(out).view(torch.bfloat16)
