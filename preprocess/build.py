"""`python -m preprocess build`: records -> packed, tokenized shards with precomputed image embeddings.

Work is split into shards fixed by the input alone (`--samples-per-shard` consecutive records of one input file,
found by one planning scan), so what a shard contains never depends on how many workers or MPI ranks built it:

  1. plan (rank 0): scan every input once (sha256, record offsets); save the tokenizer; write build.json.
  2. shards (all ranks; rank r takes shards r, r+R, ...; `--workers` local processes each): read, validate,
     tokenize, truncate, read + hash + decode + encode images (each distinct image once per shard), pack,
     write the shard's streams and its embedding part, then `parts/shard-N.json` as its completion marker.
  3. dedup (rank 0): walk the parts in shard order, give every distinct image hash a global row.
  4. segments (each rank, its own shards): keep only first-seen rows (a rename when all are new), write
     image_rows.npy, hash the files.
  5. manifest (rank 0): embeddings/index.npy, rejects.jsonl, manifest.json last; remove parts/ and build.json.

Every file is written to a temp name and renamed. `--resume` skips shards whose marker exists and redoes the
rest, so an interrupted build finishes without duplicating or losing a record.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.config import TOKENS_PER_IMAGE
from engine.tokenizer.chat import encode_conversations
from preprocess.manifest import FORMAT_VERSION, MANIFEST_NAME, serialize_manifest, sha256_file
from preprocess.packing import Document, fit_to_length, pack_best_fit_decreasing
from preprocess.records import Conversation, RecordError, ShardTask, iter_task_records, parse_record, plan_input
from preprocess.shards import (
    ROW_BYTES,
    EmbeddingPartWriter,
    ShardWriter,
    save_npy_atomic,
    segment_path,
    shard_files,
    shard_prefix,
    write_bytes_atomic,
)

if TYPE_CHECKING:  # torch, transformers and the image code are imported only once an image is met
    import torch

PARTS_DIR = "parts"
BUILD_STATE = "build.json"
COUNT_KEYS = ("samples_read", "samples_written", "sequences", "documents", "images", "unique_images", "tokens")
# Test hooks simulating a crash (os._exit, no cleanup) at the two interesting points of a shard.
CRASH_AFTER_SHARDS_ENV = "CHRYSALIS_PREPROCESS_CRASH_AFTER_SHARDS"
CRASH_DURING_SHARD_ENV = "CHRYSALIS_PREPROCESS_CRASH_DURING_SHARD"
# Records parsed, then tokenized with one batched tokenizer call, at a time: the per-call overhead of the
# tokenizer libraries is larger than the BPE work on a conversation's short pieces.
ENCODE_CHUNK = 256


class BuildError(RuntimeError):
    """A problem with the build as a whole (arguments, output directory); exit status 2."""


class StrictRejectError(BuildError):
    """Under --strict, the first bad record stops the build."""


@dataclass(kw_only=True)
class BuildConfig:
    """Everything `build` needs; the CLI flags map one to one (see preprocess/cli.py for their help)."""

    inputs: list[str]
    output: str
    tokenizer_type: str
    tokenizer_model: str
    chat_template: str = "llama3"
    vision_encoder: str | None = None
    image_root: str | None = None
    embeddings_dir: str | None = None
    seq_length: int = 4096
    overlong: str = "truncate"
    samples_per_shard: int = 10000
    encode_batch_size: int = 32
    image_decoder: str = "auto"
    device: str | None = None
    workers: int = 1
    resume: bool = False
    strict: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not self.inputs:
            problems.append("at least one --input is required")
        if self.seq_length < TOKENS_PER_IMAGE + 8:
            problems.append(f"--seq-length {self.seq_length} is too short to hold one image block")
        if self.overlong not in ("truncate", "drop"):
            problems.append("--overlong must be truncate or drop")
        if self.samples_per_shard < 1 or self.encode_batch_size < 1 or self.workers < 1:
            problems.append("--samples-per-shard, --encode-batch-size and --workers must be >= 1")
        if self.vision_encoder is None and self.embeddings_dir is None:
            problems.append("give --vision-encoder (a local SigLIP directory or tiny-random) or --embeddings-dir")
        if problems:
            raise BuildError("; ".join(problems))

    def output_settings(self) -> dict:
        """Settings that change the output bytes (compared on --resume, recorded in the manifest)."""
        return {"seq_length": self.seq_length, "chat_template": self.chat_template, "overlong": self.overlong,
                "samples_per_shard": self.samples_per_shard, "encode_batch_size": self.encode_batch_size,
                "embeddings_dir": self.embeddings_dir is not None}


# -------------------------------------------------------------------------------------------------------------
# Image embedding backends
# -------------------------------------------------------------------------------------------------------------
class _EncoderBackend:
    """Pixels through the SigLIP encoder."""

    def __init__(self, config: BuildConfig) -> None:
        from engine.vision_encoder import build_vision_encoder

        self.encoder = build_vision_encoder(config.vision_encoder, device=config.device, decoder=config.image_decoder)

    def describe(self) -> dict:
        return dataclasses.asdict(self.encoder.info())

    def decode_batch(self, blobs):
        return self.encoder.decode(blobs)

    def encode(self, decoded: list[torch.Tensor]) -> torch.Tensor:
        import torch

        return self.encoder.encode_pixels(torch.stack(decoded))


class _PrecomputedBackend:
    """Embeddings read from --embeddings-dir: 'decode' parses the file, 'encode' casts to bf16."""

    def __init__(self, config: BuildConfig) -> None:
        self.name = config.vision_encoder

    def describe(self) -> dict:
        return {"name": "precomputed", "fingerprint": None, "declared_encoder": self.name}

    def decode_batch(self, blobs):
        from preprocess.images import decode_embedding

        out = []
        for blob in blobs:
            try:
                out.append(decode_embedding(blob))
            except RecordError as error:
                out.append(error)
        return out

    def encode(self, decoded: list[torch.Tensor]) -> torch.Tensor:
        import torch

        return torch.stack(decoded).to(torch.bfloat16)


def build_backend(config: BuildConfig):
    return _PrecomputedBackend(config) if config.embeddings_dir else _EncoderBackend(config)


class BackendInBackground:
    """The image backend, built on a thread of its own from the start of the build (rank 0).

    Building the SigLIP encoder (importing torch and transformers' SigLIP, making the weights, hashing them
    for the fingerprint) costs about 7 s of CPU, more than tokenizing 10,000 conversations. Rank 0 always
    needs its description (build.json, manifest), but a text-only build never needs the encoder itself, so
    the build does not wait for it: the workers' start and their tokenizing run meanwhile. A spec that is
    neither a directory nor a `*-random` name is built at once, so its error comes before any work.

    `run_build` joins the thread before it returns or raises: the random encoders are made under torch's
    global RNG, so two constructions must never overlap (the lock covers concurrent builds in one process).
    """

    _construction = threading.Lock()

    def __init__(self, config: BuildConfig) -> None:
        self.config = config
        self._backend = None
        self._description: dict | None = None
        self._error: BaseException | None = None
        self._done = False
        self._thread = threading.Thread(target=self._build, name="image-backend", daemon=True)
        spec = config.vision_encoder or ""
        if not (config.embeddings_dir or Path(spec).is_dir() or spec.endswith("-random")):
            self.get()

    def start(self) -> None:
        """Build on the background thread from now on (no-op once built)."""
        if not self._done and self._thread.ident is None:
            self._thread.start()

    def _build(self) -> None:
        try:
            with self._construction:
                self._backend = build_backend(self.config)
                self._description = self._backend.describe()
        except BaseException as error:  # noqa: BLE001 - raised in the caller's thread by get()
            self._error = error
        self._done = True

    def join(self) -> None:
        if self._thread.ident is not None:
            self._thread.join()

    def get(self):
        """The backend (built here if the thread was not started; waits for it otherwise)."""
        if self._thread.ident is not None:
            self._thread.join()
        elif not self._done:
            self._build()
        if isinstance(self._error, (OSError, ValueError, RuntimeError)):
            raise BuildError(f"--vision-encoder {self.config.vision_encoder}: {self._error}") from None
        if self._error is not None:
            raise self._error
        return self._backend

    def description(self) -> dict:
        self.get()
        return self._description


# -------------------------------------------------------------------------------------------------------------
# One shard
# -------------------------------------------------------------------------------------------------------------
@dataclass
class _Pending:
    document: Document
    hashes: list[str]
    record_id: str


@dataclass
class _ShardState:
    task: ShardTask
    documents: list[Document] = field(default_factory=list)
    local_rows: dict[str, int] = field(default_factory=dict)  # image sha256 -> shard-local row
    hashes: list[str] = field(default_factory=list)
    bad: dict[str, Exception] = field(default_factory=dict)
    pending: list[_Pending] = field(default_factory=list)
    pending_blobs: dict[str, bytes] = field(default_factory=dict)
    encode_queue: list[torch.Tensor] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    skipped: collections.Counter = field(default_factory=collections.Counter)
    counts: collections.Counter = field(default_factory=collections.Counter)


class ShardProcessor:
    """Turns ShardTasks into shard files; one per process (it holds the tokenizer and the encoder)."""

    def __init__(self, config: BuildConfig, input_names: list[str], progress=None,
                 backend: BackendInBackground | None = None, torch_threads: int | None = None) -> None:
        from engine.tokenizer import build_tokenizer

        self.config = config
        self.input_names = input_names
        self.tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model)
        self._shared_backend = backend
        self._backend = None
        self._source = None
        self.torch_threads = torch_threads
        self.out = Path(config.output)
        self.progress = progress or (lambda samples, tokens, images: None)
        self.completed = 0

    @property
    def backend(self):
        """Built on first use: a worker that only meets text never loads the encoder (seconds per process)."""
        if self._backend is None:
            if self._shared_backend is not None:
                self._backend = self._shared_backend.get()
            else:
                if self.torch_threads is not None:
                    import torch

                    torch.set_num_threads(self.torch_threads)
                self._backend = build_backend(self.config)
        return self._backend

    @property
    def source(self):
        """The image reader, made on first use (it imports torch, which text needs nowhere)."""
        if self._source is None:
            from preprocess.images import ImageSource

            self._source = ImageSource(self.config.image_root, self.config.embeddings_dir)
        return self._source

    # -- record level -------------------------------------------------------------------------------------
    def _reject(self, state: _ShardState, line: int, record_id: str | None, error: Exception) -> None:
        reason = getattr(error, "reason", "invalid_record")
        entry = {"file": state.task.path, "line": line, "id": record_id, "reason": reason, "message": str(error)}
        if self.config.strict:
            raise StrictRejectError(f"{state.task.path}:{line}: {reason}: {error} (--strict)")
        state.rejects.append(entry)
        state.skipped[reason] += 1

    def _parse_and_encode(self, chunk: list) -> list:
        """Per raw record: (Conversation, EncodedConversation), (RecordError, None) or (None, None) for a
        record that failed to read. All conversations of the chunk are tokenized in one batched call."""
        parsed = []
        for raw in chunk:
            if raw.error is not None:
                parsed.append(None)
                continue
            try:
                parsed.append(parse_record(raw.value, raw.line))
            except RecordError as error:
                parsed.append(error)
        conversations = [item for item in parsed if isinstance(item, Conversation)]
        encoded = iter(encode_conversations([c.turns for c in conversations], self.tokenizer,
                                            self.config.chat_template, TOKENS_PER_IMAGE))
        return [(item, next(encoded) if isinstance(item, Conversation) else None) for item in parsed]

    def _read_record(self, state: _ShardState, raw, parsed, encoded) -> None:
        config = self.config
        state.counts["samples_read"] += 1
        if raw.error is not None:
            self._reject(state, raw.line, None, raw.error)
            return
        record_id = raw.value.get("id") if isinstance(raw.value, dict) else None
        record_id = None if record_id is None else str(record_id)
        try:
            if isinstance(parsed, RecordError):
                raise parsed
            conversation = parsed
            record_id = conversation.id
            end, truncated = fit_to_length(encoded, config.seq_length, TOKENS_PER_IMAGE, config.overlong,
                                           [turn.role for turn in conversation.turns])
            kept = [span for span in encoded.images if span.slot_start + TOKENS_PER_IMAGE < end]
            hashes = []
            for span in kept:
                blob = self.source.read(conversation.images[span.image_index])
                digest = hashlib.sha256(blob).hexdigest()
                if digest in state.bad:
                    raise state.bad[digest]
                hashes.append((digest, blob))
        except RecordError as error:
            self._reject(state, raw.line, record_id, error)
            return
        document = Document(
            tokens=np.asarray(encoded.tokens[:end], dtype=np.int32),
            loss_mask=np.asarray(encoded.loss_mask[:end], dtype=np.uint8),
            images=[(span.slot_start, digest, span.is_response) for span, (digest, _) in zip(kept, hashes)],
            source=(state.task.file_index, raw.line, conversation.id),
            truncated=truncated,
        )
        for digest, blob in hashes:
            if digest not in state.local_rows and digest not in state.pending_blobs:
                state.pending_blobs[digest] = blob
        state.pending.append(_Pending(document, [digest for digest, _ in hashes], conversation.id))
        if len(state.pending_blobs) >= config.encode_batch_size:
            self._resolve(state, final=False)

    def _resolve(self, state: _ShardState, final: bool) -> None:
        """Decode the pending images, accept or reject the pending records, encode full batches."""
        decoded: dict[str, torch.Tensor] = {}
        if state.pending_blobs:
            results = self.backend.decode_batch(list(state.pending_blobs.values()))
            for digest, result in zip(state.pending_blobs, results):
                if isinstance(result, Exception):
                    state.bad[digest] = result
                else:
                    decoded[digest] = result
        for pending in state.pending:
            error = next((state.bad[d] for d in pending.hashes if d in state.bad), None)
            if error is not None:
                self._reject(state, pending.document.source[1], pending.record_id, error)
                continue
            for digest in pending.hashes:
                if digest not in state.local_rows:
                    state.local_rows[digest] = len(state.hashes)
                    state.hashes.append(digest)
                    state.encode_queue.append(decoded.pop(digest))
            state.documents.append(pending.document)
            state.counts["tokens"] += len(pending.document)
            state.counts["images"] += len(pending.hashes)
            state.counts["truncated"] += int(pending.document.truncated)
        self._report(state)
        state.pending.clear()
        state.pending_blobs.clear()
        # Fixed-size batches in first-seen order: the batch composition (and so every bf16 bit) depends only
        # on the shard's records, never on workers or ranks.
        batch = self.config.encode_batch_size
        while len(state.encode_queue) >= batch or (final and state.encode_queue):
            rows = self.backend.encode(state.encode_queue[:batch])
            del state.encode_queue[:batch]
            self._embedding_writer.append(rows)

    def _report(self, state: _ShardState) -> None:
        now = (state.counts["samples_read"], state.counts["tokens"], state.counts["images"])
        self.progress(*(a - b for a, b in zip(now, self._reported)))
        self._reported = now

    # -- shard level --------------------------------------------------------------------------------------
    def process(self, task: ShardTask) -> dict:
        """Build one shard; returns its summary (also written to parts/shard-N.json, the completion marker)."""
        config = self.config
        state = _ShardState(task)
        part_base = self.out / PARTS_DIR / f"shard-{task.shard:05d}"
        self._embedding_writer = EmbeddingPartWriter(str(part_base) + ".emb")
        self._reported = (0, 0, 0)
        records = iter_task_records(task)
        while chunk := list(itertools.islice(records, ENCODE_CHUNK)):
            for raw, (parsed, encoded) in zip(chunk, self._parse_and_encode(chunk)):
                self._read_record(state, raw, parsed, encoded)
                if len(state.pending) >= 256:
                    self._resolve(state, final=False)
                elif state.counts["samples_read"] - self._reported[0] >= 256:
                    self._report(state)
        self._resolve(state, final=True)
        self._embedding_writer.commit()

        files: dict[str, list] = {}
        sequences = 0
        if state.documents:
            bins = pack_best_fit_decreasing([len(d) for d in state.documents], config.seq_length)
            writer = ShardWriter(self.out, task.shard, config.seq_length, self.tokenizer.pad_id)
            for members in bins:
                documents = [state.documents[i] for i in members]
                refs = [[state.local_rows[digest] for _, digest, _ in d.images] for d in documents]
                writer.add_sequence(documents, refs, self.input_names)
            writer.commit()
            sequences = len(bins)
            if os.environ.get(CRASH_DURING_SHARD_ENV) == str(task.shard):
                os._exit(17)
            for relative in shard_files(task.shard).values():
                files[relative] = [sha256_file(self.out / relative), (self.out / relative).stat().st_size]
        state.counts["samples_written"] = len(state.documents)
        state.counts["documents"] = len(state.documents)
        state.counts["sequences"] = sequences
        state.counts["unique_images"] = len(state.hashes)
        state.rejects.sort(key=lambda entry: entry["line"])
        summary = {
            "shard": task.shard, "task": dataclasses.asdict(task), "counts": dict(state.counts),
            "skipped": dict(state.skipped), "rejects": state.rejects, "hashes": state.hashes, "files": files,
        }
        write_bytes_atomic(str(part_base) + ".json", json.dumps(summary, sort_keys=True).encode())
        self.completed += 1
        if os.environ.get(CRASH_AFTER_SHARDS_ENV) == str(self.completed):
            os._exit(17)
        return {"shard": task.shard, "counts": summary["counts"]}


# -------------------------------------------------------------------------------------------------------------
# Worker processes
# -------------------------------------------------------------------------------------------------------------
_WORKER: ShardProcessor | None = None


def _init_worker(config: BuildConfig, input_names: list[str], queue, threads: int) -> None:
    global _WORKER
    _WORKER = ShardProcessor(config, input_names, progress=lambda *delta: queue.put(delta), torch_threads=threads)


def _run_task(task: ShardTask) -> dict:
    return _WORKER.process(task)


class _Progress:
    """A tqdm bar over records with samples/s, tokens/s and images/s (rank 0 only; off when not a terminal)."""

    def __init__(self, total: int, enabled: bool, label: str) -> None:
        self.start = time.monotonic()
        self.tokens = 0
        self.images = 0
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="sample", desc=label, file=sys.stderr, dynamic_ncols=True,
                                disable=None)
            except ImportError:
                self.bar = None

    def update(self, samples: int, tokens: int, images: int) -> None:
        self.tokens += tokens
        self.images += images
        if self.bar is not None:
            self.bar.update(samples)
            elapsed = max(time.monotonic() - self.start, 1e-6)
            self.bar.set_postfix_str(f"{self.bar.n / elapsed:.0f} samples/s, {self.tokens / elapsed:.0f} tok/s, "
                                     f"{self.images / elapsed:.1f} img/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_tasks(config: BuildConfig, tasks: list[ShardTask], input_names: list[str], backend, progress: _Progress
               ) -> None:
    if not tasks:
        return
    if config.workers == 1 or len(tasks) == 1:
        processor = ShardProcessor(config, input_names, progress=progress.update, backend=backend)
        for task in tasks:
            processor.process(task)
        return
    workers = min(config.workers, len(tasks))
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # fork + torch/OpenMP threads is unsafe
    queue = context.Queue()
    pool = context.Pool(workers, initializer=_init_worker, initargs=(config, input_names, queue, threads))
    try:
        results = [pool.apply_async(_run_task, (task,)) for task in tasks]
        while not all(result.ready() for result in results):
            _drain(queue, progress, timeout=0.2)
            for result in results:
                if result.ready() and not result.successful():
                    result.get()  # re-raises the worker's exception
        for result in results:
            result.get()
        _drain(queue, progress, timeout=0.0)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _drain(queue, progress: _Progress, timeout: float) -> None:
    import queue as queue_module

    try:
        progress.update(*queue.get(timeout=timeout) if timeout else queue.get_nowait())
        while True:
            progress.update(*queue.get_nowait())
    except queue_module.Empty:
        return


# -------------------------------------------------------------------------------------------------------------
# MPI
# -------------------------------------------------------------------------------------------------------------
_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def mpi_communicator():
    """COMM_WORLD when launched by mpirun/mpiexec with more than one rank, else None.

    mpi4py is only imported under an MPI launcher: initialising MPI in a plain run can hang or fail in
    containers without an MPI runtime.
    """
    if not any(name in os.environ for name in _MPI_ENV):
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise BuildError("launched under MPI but mpi4py is not installed (pip install mpi4py)") from None
    comm = MPI.COMM_WORLD
    return comm if comm.Get_size() > 1 else None


class _Collective:
    """The few collectives the build needs, as no-ops without MPI."""

    def __init__(self, comm) -> None:
        self.comm = comm
        self.rank = comm.Get_rank() if comm else 0
        self.size = comm.Get_size() if comm else 1

    def bcast(self, value):
        return self.comm.bcast(value, root=0) if self.comm else value

    def gather(self, value):
        return self.comm.gather(value, root=0) if self.comm else [value]

    def barrier(self) -> None:
        if self.comm:
            self.comm.barrier()

    def run_on_root(self, function):
        """Run `function` on rank 0 and broadcast its result, or its error to raise on every rank."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = function()
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                error = exc
        result, error = self.bcast((result, error))
        if error is not None:
            raise error
        return result


