"""One shard: its records -> packed token streams, an embedding part and `parts/shard-N.json`.

`ShardBuilder.process(task)` is the whole life of a shard, in this order:
  * `_parse_and_encode`: records are parsed and validated (engine.data.records.parse_record) and tokenized
    by the chat template, a chunk of records per batched tokenizer call;
  * `_read_record`: truncation, image bytes read and hashed; a bad record is rejected here (`_reject`: counted,
    written to the part's rejects, or fatal under --strict);
  * `_resolve`: new images are decoded (a record with an undecodable image is rejected) and encoded in
    fixed-size batches in first-seen order (so every bf16 bit depends on the shard's records alone);
  * `_write`: packing (best-fit-decreasing) and the shard's streams (engine.data.shards.ShardWriter), then the
    part file, which marks the shard finished for --resume.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.config import TOKENS_PER_IMAGE
from engine.data.atomic import write_bytes_atomic
from engine.data.background import OrderedWorker
from engine.data.manifest import sha256_file
from engine.data.records import Conversation, RecordError, ShardTask, iter_task_records, parse_record
from engine.data.shards import EmbeddingPartWriter, ShardWriter, shard_files
from preprocess.config import BuildConfig, StrictRejectError
from preprocess.packing import Document, fit_to_length, pack_best_fit_decreasing

if TYPE_CHECKING:  # torch is imported only once an image is met
    import torch

PARTS_DIR = "parts"
# Test hooks simulating a crash at the interesting points of a shard: os._exit (no cleanup) after N finished
# shards or inside shard N, and SIGKILL of a worker process (as the kernel's OOM killer does) at shard N.
CRASH_AFTER_SHARDS_ENV = "CHRYSALIS_PREPROCESS_CRASH_AFTER_SHARDS"
CRASH_DURING_SHARD_ENV = "CHRYSALIS_PREPROCESS_CRASH_DURING_SHARD"
KILL_WORKER_AT_SHARD_ENV = "CHRYSALIS_PREPROCESS_KILL_WORKER_AT_SHARD"
# ... and SIGKILL of the build's main process by a worker starting shard N (the build killed mid-shard).
KILL_MAIN_AT_SHARD_ENV = "CHRYSALIS_PREPROCESS_KILL_MAIN_AT_SHARD"
# Records parsed, then tokenized with one batched tokenizer call, at a time: the per-call overhead of the
# tokenizer libraries is larger than the BPE work on a conversation's short pieces.
ENCODE_CHUNK = 256


def part_path(out: Path, shard: int, suffix: str) -> Path:
    return out / PARTS_DIR / f"shard-{shard:05d}{suffix}"


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
    latent_queue: list[torch.Tensor] = field(default_factory=list)  # --targets vae-latents, in step with encode_queue
    rejects: list[dict] = field(default_factory=list)
    skipped: collections.Counter = field(default_factory=collections.Counter)
    counts: collections.Counter = field(default_factory=collections.Counter)


class ShardBuilder:
    """Turns ShardTasks into shard files; one per process (it holds the tokenizer and, once an image is met,
    the encoder).

    Args:
        config: the build's flags.
        input_names: input paths by file index (provenance).
        encoder: the build's `vision_encoder` description; every part records its fingerprint, and an
            encoder built here must have the same one.
        progress: called with (samples, tokens, images) increments.
        torch_threads: intra-op threads for the encoder in this process.
    """

    def __init__(self, config: BuildConfig, input_names: list[str], encoder: dict, progress=None,
                 torch_threads: int | None = None) -> None:
        from engine.tokenizer import build_tokenizer

        self.config = config
        self.input_names = input_names
        self.encoder = encoder
        self.tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model)
        self._backend = None
        self._latent_backend = None
        self._source = None
        self.torch_threads = torch_threads
        self.out = Path(config.output)
        self.progress = progress or (lambda samples, tokens, images: None)
        self.completed = 0

    @property
    def backend(self):
        """Built on first use: a process that only meets text never loads the encoder (seconds per process)."""
        if self._backend is None:
            from preprocess.backends import build_backend

            if self.torch_threads is not None:
                import torch

                torch.set_num_threads(self.torch_threads)
            self._backend = build_backend(self.config, self.encoder.get("fingerprint"))
        return self._backend

    @property
    def latent_backend(self):
        """`--targets vae-latents`: the VAE (built on first use, like the encoder), else None."""
        if self._latent_backend is None and self.config.targets == "vae-latents":
            from preprocess.vae_latents import VaeLatentBackend

            self._latent_backend = VaeLatentBackend(self.config.vae_info, self.config.device,
                                                    self.config.max_image_pixels)
        return self._latent_backend

    @property
    def source(self):
        """The image reader, made on first use."""
        if self._source is None:
            from engine.data.image_source import ImageSource

            self._source = ImageSource(self.config.image_root, self.config.embeddings_dir,
                                       max_bytes=self.config.max_image_bytes)
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
        from engine.tokenizer.chat import encode_conversations

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

    def _accept(self, state: _ShardState, document: Document, hashes: list[str]) -> None:
        state.documents.append(document)
        state.counts["tokens"] += len(document)
        state.counts["images"] += len(hashes)
        state.counts["truncated"] += int(document.truncated)

    def _resolve(self, state: _ShardState, final: bool) -> None:
        """Decode the pending images, accept or reject the pending records, encode full batches."""
        decoded: dict[str, torch.Tensor] = {}
        latent_pixels: dict[str, torch.Tensor] = {}
        if state.pending_blobs:
            results = self.backend.decode_batch(list(state.pending_blobs.values()))
            state.counts["pil_fallback_images"] += self.backend.take_pil_fallbacks()
            for digest, result in zip(state.pending_blobs, results):
                if isinstance(result, Exception):
                    state.bad[digest] = result
                else:
                    decoded[digest] = result
            if self.latent_backend is not None:  # the same bytes through the VAE's target transform
                for digest, result in zip(state.pending_blobs,
                                          self.latent_backend.decode_batch(list(state.pending_blobs.values()))):
                    if isinstance(result, Exception):
                        state.bad.setdefault(digest, result)
                        decoded.pop(digest, None)
                    else:
                        latent_pixels[digest] = result
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
                    if self.latent_backend is not None:
                        state.latent_queue.append(latent_pixels.pop(digest))
            self._accept(state, pending.document, pending.hashes)
        state.pending.clear()
        state.pending_blobs.clear()
        # Fixed-size batches in first-seen order: the batch composition (and so every bf16 bit) depends only
        # on the shard's records, never on workers or ranks. They are encoded and written on a background
        # thread, in order, while this thread reads and decodes the next images.
        batch = self.config.encode_batch_size
        while len(state.encode_queue) >= batch or (final and state.encode_queue):
            if self._encode_stage is None:
                self._encode_stage = OrderedWorker(self._encode_and_write, depth=2, name="encode")
            latents = state.latent_queue[:batch] if self.latent_backend is not None else None
            self._encode_stage.submit((state.encode_queue[:batch], latents))
            del state.encode_queue[:batch]
            if latents is not None:
                del state.latent_queue[:batch]

    def _encode_and_write(self, batch) -> None:
        """On the encode thread: one batch of pixels -> embedding rows (and VAE latents) appended to the part."""
        pixels, latent_pixels = batch
        self._embedding_writer.append(self.backend.encode(pixels))
        if latent_pixels is not None:
            self._latent_writer.append(self.latent_backend.encode(latent_pixels))

    def _report(self, state: _ShardState) -> None:
        now = (state.counts["samples_read"], state.counts["tokens"], state.counts["images"])
        self.progress(*(a - b for a, b in zip(now, self._reported)))
        self._reported = now

    # -- shard level --------------------------------------------------------------------------------------
    def process(self, task: ShardTask) -> dict:
        """Build one shard; returns its summary (also written to parts/shard-N.json, the completion marker)."""
        if os.environ.get(KILL_WORKER_AT_SHARD_ENV) == str(task.shard):
            import multiprocessing

            if multiprocessing.parent_process() is not None:
                os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get(KILL_MAIN_AT_SHARD_ENV) == str(task.shard):
            import multiprocessing

            if multiprocessing.parent_process() is not None:
                os.kill(os.getppid(), signal.SIGKILL)
                time.sleep(1.0)  # the shard goes on only in a worker that outlives its build
        state = _ShardState(task)
        self._embedding_writer = EmbeddingPartWriter(part_path(self.out, task.shard, ".emb"))
        if self.config.targets == "vae-latents":
            from engine.data.latents import LatentPartWriter

            self._latent_writer = LatentPartWriter(part_path(self.out, task.shard, ".lat"),
                                                   self.config.vae_info["row_shape"])
        self._encode_stage = None
        self._reported = (0, 0, 0)
        records = iter_task_records(task)
        try:
            while chunk := list(itertools.islice(records, ENCODE_CHUNK)):
                for raw, (parsed, encoded) in zip(chunk, self._parse_and_encode(chunk)):
                    self._read_record(state, raw, parsed, encoded)
                    if len(state.pending) >= 256:
                        self._resolve(state, final=False)
                self._report(state)
            self._resolve(state, final=True)
        finally:
            if self._encode_stage is not None:
                self._encode_stage.close()  # every batch encoded and appended, or its first error raised
        self._report(state)
        self._embedding_writer.commit()
        if self.config.targets == "vae-latents":
            self._latent_writer.commit()
        files, sequences = self._write(task, state)
        state.counts["samples_written"] = len(state.documents)
        state.counts["documents"] = len(state.documents)
        state.counts["sequences"] = sequences
        state.counts["unique_images"] = len(state.hashes)
        state.rejects.sort(key=lambda entry: entry["line"])
        summary = {
            "shard": task.shard, "task": dataclasses.asdict(task), "counts": dict(state.counts),
            "skipped": dict(state.skipped), "rejects": state.rejects, "hashes": state.hashes, "files": files,
            "vision_encoder": self.encoder.get("fingerprint"),
            **({"vae": self.config.vae_info["fingerprint"]} if self.config.targets == "vae-latents" else {}),
        }
        write_bytes_atomic(part_path(self.out, task.shard, ".json"), json.dumps(summary, sort_keys=True).encode())
        self.completed += 1
        if os.environ.get(CRASH_AFTER_SHARDS_ENV) == str(self.completed):
            os._exit(17)
        return {"shard": task.shard, "counts": summary["counts"]}

    def _write(self, task: ShardTask, state: _ShardState) -> tuple[dict[str, list], int]:
        """Pack the shard's documents and write its streams; returns ({file: [sha256, size]}, sequences)."""
        if not state.documents:
            return {}, 0
        bins = pack_best_fit_decreasing([len(d) for d in state.documents], self.config.seq_length)
        writer = ShardWriter(self.out, task.shard, self.config.seq_length, self.tokenizer.pad_id)
        for members in bins:
            documents = [state.documents[i] for i in members]
            refs = [[state.local_rows[digest] for _, digest, _ in d.images] for d in documents]
            writer.add_sequence(documents, refs, self.input_names)
        writer.commit()
        if os.environ.get(CRASH_DURING_SHARD_ENV) == str(task.shard):
            os._exit(17)
        files = {}
        for relative in shard_files(task.shard).values():
            files[relative] = [sha256_file(self.out / relative), (self.out / relative).stat().st_size]
        return files, len(bins)
