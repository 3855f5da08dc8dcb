"""Megatron's IndexedDataset (`.bin` + `.idx`, index version 1), written atomically and read with NumPy.

The bytes are those of megatron-core's `IndexedDatasetBuilder` / `IndexedDataset`
(megatron/core/datasets/indexed_dataset.py): header `MMIDIDX\\x00\\x00`, version <Q, dtype code <B, sequence
count <Q, document count <Q, then int32 lengths, int64 byte pointers and int64 document indices.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from engine.data.atomic import naming, replace_atomic
from engine.data.manifest import ManifestError

# Codes of the dtypes we write (see docs/data_format.md).
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_INDEX_VERSION = 1
_DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int32): 4}
# Every dtype megatron's reader knows, by code (for reading).
_CODE_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                8: np.uint16}
_HEADER_BYTES = len(_INDEX_HEADER) + 8 + 1 + 8 + 8


class ShardFormatError(ManifestError):
    """A shard file whose bytes do not follow the format (named in the message)."""


@dataclass(frozen=True)
class IndexedDatasetIndex:
    """A parsed `.idx`: dtype of the .bin, per-sequence lengths (elements) and byte pointers, documents."""

    dtype: np.dtype
    lengths: np.ndarray
    pointers: np.ndarray
    documents: np.ndarray


def read_index(prefix: str, bin_size: int | None = None) -> IndexedDatasetIndex:
    """Parse and check a Megatron IndexedDataset `.idx` (version 1, the layout megatron-core writes and reads).

    Read with NumPy rather than megatron-core's `IndexedDataset`: importing that pulls in all of
    megatron.core (seconds of start-up and warnings in every reader process). The tests open every stream
    we write with megatron's own reader as well.

    Raises:
        ShardFormatError: naming the `.idx` (bad header, version, dtype, truncated arrays, pointers that do
            not follow the lengths or run past the `.bin`).
    """
    name = f"{prefix}.idx"
    try:
        data = np.fromfile(name, dtype=np.uint8)
    except OSError as error:
        raise ShardFormatError(f"{name}: cannot read ({error.strerror})") from None

    def fail(what: str):
        return ShardFormatError(f"{name}: corrupt index ({what})")

    if data.size < _HEADER_BYTES or data[:len(_INDEX_HEADER)].tobytes() != _INDEX_HEADER:
        raise fail("not a Megatron IndexedDataset index: bad header")
    version, code = struct.unpack_from("<QB", data, len(_INDEX_HEADER))
    if version != _INDEX_VERSION:
        raise fail(f"version {version}, expected {_INDEX_VERSION}")
    if code not in _CODE_DTYPES:
        raise fail(f"unknown dtype code {code}")
    count, documents = struct.unpack_from("<QQ", data, len(_INDEX_HEADER) + 9)
    expected = _HEADER_BYTES + count * 4 + count * 8 + documents * 8
    if data.size < expected:
        raise fail(f"{data.size} bytes, too short for {count} sequences and {documents} documents")
    offset = _HEADER_BYTES
    lengths = data[offset:offset + count * 4].view("<i4")
    offset += count * 4
    pointers = data[offset:offset + count * 8].view("<i8")
    offset += count * 8
    document_indices = data[offset:offset + documents * 8].view("<i8")
    dtype = np.dtype(_CODE_DTYPES[code])
    if count and ((lengths < 0).any() or pointers[0] != 0
                  or (np.diff(pointers) != lengths[:-1].astype(np.int64) * dtype.itemsize).any()):
        raise fail("sequence lengths and pointers disagree")
    end = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize if count else 0
    if bin_size is not None and end != bin_size:
        raise fail(f"the sequences end at byte {end} but {prefix}.bin has {bin_size} bytes")
    return IndexedDatasetIndex(dtype, lengths, pointers, document_indices)


class AtomicIndexedDataset:
    """One Megatron IndexedDataset (.bin + .idx) written to temp names, renamed into place by `commit`.

    We write the format here instead of through megatron-core's `IndexedDatasetBuilder` because importing
    that module imports all of megatron.core and torch: 2-4 s of start-up in every worker process, more
    than tokenizing a shard of text takes. The bytes are the builder's (one item = one document per packed
    sequence); the tests open every stream with megatron's own `IndexedDataset` reader.
    """

    def __init__(self, prefix: str, dtype) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.handle = open(prefix + ".bin.tmp", "wb")
        self.lengths: list[int] = []

    def add(self, array: np.ndarray) -> None:
        # One item, one document: each packed sequence is an independent training sample.
        with naming(self.prefix + ".bin.tmp"):
            self.handle.write(np.ascontiguousarray(array, dtype=self.dtype).tobytes())
        self.lengths.append(int(array.size))

    def commit(self) -> None:
        with naming(self.prefix + ".bin.tmp"):
            self.handle.close()
        count = len(self.lengths)
        lengths = np.asarray(self.lengths, dtype=np.int32)
        pointers = np.zeros(count, dtype=np.int64)  # byte offset of each sequence in the .bin
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        documents = np.arange(count + 1, dtype=np.int64)  # sequence i is document i
        with naming(self.prefix + ".idx.tmp"), open(self.prefix + ".idx.tmp", "wb") as index:
            index.write(_INDEX_HEADER + struct.pack("<QB", _INDEX_VERSION, _DTYPE_CODES[self.dtype]))
            index.write(struct.pack("<QQ", count, documents.size))
            index.write(lengths.tobytes() + pointers.tobytes() + documents.tobytes())
        replace_atomic(self.prefix + ".bin.tmp", self.prefix + ".bin")
        replace_atomic(self.prefix + ".idx.tmp", self.prefix + ".idx")