# -------------------------------------------------------------------------------------------------------------
# The build
# -------------------------------------------------------------------------------------------------------------
def _remove_temp_files(out: Path) -> None:
    for directory in (out, out / "shards", out / "embeddings", out / PARTS_DIR, out / "tokenizer"):
        if directory.is_dir():
            for path in directory.glob("*.tmp"):
                path.unlink()


def _encoder_request(config: BuildConfig) -> dict:
    """The flags that choose the image backend: recorded in build.json until its description is known."""
    return {"vision_encoder": config.vision_encoder, "embeddings_dir": config.embeddings_dir,
            "image_decoder": config.image_decoder, "device": config.device}


def _prepare(config: BuildConfig, backend: BackendInBackground, tokenizer) -> dict:
    """Rank 0: check the output directory, plan the shards, save the tokenizer, write build.json.

    build.json records the encoder's description once it is known (see `_record_backend`); until then
    (`vision_encoder` null) the flags that choose the encoder stand in for it on --resume.
    """
    out = Path(config.output)
    if (out / MANIFEST_NAME).exists():
        if config.resume:
            return {"complete": True}
        raise BuildError(f"{out} already holds a finished build ({MANIFEST_NAME} exists); choose a new --output")
    if out.exists() and any(out.iterdir()) and not config.resume:
        raise BuildError(f"{out} is not empty and has no {MANIFEST_NAME}: an interrupted build? Finish it with "
                         "--resume (same arguments), or remove the directory")
    plans, shard = [], 0
    for file_index, path in enumerate(config.inputs):
        plan = plan_input(path, file_index, config.samples_per_shard, shard)
        plans.append(plan)
        shard += len(plan.tasks)
    state = {
        "format_version": FORMAT_VERSION,
        "settings": config.output_settings(),
        "inputs": [{"path": p.path, "kind": p.kind, "sha256": p.sha256, "records": p.records} for p in plans],
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "vision_encoder": None,
        "vision_encoder_request": _encoder_request(config),
        "tasks": [dataclasses.asdict(task) for plan in plans for task in plan.tasks],
    }
    state_path = out / BUILD_STATE
    if config.resume and state_path.exists():
        previous = json.loads(state_path.read_text())
        state["vision_encoder"] = backend.description()  # resuming waits for it: it must match
        differing = sorted(key for key in state if state[key] != previous.get(key)
                           and not (key == "vision_encoder" and previous.get(key) is None))
        if differing:
            raise BuildError(f"--resume: {', '.join(differing)} differ from the interrupted build in {out}; "
                             "resume with the same inputs and flags, or start a new --output")
    out.mkdir(parents=True, exist_ok=True)
    for directory in ("shards", "embeddings", PARTS_DIR):
        (out / directory).mkdir(exist_ok=True)
    _remove_temp_files(out)
    if not (out / "tokenizer").is_dir():
        tmp = out / "tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer.save(tmp)
        os.replace(tmp, out / "tokenizer")
    write_bytes_atomic(state_path, json.dumps(state, sort_keys=True, indent=1).encode())
    return state


