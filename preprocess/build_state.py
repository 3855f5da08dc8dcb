"""The output directory of a build: its lock, `build.json` (the plan and settings of a build in progress), and
what `--resume` may and may not touch.

Rules (docs/preprocess.md, docs/failure_modes.md):
  * A build locks OUT (flock on the directory) for its whole run: a second build on the same OUT is refused
    at once instead of racing the first.
  * A new build needs an empty or missing OUT. `--resume` acts only on a directory holding our `build.json`
    (or our finished manifest.json, then it does nothing); any other non-empty directory is refused and left
    exactly as it was. An empty or missing OUT with `--resume` starts a new build (nothing to lose).
  * A resume must match the interrupted build: inputs (sha256), settings, tokenizer and image encoder
    (weights, config, feature layer, decoder, dtype). Every finished part records the encoder fingerprint it
    was made with; a part made with another encoder is refused by name.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import shutil
import sys
from pathlib import Path

from engine.data.atomic import write_bytes_atomic
from engine.data.manifest import FORMAT_VERSION, MANIFEST_NAME, ManifestError, check_manifest_bytes
from engine.data.records import plan_input
from preprocess.config import BuildConfig, BuildError
from preprocess.shard_builder import PARTS_DIR

BUILD_STATE = "build.json"
BUILD_KIND = "chrysalis-preprocess-build"
TOKENIZER_TMP = "tokenizer.tmp"
_STATE_KEYS = ("kind", "format_version", "settings", "inputs", "tokenizer_fingerprint", "vision_encoder", "tasks")


class OutputLock:
    """An exclusive, non-blocking flock on the output directory, held until `release` (or process exit)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        try:
            self.fd = os.open(out, os.O_RDONLY)
        except OSError as error:
            raise BuildError(f"--output {out}: cannot open ({error.strerror})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(self.fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise BuildError(f"--output {out}: another build is running on this directory (it is locked); "
                                 "wait for it to finish or choose another --output") from None
            raise BuildError(f"--output {out}: cannot lock ({error.strerror})") from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def read_build_state(out: Path) -> dict | None:
    """Our build.json in `out`, or None when there is none or it is not ours / not valid."""
    try:
        state = json.loads((out / BUILD_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8, not JSON, nested too deeply
        return None
    if not isinstance(state, dict) or state.get("kind") != BUILD_KIND or any(k not in state for k in _STATE_KEYS):
        return None
    return state


def _finished_build(out: Path) -> bool:
    """Whether `out` holds our intact manifest.json."""
    path = out / MANIFEST_NAME
    if not path.is_file():
        return False
    try:
        check_manifest_bytes(path.read_bytes())
    except (OSError, ManifestError):
        return False
    return True


def check_output(out: Path, resume: bool) -> str:
    """What OUT is: "new" (missing or empty), "resume" (our interrupted build) or "complete" (our finished
    build, with --resume). Raises BuildError for anything else, touching nothing."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"--output {out}: exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return "new"
    if _finished_build(out):
        if resume:
            return "complete"
        raise BuildError(f"{out} already holds a finished build ({MANIFEST_NAME}); choose a new --output")
    if read_build_state(out) is not None:
        if resume:
            return "resume"
        raise BuildError(f"{out} holds an interrupted build ({BUILD_STATE}): finish it with --resume and the same "
                         "arguments, or choose a new --output")
    raise BuildError(f"{out} is not empty and holds no build of ours (no valid {BUILD_STATE} or {MANIFEST_NAME})"
                     f"{'; --resume only finishes an interrupted build' if resume else ''}: "
                     "choose an empty or new --output (nothing was changed)")


def _encoder_difference(previous: dict | None, current: dict | None) -> str:
    previous, current = previous or {}, current or {}
    fields = [key for key in sorted(set(previous) | set(current)) if previous.get(key) != current.get(key)]
    shown = [f"{key} {previous.get(key)!r} -> {current.get(key)!r}" for key in fields if key != "fingerprint"]
    return "; ".join(shown) or "the weights differ (fingerprint " \
        f"{str(previous.get('fingerprint'))[:12]} -> {str(current.get('fingerprint'))[:12]})"


def _check_resume(out: Path, state: dict, previous: dict) -> None:
    differing = [key for key in _STATE_KEYS if state[key] != previous.get(key)]
    if "vision_encoder" in differing:
        raise BuildError(f"--resume: the image encoder differs from the interrupted build in {out} "
                         f"({_encoder_difference(previous['vision_encoder'], state['vision_encoder'])}); "
                         "resume with the same encoder, decoder and flags, or start a new --output")
    if differing:
        raise BuildError(f"--resume: {', '.join(differing)} differ from the interrupted build in {out}; "
                         "resume with the same inputs and flags, or start a new --output")
    fingerprint = state["vision_encoder"].get("fingerprint")
    for part in sorted((out / PARTS_DIR).glob("shard-*.json")):
        try:
            value = json.loads(part.read_text())
        except (OSError, ValueError, RecursionError):
            continue  # an unreadable part is not a finished shard: it is redone
        if not isinstance(value, dict):
            continue  # nor is a corrupt one
        recorded = value.get("vision_encoder", "missing")
        if recorded != fingerprint:
            raise BuildError(f"--resume: {part.relative_to(out)} was encoded with encoder fingerprint "
                             f"{str(recorded)[:12]}, this build uses {str(fingerprint)[:12]}: a resumed build must "
                             "not mix encoders; start a new --output")


def remove_temp_files(out: Path) -> None:
    """Our own leftovers of an interrupted write: `*.tmp` files, and a half-saved tokenizer directory."""
    shutil.rmtree(out / TOKENIZER_TMP, ignore_errors=True)
    for directory in (out, out / "shards", out / "embeddings", out / "latents", out / PARTS_DIR, out / "tokenizer"):
        if directory.is_dir():
            for path in directory.glob("*.tmp"):
                if path.is_file() or path.is_symlink():
                    path.unlink()


def prepare(config: BuildConfig, tokenizer, encoder: dict) -> tuple[dict, OutputLock | None]:
    """Rank 0: check and lock OUT, plan the shards, save the tokenizer, write build.json.

    Returns (state, lock); state is {"complete": True} for a finished build resumed (lock None then).
    """
    out = Path(config.output)
    lock = None
    if out.is_dir():
        lock = OutputLock(out)
    try:
        status = check_output(out, config.resume)
        if status == "complete":
            return {"complete": True}, lock
        if status == "new" and config.resume:
            print(f"{out}: nothing to resume (missing or empty): starting a new build", file=sys.stderr)
        plans, shard = [], 0
        for file_index, path in enumerate(config.inputs):
            plan = plan_input(path, file_index, config.samples_per_shard, shard)
            plans.append(plan)
            shard += len(plan.tasks)
            if plan.records == 0:
                print(f"warning: --input {path} holds no records (empty, or only blank lines)", file=sys.stderr)
        if sum(plan.records for plan in plans) == 0:
            print("warning: the inputs hold no records: the build will be empty (no shards)", file=sys.stderr)
        state = {
            "kind": BUILD_KIND,
            "format_version": FORMAT_VERSION,
            "settings": config.output_settings(),
            "inputs": [{"path": p.path, "kind": p.kind, "sha256": p.sha256, "records": p.records} for p in plans],
            "tokenizer_fingerprint": tokenizer.fingerprint(),
            "vision_encoder": encoder,
            "tasks": [dataclasses.asdict(task) for plan in plans for task in plan.tasks],
        }
        state = json.loads(json.dumps(state))  # the form it takes in build.json (tuples -> lists)
        if lock is None:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise BuildError(f"--output {out}: cannot create it ({error.strerror})") from None
            lock = OutputLock(out)
            status = check_output(out, config.resume)  # another build may have started meanwhile
        if status == "resume":
            _check_resume(out, state, read_build_state(out))
        try:
            for directory in ("shards", "embeddings", PARTS_DIR) + (("latents",) if config.targets != "siglip" else ()):
                (out / directory).mkdir(exist_ok=True)
            remove_temp_files(out)
            write_bytes_atomic(out / BUILD_STATE, json.dumps(state, sort_keys=True, indent=1).encode())
            if not (out / "tokenizer").is_dir():
                tmp = out / TOKENIZER_TMP
                tokenizer.save(tmp)
                os.replace(tmp, out / "tokenizer")
        except OSError as error:
            raise BuildError(f"--output {out}: cannot write there ({error.strerror}: "
                             f"{error.filename or out})") from None
        return state, lock
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def part_is_done(out: Path, task: dict, fingerprint: str | None) -> bool:
    """Whether shard `task` has a finished part made from the same task with the same encoder."""
    path = out / PARTS_DIR / f"shard-{task['shard']:05d}.json"
    if not path.is_file():
        return False
    try:
        part = json.loads(path.read_text())
        return part["task"] == json.loads(json.dumps(task)) and part.get("vision_encoder") == fingerprint
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):  # unreadable or corrupt
        return False
