"""manifest.json: what a build contains, written last, and the checks every reader runs on it.

The manifest lists every other file of the build with its sha256 and size. It also checksums itself: the
field `manifest_sha256` is the sha256 of the canonical serialisation (sorted keys, indent 1, "\\n" at the
end) with that field set to "", and the file must be byte-for-byte that serialisation, so a flipped byte
anywhere in it is caught too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """The build directory is not a complete, intact build of a supported format."""


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _canonical(manifest: dict) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def serialize_manifest(manifest: dict) -> bytes:
    """Canonical bytes with `manifest_sha256` filled in."""
    body = dict(manifest, manifest_sha256="")
    body["manifest_sha256"] = hashlib.sha256(_canonical(body)).hexdigest()
    return _canonical(body)


def build_dir_of(path: str | Path) -> Path:
    """The build directory for a path naming it or its manifest.json."""
    path = Path(path)
    return path.parent if path.name == MANIFEST_NAME and path.is_file() else path


def check_manifest_bytes(data: bytes) -> dict:
    """Parse and self-check manifest bytes. Raises ManifestError naming manifest.json."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"{MANIFEST_NAME}: corrupt, not valid JSON ({error})") from None
    except (ValueError, RecursionError) as error:  # valid syntax json refuses: nesting, a huge integer
        what = "nested too deeply" if isinstance(error, RecursionError) else str(error).split(";")[0]
        raise ManifestError(f"{MANIFEST_NAME}: corrupt, not usable JSON ({what})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{MANIFEST_NAME}: corrupt, not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(f"{MANIFEST_NAME}: format_version {version!r} is not supported "
                            f"(this reader handles {FORMAT_VERSION})")
    recorded = manifest.get("manifest_sha256")
    if not isinstance(recorded, str) or serialize_manifest(manifest) != data:
        raise ManifestError(f"{MANIFEST_NAME}: checksum mismatch (the file was modified or corrupted)")
    problem = _structure_problem(manifest)
    if problem:  # a hand-edited manifest, re-signed: its self-checksum proves nothing about its shape
        raise ManifestError(f"{MANIFEST_NAME}: corrupt, {problem}")
    return manifest


def _inside(path: object) -> bool:
    """A relative path that stays inside the build directory."""
    if not isinstance(path, str) or not path or "\\" in path or "\x00" in path:
        return False
    pure = PurePosixPath(path)
    return not pure.is_absolute() and ".." not in pure.parts


def _structure_problem(manifest: dict) -> str | None:
    """What makes a checksum-valid manifest unusable: the fields readers index, of the wrong type, or a file path
    that leaves the build directory. None when sound."""
    sizes, digests = manifest.get("bytes"), manifest.get("sha256")
    if not isinstance(sizes, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in sizes.values()):
        return "'bytes' is not an object of file sizes"
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        return "'sha256' is not an object of digests"
    for key, kind in (("shards", list), ("embeddings", dict), ("tokenizer", dict), ("counts", dict),
                      ("seq_length", int), ("tokens_per_image", int)):
        if not isinstance(manifest.get(key), kind):
            return f"{key!r} is missing or not a JSON {kind.__name__}"
    paths = [*sizes, *digests, manifest["tokenizer"].get("dir")]
    for shard in manifest["shards"]:
        if not isinstance(shard, dict):
            return "a 'shards' entry is not an object"
        paths += [v for k, v in shard.items() if k not in ("counts", "index")]
    segments = manifest["embeddings"].get("segments", [])
    if not isinstance(segments, list) or not all(isinstance(s, dict) for s in segments):
        return "'embeddings.segments' is not a list of objects"
    paths += [s.get("path") for s in segments]
    if "index" in manifest["embeddings"]:
        paths.append(manifest["embeddings"]["index"])
    bad = next((p for p in paths if not _inside(p)), None)
    return None if bad is None else f"file path {bad!r} is not inside the build directory"


def load_manifest(path: str | Path, *, check_sha256: bool = True) -> dict:
    """Read a build's manifest, check its format version and integrity, and the files it lists.

    Args:
        path: the build directory or its manifest.json.
        check_sha256: re-hash every listed file (always: check each exists with the recorded size).

    Raises:
        ManifestError: naming the first bad file (missing, wrong size, or sha256 mismatch).
    """
    directory = build_dir_of(path)
    manifest_path = directory / MANIFEST_NAME
    if not directory.exists():
        raise ManifestError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise ManifestError(f"{directory}: not a directory (a build is a directory holding {MANIFEST_NAME})")
    if not manifest_path.is_file():
        raise ManifestError(f"{directory} is not a finished build: {MANIFEST_NAME} is missing "
                            "(an interrupted build is finished with `build ... --resume`)")
    manifest = check_manifest_bytes(manifest_path.read_bytes())
    for relative, size in manifest["bytes"].items():
        file_path = directory / relative
        if not file_path.is_file():
            raise ManifestError(f"{relative}: missing")
        if file_path.stat().st_size != size:
            raise ManifestError(f"{relative}: size {file_path.stat().st_size} != {size} recorded in the manifest")
    if check_sha256:
        for relative, digest in manifest["sha256"].items():
            if sha256_file(directory / relative) != digest:
                raise ManifestError(f"{relative}: sha256 mismatch (the file was modified or corrupted)")
    return manifest