def _record_backend(config: BuildConfig, state: dict, backend: BackendInBackground) -> None:
    """Rank 0, after the shards: wait for the encoder's description and record it in build.json."""
    if state["vision_encoder"] is None:
        state["vision_encoder"] = backend.description()
        write_bytes_atomic(Path(config.output) / BUILD_STATE, json.dumps(state, sort_keys=True, indent=1).encode())


def _part_done(out: Path, task: dict) -> bool:
    path = out / PARTS_DIR / f"shard-{task['shard']:05d}.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text())["task"] == json.loads(json.dumps(task))
    except (ValueError, KeyError):
        return False


def _assign_rows(out: Path, num_shards: int) -> tuple[list[dict], list[list[int]], list[list[int]], list[str]]:
    """Rank 0: global dedup over all parts, in shard order -> (summaries, keep lists, row maps, row hashes)."""
    summaries, keeps, maps, row_hashes = [], [], [], []
    rows: dict[str, int] = {}
    for shard in range(num_shards):
        summary = json.loads((out / PARTS_DIR / f"shard-{shard:05d}.json").read_text())
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


def _finalize_shard(out: Path, shard: int, local_rows: int, keep: list[int], mapping: list[int],
                    has_streams: bool) -> dict:
    """Write a shard's embedding segment (first-seen rows only) and image_rows.npy; return their digests."""
    part = out / PARTS_DIR / f"shard-{shard:05d}.emb"
    final = out / segment_path(shard)
    if keep and part.exists():
        if len(keep) == local_rows:
            os.replace(part, final)  # the common case: no cross-shard duplicates, no copy
        else:
            data = np.memmap(part, dtype=np.uint8, mode="r").reshape(local_rows, ROW_BYTES)
            with open(str(final) + ".tmp", "wb") as handle:
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
    if not has_streams:
        return files
    rows_path = out / f"{shard_prefix(shard)}.image_rows.npy"
    save_npy_atomic(rows_path, np.asarray(mapping, dtype=np.int64))
    files[str(rows_path.relative_to(out))] = [sha256_file(rows_path), rows_path.stat().st_size]
    return files


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

    collective = _Collective(mpi_communicator())
    started = time.monotonic()
    try:
        tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model)
    except (OSError, ValueError) as error:
        raise BuildError(f"--tokenizer-model {config.tokenizer_model}: {error}") from None
    _check_template(config, tokenizer)
    started_backend: list[BackendInBackground] = []
    # Only rank 0 needs the encoder's description; a bad spec is still reported on every rank.
    collective.run_on_root(lambda: started_backend.append(BackendInBackground(config)))
    backend = started_backend[0] if started_backend else None
    try:
        return _run_build(config, collective, tokenizer, backend, started)
    finally:
        if backend is not None:
            backend.join()


