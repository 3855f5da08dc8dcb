"""Atomic file writes: every file of a build appears under its final name only once it is complete."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def naming(path: str | Path):
    """Re-raises an OSError without a file name (a write or fsync that hit a full disk or an I/O error) as one
    naming `path`, so the build's one-line error says which file."""
    try:
        yield
    except OSError as error:
        if error.filename is None:
            raise OSError(error.errno, error.strerror or str(error), str(path)) from None
        raise


def replace_atomic(tmp: str | Path, final: str | Path) -> None:
    """fsync then rename: the final name only ever points at a complete file."""
    with naming(tmp), open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with naming(tmp), open(tmp, "wb") as handle:
        handle.write(data)
    replace_atomic(tmp, path)


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    tmp = f"{path}.tmp"
    with naming(tmp), open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    replace_atomic(tmp, path)


def write_file_inside(path: str | Path, data: bytes) -> None:
    """Writes `data` to `path` through a new temporary file in the same folder (created exclusively, so nothing
    planted there is followed) and a rename: a symlink or file already at `path` is replaced, never written
    through, and `path` only ever names a complete file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with naming(path), os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_png_inside(image, path: str | Path) -> None:
    """A PIL image as a PNG at `path`, through `write_file_inside` (a symlink planted at `path` is replaced)."""
    import io

    png = io.BytesIO()
    image.save(png, format="PNG")
    write_file_inside(path, png.getvalue())


def real_subdir(parent: str | Path, name: str) -> Path:
    """`parent/name` as a real directory (created if missing); a symlink there is refused, so files written
    under it cannot land outside `parent`."""
    path = Path(parent) / name
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise ValueError(f"{path} is a symbolic link or not a directory: refusing to write through it (remove it "
                         "or choose another --output)")
    path.mkdir(exist_ok=True)
    return path
