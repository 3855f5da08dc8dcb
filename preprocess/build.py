"""`python -m preprocess build`: records -> packed, tokenized shards with precomputed image embeddings.

Work is split into shards fixed by the input alone (`--samples-per-shard` consecutive records of one input file,
found by one planning scan), so what a shard contains never depends on how many workers or MPI ranks built it:

  1. plan (rank 0, build_state.py): lock OUT, scan every input once (sha256, record offsets), describe the
     image encoder (its fingerprint, from config and weight files: nothing is built), write build.json,
     save the tokenizer.
  2. shards (all ranks, shard_builder.py; rank r takes shards r, r+R, ...; `--workers` local processes each,
     pool.py): read, validate, tokenize, truncate, read + hash + decode + encode images (each distinct image
     once per shard; the encoder is built only by a process that meets an image), pack, write the shard's
     streams and its embedding part, then `parts/shard-N.json` as its completion marker.
  3. dedup (rank 0, finalize.py): walk the parts in shard order, give every distinct image hash a global row.
  4. segments (each rank, its own shards, finalize.py): keep only first-seen rows, write image_rows.npy.
  5. manifest (rank 0, manifest.py): embeddings/index.npy, rejects.jsonl, manifest.json last; remove parts/
     and build.json.

Every file is written to a temp name and renamed. `--resume` skips shards whose marker exists and redoes the
rest, so an interrupted build finishes without duplicating or losing a record.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from engine.data.manifest import MANIFEST_NAME
from engine.data.records import ShardTask
from preprocess.backends import describe_backend
from preprocess.build_state import part_is_done, prepare
from preprocess.collective import Collective, mpi_communicator
from preprocess.config import (  # noqa: F401 (re-exported for callers of the old single module)
    BuildConfig,
    BuildError,
    BuildInterrupted,
    StrictRejectError,
)
from preprocess.finalize import assign_rows, finalize_shard
from preprocess.manifest import print_summary, write_manifest
from preprocess.pool import Progress, run_tasks
from preprocess.shard_builder import (  # noqa: F401 (test hooks, re-exported)
    CRASH_AFTER_SHARDS_ENV,
    CRASH_DURING_SHARD_ENV,
    KILL_MAIN_AT_SHARD_ENV,
    KILL_WORKER_AT_SHARD_ENV,
)


def _check_template(config: BuildConfig, tokenizer) -> None:
    """A template the tokenizer cannot render is a configuration error, not a per-record skip."""
    from engine.tokenizer.chat import Turn, encode_conversation

    try:
        encode_conversation([Turn("user", "a"), Turn("assistant", "b")], tokenizer, config.chat_template)
    except ValueError as error:
        raise BuildError(f"--chat-template {config.chat_template}: {error}") from None


def run_build(config: BuildConfig) -> dict:
    """Run (or, with --resume, finish) a build; returns the manifest. Raises BuildError on misuse."""
    from engine.tokenizer import build_tokenizer

    collective = Collective(mpi_communicator())
    started = time.monotonic()
    try:
        tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model)
    except (OSError, ValueError) as error:
        raise BuildError(f"--tokenizer-model {config.tokenizer_model}: {error}") from None
    _check_template(config, tokenizer)
    encoder = collective.run_on_root(lambda: describe_backend(config))
    if config.targets == "vae-latents":
        from preprocess.vae_latents import describe_vae

        config = dataclasses.replace(config, vae_info=collective.run_on_root(
            lambda: describe_vae(config.vae, config.vae_image_size)))
    locks = []

    def plan() -> dict:
        state, lock = prepare(config, tokenizer, encoder)
        locks.append(lock)
        return state

    state = collective.run_on_root(plan)
    try:
        return _run(config, collective, tokenizer, encoder, state, started)
    finally:
        for lock in locks:
            if lock is not None:
                lock.release()


def _run(config: BuildConfig, collective: Collective, tokenizer, encoder: dict, state: dict,
         started: float) -> dict:
    out = Path(config.output)
    if state.get("complete"):
        if collective.rank == 0:
            print(f"{out}: build already complete, nothing to resume", file=sys.stderr)
        return json.loads((out / MANIFEST_NAME).read_text())
    input_names = [entry["path"] for entry in state["inputs"]]
    tasks = [ShardTask(**{**task, "trailing_error": tuple(task["trailing_error"]) if task["trailing_error"] else None})
             for task in state["tasks"]]
    fingerprint = encoder.get("fingerprint")
    mine = [task for task in tasks if task.shard % collective.size == collective.rank
            and not part_is_done(out, dataclasses.asdict(task), fingerprint)]
    label = f"rank {collective.rank}/{collective.size}" if collective.size > 1 else "build"
    progress = Progress(sum(task.count + bool(task.trailing_error) for task in mine),
                        config.progress and collective.rank == 0, label)
    error = None
    try:
        run_tasks(config, mine, input_names, encoder, progress)
    except Exception as exc:  # noqa: BLE001 - shared with the other ranks before raising
        error = exc
    finally:
        progress.close()
    error = collective.first_error(error)
    if error is not None:
        raise error

    summaries, keeps, maps, row_hashes = collective.run_on_root(lambda: assign_rows(out, len(tasks), fingerprint))
    files: dict[str, list] = {}
    for task in tasks:
        if task.shard % collective.size == collective.rank:
            files.update(finalize_shard(out, task.shard, len(summaries[task.shard]["hashes"]),
                                        keeps[task.shard], maps[task.shard],
                                        bool(summaries[task.shard]["counts"].get("sequences"))))
    gathered = collective.gather(files)
    manifest = None
    if collective.rank == 0:
        for part in gathered:
            files.update(part)
        manifest = write_manifest(out, config, state, tokenizer, summaries, keeps, row_hashes, files)
        print_summary(out, manifest, summaries, time.monotonic() - started)
        if manifest["counts"]["samples_read"] and not manifest["counts"]["samples_written"]:
            print(f"warning: every record was skipped: {out} holds no sequences (see rejects.jsonl)",
                  file=sys.stderr)
    collective.barrier()
    return collective.bcast(manifest)