def _run_build(config: BuildConfig, collective: _Collective, tokenizer, backend: BackendInBackground | None,
               started: float) -> dict:
    out = Path(config.output)
    state = collective.run_on_root(lambda: _prepare(config, backend, tokenizer))
    if backend is not None:
        backend.start()  # after _prepare: its errors (output directory, inputs) need no encoder
    if state.get("complete"):
        if collective.rank == 0:
            print(f"{out}: build already complete, nothing to resume", file=sys.stderr)
        return json.loads((out / MANIFEST_NAME).read_text())
    input_names = [entry["path"] for entry in state["inputs"]]
    tasks = [ShardTask(**{**task, "trailing_error": tuple(task["trailing_error"]) if task["trailing_error"] else None})
             for task in state["tasks"]]
    mine = [task for task in tasks if task.shard % collective.size == collective.rank
            and not _part_done(out, dataclasses.asdict(task))]
    label = f"rank {collective.rank}/{collective.size}" if collective.size > 1 else "build"
    progress = _Progress(sum(task.count + bool(task.trailing_error) for task in mine),
                         config.progress and collective.rank == 0, label)
    try:
        error = None
        try:
            _run_tasks(config, mine, input_names, backend, progress)
        except Exception as exc:  # noqa: BLE001 - shared with the other ranks before raising
            error = exc
    finally:
        progress.close()
    errors = [e for e in collective.gather(error) or [] if e is not None] if collective.comm else [error]
    errors = collective.bcast(errors)
    if any(errors):
        raise next(e for e in errors if e is not None)

    collective.run_on_root(lambda: _record_backend(config, state, backend))
    plan = collective.run_on_root(lambda: _assign_rows(out, len(tasks)))
    summaries, keeps, maps, row_hashes = plan
    files: dict[str, list] = {}
    for task in tasks:
        if task.shard % collective.size == collective.rank:
            files.update(_finalize_shard(out, task.shard, len(summaries[task.shard]["hashes"]),
                                         keeps[task.shard], maps[task.shard],
                                         bool(summaries[task.shard]["counts"].get("sequences"))))
    gathered = collective.gather(files)
    manifest = None
    if collective.rank == 0:
        for part in gathered:
            files.update(part)
        manifest = _write_manifest(config, state, tokenizer, summaries, keeps, row_hashes, files, started)
    collective.barrier()
    return collective.bcast(manifest)


