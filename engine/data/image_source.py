"""Where image bytes come from: files under `--image-root`, members of WebDataset tar shards, or precomputed
embeddings under `--embeddings-dir`; every path is confined to its root.

Image references in records:
  * `coco/000123.jpg`: a file `ROOT/coco/000123.jpg`;
  * `shards/images-0003.tar::000123.jpg`: member `000123.jpg` of the WebDataset tar `ROOT/shards/images-0003.tar`
    (`::` separates the tar from the member; the tar's member index is read once per process and cached).

With `--embeddings-dir DIR`, a reference `coco/000123.jpg` (or `x.tar::m.jpg`, read as `x.tar/m.jpg`) is looked
up as `DIR/coco/000123.jpg.npy`, `.jpg.safetensors`, `DIR/coco/000123.npy`, `.safetensors`, in that order (the
bytes come back prefixed with their format; `preprocess.images.decode_embedding` parses them).
"""

from __future__ import annotations

import os
import tarfile
from collections import OrderedDict

from engine.data.records import RecordError

TAR_SEPARATOR = "::"
_EMBEDDING_SUFFIXES = (".npy", ".safetensors")


def confine(root_real: str, reference: str, what: str = "image") -> str:
    """Resolve `reference` under `root_real` (symlinks followed); refuse anything that lands outside it."""
    if "\x00" in reference:  # os.path would raise ValueError("embedded null byte")
        raise RecordError("invalid_record", f"{what} path {reference!r} contains a NUL byte")
    candidate = os.path.realpath(os.path.join(root_real, reference))
    if os.path.commonpath([root_real, candidate]) != root_real:
        raise RecordError("path_outside_root", f"{what} path {reference!r} resolves outside the root {root_real}")
    return candidate


def _too_large(reference: str, size: int, max_bytes: int) -> RecordError:
    return RecordError("image_too_large", f"image file {reference} is {size:,} bytes, over --max-image-bytes "
                       f"{max_bytes:,} (nothing of it was read)")


def _read_file(path: str, reference: str, max_bytes: int | None = None) -> bytes:
    if not os.path.exists(path):
        raise RecordError("image_missing", f"image file not found: {reference}")
    if not os.path.isfile(path):
        raise RecordError("image_missing", f"image path is not a file: {reference}")
    with open(path, "rb") as handle:
        if max_bytes is not None:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise _too_large(reference, size, max_bytes)
            data = handle.read(max_bytes + 1)  # a file that grew since fstat is still not read past the cap
            if len(data) > max_bytes:
                raise _too_large(reference, os.fstat(handle.fileno()).st_size, max_bytes)
        else:
            data = handle.read()
    if not data:
        raise RecordError("image_empty", f"image file is empty (0 bytes): {reference}")
    return data


class _TarIndex:
    """Member name -> TarInfo of one tar, with the open handle used to read members."""

    def __init__(self, path: str) -> None:
        self.tar = tarfile.open(path, "r:")  # uncompressed, as WebDataset writes them: members are seekable
        self.members = {info.name: info for info in self.tar.getmembers() if info.isfile()}

    def read(self, member: str, reference: str = "", max_bytes: int | None = None) -> bytes | None:
        info = self.members.get(member) or self.members.get(member.lstrip("./"))
        if info is None:
            return None
        if max_bytes is not None and info.size > max_bytes:
            raise _too_large(reference or member, info.size, max_bytes)
        handle = self.tar.extractfile(info)
        return handle.read() if handle is not None else None

    def close(self) -> None:
        self.tar.close()


class ImageSource:
    """Reads the bytes behind an image reference.

    Args:
        image_root: directory that plain paths and tar paths are relative to (None: records with images are
            rejected with a message saying --image-root is missing).
        embeddings_dir: when set, references resolve to precomputed embedding files there instead.
        max_open_tars: tar indexes kept open per process.
        max_bytes: files (and tar members) larger than this are refused (`image_too_large`) before they are
            read; None reads any size.
    """

    def __init__(self, image_root: str | None, embeddings_dir: str | None = None, max_open_tars: int = 16,
                 max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.image_root = os.path.realpath(image_root) if image_root else None
        self.embeddings_dir = os.path.realpath(embeddings_dir) if embeddings_dir else None
        self._tars: OrderedDict[str, _TarIndex] = OrderedDict()
        self._max_open_tars = max_open_tars

    def read(self, reference: str) -> bytes:
        """Bytes of the image (or of its embedding file). Raises RecordError naming the reason."""
        if self.embeddings_dir is not None:
            return self._read_embedding_file(reference)
        if self.image_root is None:
            raise RecordError("image_missing", f"record has image {reference!r} but no --image-root was given")
        if TAR_SEPARATOR in reference:
            tar_reference, member = reference.split(TAR_SEPARATOR, 1)
            tar_path = confine(self.image_root, tar_reference, "tar")
            data = self._tar(tar_path, tar_reference).read(member, reference, self.max_bytes)
            if data is None:
                raise RecordError("image_missing", f"member {member!r} not found in tar {tar_reference}")
            if not data:
                raise RecordError("image_empty", f"image {reference} is empty (0 bytes)")
            return data
        return _read_file(confine(self.image_root, reference), reference, self.max_bytes)

    def _tar(self, path: str, reference: str) -> _TarIndex:
        index = self._tars.get(path)
        if index is not None:
            self._tars.move_to_end(path)
            return index
        if not os.path.isfile(path):
            raise RecordError("image_missing", f"tar shard not found: {reference}")
        try:
            index = _TarIndex(path)
        except (tarfile.TarError, OSError) as error:
            raise RecordError("image_not_decodable", f"cannot read tar shard {reference}: {error}") from None
        self._tars[path] = index
        if len(self._tars) > self._max_open_tars:
            self._tars.popitem(last=False)[1].close()
        return index

    def _read_embedding_file(self, reference: str) -> bytes:
        relative = reference.replace(TAR_SEPARATOR, "/")
        stem = os.path.splitext(relative)[0]
        candidates = [relative + suffix for suffix in _EMBEDDING_SUFFIXES] + [stem + s for s in _EMBEDDING_SUFFIXES]
        for candidate in candidates:
            path = confine(self.embeddings_dir, candidate, "embedding")
            if os.path.isfile(path):
                data = _read_file(path, candidate, self.max_bytes)
                # The format travels with the bytes (dedup hashes the bytes; decode needs the suffix).
                return (b"SAFETENSORS\0" if candidate.endswith(".safetensors") else b"NPY\0") + data
        raise RecordError("image_missing", f"no precomputed embedding for {reference!r} in --embeddings-dir "
                          f"(looked for {', '.join(candidates)})")

    def close(self) -> None:
        for index in self._tars.values():
            index.close()
        self._tars.clear()