def _write_manifest(config: BuildConfig, state: dict, tokenizer, summaries: list[dict], keeps: list[list[int]],
                    row_hashes: list[str], files: dict[str, list], started: float) -> dict:
    out = Path(config.output)
    counts = collections.Counter()
    skipped = collections.Counter()
    shards, segments = [], []
    index_rows = []
    for summary, keep in zip(summaries, keeps):
        shard = summary["shard"]
        counts.update({key: value for key, value in summary["counts"].items() if key != "unique_images"})
        skipped.update(summary["skipped"])
        files.update(summary["files"])
        if keep:
            for row, _ in enumerate(keep):
                index_rows.append((len(segments), row))
            segments.append({"path": segment_path(shard), "rows": len(keep), "shard": shard})
        # An empty shard (every record rejected) gets no streams: megatron cannot memory-map empty files.
        if summary["counts"].get("sequences", 0):
            prefix = shard_prefix(shard)
            shards.append({
                "index": shard, "tokens": prefix, "loss_mask": f"{prefix}.loss_mask",
                "doc_bounds": f"{prefix}.doc_bounds", "images": f"{prefix}.images",
                "image_rows": f"{prefix}.image_rows.npy", "documents": f"{prefix}.documents.jsonl",
                "counts": {key: summary["counts"].get(key, 0)
                           for key in ("samples_read", "samples_written", "sequences", "documents", "images",
                                       "unique_images", "tokens")},
            })
    index = np.zeros(len(row_hashes), dtype=[("segment", "<i4"), ("row", "<i8"), ("sha256", "S32")])
    if row_hashes:
        index["segment"] = [segment for segment, _ in index_rows]
        index["row"] = [row for _, row in index_rows]
        index["sha256"] = [bytes.fromhex(digest) for digest in row_hashes]
    save_npy_atomic(out / "embeddings" / "index.npy", index)
    rejects = "".join(json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n"
                      for summary in summaries for entry in summary["rejects"])
    write_bytes_atomic(out / "rejects.jsonl", rejects.encode("utf-8"))
    for relative in ["embeddings/index.npy", "rejects.jsonl"] + \
            sorted(str(p.relative_to(out)) for p in (out / "tokenizer").iterdir()):
        files[relative] = [sha256_file(out / relative), (out / relative).stat().st_size]
    counts["unique_images"] = len(row_hashes)
    sequences = counts["sequences"]
    manifest = {
        "format_version": FORMAT_VERSION,
        "seq_length": config.seq_length,
        "tokens_per_image": TOKENS_PER_IMAGE,
        "vision_dim": 1152,
        "chat_template": config.chat_template,
        "settings": state["settings"],
        "inputs": state["inputs"],
        "tokenizer": {
            "dir": "tokenizer", "type": tokenizer.kind, "fingerprint": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size, "base_vocab_size": tokenizer.base_vocab_size,
            "image_start_id": tokenizer.image_start_id, "image_end_id": tokenizer.image_end_id,
            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
        },
        "vision_encoder": state["vision_encoder"],
        "shards": shards,
        "embeddings": {"dtype": "bfloat16", "row_shape": [TOKENS_PER_IMAGE, 1152], "rows": len(row_hashes),
                       "index": "embeddings/index.npy", "segments": segments},
        "counts": {key: int(counts.get(key, 0)) for key in COUNT_KEYS},
        "truncated": int(counts.get("truncated", 0)),
        "padding_tokens": int(sequences * config.seq_length - counts["tokens"]),
        "packing_efficiency": round(counts["tokens"] / (sequences * config.seq_length), 6) if sequences else 0.0,
        "skipped": dict(sorted(skipped.items())),
        "rejects": "rejects.jsonl",
        "sha256": {relative: files[relative][0] for relative in sorted(files)},
        "bytes": {relative: files[relative][1] for relative in sorted(files)},
    }
    write_bytes_atomic(out / MANIFEST_NAME, serialize_manifest(manifest))
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    (out / BUILD_STATE).unlink(missing_ok=True)
    _print_summary(manifest, summaries, time.monotonic() - started)
    return manifest


def _print_summary(manifest: dict, summaries: list[dict], seconds: float) -> None:
    counts = manifest["counts"]
    shown = 0
    for summary in summaries:
        for entry in summary["rejects"]:
            if shown < 20:
                print(f"skipped {entry['file']}:{entry['line']}: {entry['reason']}: {entry['message']}",
                      file=sys.stderr)
            shown += 1
    if shown > 20:
        print(f"... and {shown - 20} more skipped records, see rejects.jsonl", file=sys.stderr)
    rate = counts["samples_read"] / max(seconds, 1e-9)
    print(f"built {counts['sequences']} sequences from {counts['samples_written']}/{counts['samples_read']} "
          f"samples ({counts['images']} images, {counts['unique_images']} unique), {counts['tokens']} tokens, "
          f"packing efficiency {manifest['packing_efficiency']:.2%}, {manifest['truncated']} truncated, "
          f"{sum(manifest['skipped'].values())} skipped {manifest['skipped']}; "
          f"{seconds:.1f}s ({rate:.0f} samples/s)", file=sys.stderr)
