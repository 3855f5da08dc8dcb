"""Reading and validating LLaVA-style records, streamed from JSONL files or JSON arrays.

A record is `{"id", "image": path | [paths], "conversations": [{"from": ..., "value": ...}, ...]}`. Files are
never loaded whole: JSONL is read line by line, JSON arrays element by element with an incremental decoder,
and a planning pass (`plan_input`) records the byte offset where every shard's first record starts, so a
worker seeks straight to its records.

Every problem with one record becomes a `RecordError(reason, message)`; `reason` is the short code counted
in the manifest's `skipped`, `message` the human text written to the rejects file.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from engine.tokenizer.chat import IMAGE_PLACEHOLDER, Turn

# LLaVA's roles, plus the OpenAI-style names ShareGPT-derived sets use.
ROLE_MAP = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
# Editors on Windows start UTF-8 files with a byte-order mark; it is not part of the first record.
UTF8_BOM = b"\xef\xbb\xbf"


class RecordError(ValueError):
    """One bad record: `reason` is a stable code (manifest `skipped` key), the message says what is wrong."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class RawRecord:
    """One element of an input file before validation: the decoded JSON value or the error met reading it."""

    line: int
    value: object = None
    error: RecordError | None = None


@dataclass
class Conversation:
    """A validated record."""

    id: str
    turns: list[Turn]
    images: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ShardTask:
    """Where one shard's records are: `count` records of input `file_index` from `start_byte`.

    `trailing_error` is a fatal JSON-array syntax error that ends the file after these records: it is reported
    (and counted as one record read and skipped) by the shard that reaches it.
    """

    shard: int
    file_index: int
    path: str
    kind: str  # "jsonl" | "json"
    start_byte: int
    start_line: int
    count: int
    trailing_error: tuple[int, str] | None = None


@dataclass
class InputPlan:
    path: str
    kind: str
    sha256: str
    records: int
    tasks: list[ShardTask]


def detect_kind(path: Path) -> str:
    """"json" for a file whose first non-blank byte (after a UTF-8 BOM) is `[`, otherwise "jsonl"."""
    with open(path, "rb") as handle:
        first = True
        while True:
            chunk = handle.read(4096)
            if not chunk:
                return "jsonl"
            if first and chunk.startswith(UTF8_BOM):
                chunk = chunk[len(UTF8_BOM):]
            first = False
            stripped = chunk.lstrip()
            if stripped:
                return "json" if stripped[:1] == b"[" else "jsonl"


# ---------------------------------------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------------------------------------
def _decode_jsonl_line(raw: bytes, line: int) -> RawRecord:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return RawRecord(line, error=RecordError(
            "non_utf8", f"text is not valid UTF-8 (byte {error.start} of the line)"))
    try:
        return RawRecord(line, value=json.loads(text))
    except json.JSONDecodeError as error:
        return RawRecord(line, error=RecordError("malformed_json", f"malformed JSON: {error.msg} at column {error.colno}"))
    except (ValueError, RecursionError) as error:  # valid syntax the decoder refuses: nesting, a huge integer
        return RawRecord(line, error=RecordError("malformed_json", f"unreadable JSON: {_unreadable(error)}"))


def _unreadable(error: Exception) -> str:
    """What json refused in a syntactically valid value (RecursionError, int digit limit), in one short line."""
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error).split(";")[0]


def iter_jsonl(path: str | Path, start_byte: int = 0, start_line: int = 1, count: int | None = None
               ) -> Iterator[RawRecord]:
    """Records of a JSONL file (blank lines are not records), starting at a record boundary."""
    with open(path, "rb") as handle:
        if start_byte == 0 and handle.read(len(UTF8_BOM)) == UTF8_BOM:
            start_byte = len(UTF8_BOM)
        handle.seek(start_byte)
        line = start_line - 1
        seen = 0
        for raw in handle:
            line += 1
            if not raw.strip():
                continue
            if count is not None and seen >= count:
                return
            seen += 1
            yield _decode_jsonl_line(raw, line)


def _plan_jsonl(path: Path, records_per_shard: int, digest) -> tuple[list[tuple[int, int, int]], int]:
    """(start_byte, start_line, count) per chunk of records, and the record total."""
    chunks: list[list[int]] = []
    offset = 0
    line = 0
    total = 0
    with open(path, "rb") as handle:
        for raw in handle:
            digest.update(raw)
            line += 1
            start = offset
            offset += len(raw)
            if line == 1 and raw.startswith(UTF8_BOM):
                raw, start = raw[len(UTF8_BOM):], start + len(UTF8_BOM)
            if raw.strip():
                if total % records_per_shard == 0:
                    chunks.append([start, line, 0])
                chunks[-1][2] += 1
                total += 1
    return [tuple(chunk) for chunk in chunks], total


# ---------------------------------------------------------------------------------------------------------
# JSON arrays, streamed
# ---------------------------------------------------------------------------------------------------------
class _JsonArrayStream:
    """Incremental reader of the elements of one top-level JSON array.

    Bytes are decoded with `surrogateescape`, so invalid UTF-8 inside a record survives as lone surrogates
    and is reported for that record only (see `find_non_utf8`), instead of breaking the whole file.
    """

    _CHUNK = 1 << 20
    _MAX_ELEMENT = 256 << 20  # an element this large is treated as a syntax error, not read to EOF

    def __init__(self, path: str | Path, start_byte: int | None, start_line: int) -> None:
        self.at_start = start_byte is None
        self.handle = open(path, "rb")
        if not start_byte and self.handle.read(len(UTF8_BOM)) == UTF8_BOM:
            start_byte = len(UTF8_BOM)  # byte offsets stay those of the file
        self.handle.seek(start_byte or 0)
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.json = json.JSONDecoder()
        self.buf = ""
        self.pos = 0
        self.byte = start_byte or 0  # byte offset of buf[0]
        self.line = start_line  # line number of buf[pos]
        self.eof = False

    def close(self) -> None:
        self.handle.close()

    def _fill(self, size: int) -> bool:
        if self.eof:
            return False
        chunk = self.handle.read(size)
        if not chunk:
            self.eof = True
            self.buf += self.decoder.decode(b"", final=True)
            return False
        self.buf += self.decoder.decode(chunk)
        return True

    def _advance(self, new_pos: int) -> None:
        self.line += self.buf.count("\n", self.pos, new_pos)
        self.pos = new_pos

    def _compact(self) -> None:
        if self.pos > (1 << 20):
            self.byte += len(self.buf[:self.pos].encode("utf-8", "surrogateescape"))
            self.buf = self.buf[self.pos:]
            self.pos = 0

    def _skip_ws(self) -> str:
        """Skip whitespace; returns the next character ('' at EOF) without consuming it."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                if self.buf[self.pos] == "\n":
                    self.line += 1
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            self._compact()
            if not self._fill(self._CHUNK):
                return ""

    def byte_offset(self) -> int:
        return self.byte + len(self.buf[:self.pos].encode("utf-8", "surrogateescape"))

    def elements(self) -> Iterator[tuple[int, int, object]]:
        """Yields (line, byte_offset, value); raises RecordError("malformed_json") at a syntax error."""
        if self.at_start:
            if self._skip_ws() != "[":
                raise RecordError("malformed_json", f"line {self.line}: expected a JSON array")
            self.pos += 1
            if self._skip_ws() == "]":
                return
        while True:
            char = self._skip_ws()
            if char == "":
                raise RecordError("malformed_json", f"line {self.line}: unexpected end of file inside the array")
            line, offset = self.line, self.byte_offset()
            size = self._CHUNK
            while True:
                try:
                    value, end = self.json.raw_decode(self.buf, self.pos)
                    break
                except (RecursionError, ValueError) as error:
                    if not isinstance(error, json.JSONDecodeError):  # not truncation: more bytes will not help
                        raise RecordError("malformed_json", f"line {line}: unreadable JSON: {_unreadable(error)}"
                                          ) from None
                    if self.eof or len(self.buf) - self.pos > self._MAX_ELEMENT or not self._fill(size):
                        error_line = line + self.buf.count("\n", self.pos, error.pos)
                        raise RecordError("malformed_json", f"line {error_line}: malformed JSON: {error.msg}") from None
                    size *= 2
            self._advance(end)
            yield line, offset, value
            char = self._skip_ws()
            if char == ",":
                self.pos += 1
                continue
            if char == "]":
                return
            raise RecordError("malformed_json", f"line {self.line}: expected ',' or ']' after an array element")


def iter_json_array(path: str | Path, start_byte: int | None = None, start_line: int = 1,
                    count: int | None = None, trailing_error: tuple[int, str] | None = None
                    ) -> Iterator[RawRecord]:
    """Records of a JSON array file, starting at an element boundary (or the file start when None)."""
    stream = _JsonArrayStream(path, start_byte, start_line)
    try:
        seen = 0
        if count is None or count > 0:
            try:
                for line, _, value in stream.elements():
                    yield RawRecord(line, value=value)
                    seen += 1
                    if count is not None and seen >= count:
                        break
            except RecordError as error:
                if count is None:
                    yield RawRecord(stream.line, error=error)
                    return
        if trailing_error is not None:
            line, message = trailing_error
            yield RawRecord(line, error=RecordError(
                "malformed_json", f"{message} (the rest of this JSON array cannot be read)"))
    finally:
        stream.close()


def _plan_json(path: Path, records_per_shard: int, digest
               ) -> tuple[list[tuple[int, int, int]], int, tuple[int, str] | None]:
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    chunks: list[list[int]] = []
    total = 0
    stream = _JsonArrayStream(path, None, 1)
    error: tuple[int, str] | None = None
    try:
        for line, offset, _ in stream.elements():
            if total % records_per_shard == 0:
                chunks.append([offset, line, 0])
            chunks[-1][2] += 1
            total += 1
    except RecordError as exc:
        error = (stream.line, exc.message)
    finally:
        stream.close()
    return [tuple(chunk) for chunk in chunks], total, error


def plan_input(path: str, file_index: int, records_per_shard: int, first_shard: int) -> InputPlan:
    """Scan one input file once: its sha256, record count and one ShardTask per `records_per_shard` records."""
    file_path = Path(path)
    if not file_path.is_file():
        if file_path.exists():  # a pipe (`--input <(zcat x.gz)`), a directory, a device
            raise FileNotFoundError(f"--input {path}: not a regular file (inputs are read twice, to plan the shards "
                                    "and to build them: decompress to a file first)")
        raise FileNotFoundError(f"--input {path}: no such file")
    kind = detect_kind(file_path)
    digest = hashlib.sha256()
    error = None
    if kind == "jsonl":
        chunks, total = _plan_jsonl(file_path, records_per_shard, digest)
    else:
        chunks, total, error = _plan_json(file_path, records_per_shard, digest)
    if error is not None and not chunks:
        chunks = [(None, 1, 0)]
    tasks = []
    for index, (start, line, count) in enumerate(chunks):
        is_last = index == len(chunks) - 1
        tasks.append(ShardTask(first_shard + index, file_index, path, kind, start, line, count,
                               error if is_last else None))
    return InputPlan(path, kind, digest.hexdigest(), total + (1 if error else 0), tasks)


def iter_task_records(task: ShardTask) -> Iterator[RawRecord]:
    if task.kind == "jsonl":
        return iter_jsonl(task.path, task.start_byte, task.start_line, task.count)
    return iter_json_array(task.path, task.start_byte, task.start_line, task.count, task.trailing_error)


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------
_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_surrogate(text: str) -> bool:
    # Lone surrogates come from invalid UTF-8 (surrogateescape) or from "\ud800"-style JSON escapes.
    # A regex search (C speed) instead of a per-character generator: this runs on every turn.
    return not text.isascii() and _SURROGATE.search(text) is not None


def parse_record(value: object, line: int) -> Conversation:
    """Validate one decoded record and map LLaVA roles to chat roles.

    Raises:
        RecordError: reasons invalid_record, missing_key, unknown_role, empty_conversation, no_assistant_turn,
            image_count_mismatch, non_utf8.
    """
    if not isinstance(value, dict):
        raise RecordError("invalid_record", f"record is a JSON {type(value).__name__}, not an object")
    if "conversations" not in value:
        raise RecordError("missing_key", "missing key 'conversations'")
    record_id = value.get("id", f"line{line}")
    if not isinstance(record_id, (str, int)):
        raise RecordError("invalid_record", "'id' must be a string or an integer")
    record_id = str(record_id)
    conversations = value["conversations"]
    if not isinstance(conversations, list):
        raise RecordError("invalid_record", "'conversations' must be a list")
    if not conversations:
        raise RecordError("empty_conversation", "empty conversation (no turns)")
    turns: list[Turn] = []
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise RecordError("invalid_record", f"turn {index} is not an object")
        for key in ("from", "value"):
            if key not in turn:
                raise RecordError("missing_key", f"turn {index}: missing key '{key}'")
        role = turn["from"]
        if not isinstance(role, str) or role not in ROLE_MAP:
            raise RecordError("unknown_role", f"turn {index}: unknown role {role!r} "
                              f"(expected one of {sorted(ROLE_MAP)})")
        text = turn["value"]
        if not isinstance(text, str):
            raise RecordError("invalid_record", f"turn {index}: 'value' must be a string")
        if _has_surrogate(text):
            raise RecordError("non_utf8", f"turn {index}: text is not valid UTF-8")
        turns.append(Turn(ROLE_MAP[role], text))
    if all(not turn.content.strip() for turn in turns):
        raise RecordError("empty_conversation", "empty conversation (every turn is blank)")
    if not any(turn.role == "assistant" for turn in turns):
        raise RecordError("no_assistant_turn", "no assistant ('gpt') turn: nothing to learn from")
    images = value.get("image", [])
    if images is None:
        images = []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(item, str) and item for item in images):
        raise RecordError("invalid_record", "'image' must be a path or a list of paths")
    if any(_has_surrogate(item) for item in images):
        raise RecordError("non_utf8", "image path is not valid UTF-8")
    if any("\x00" in item for item in images):
        raise RecordError("invalid_record", "an image path contains a NUL byte")
    tags = sum(turn.content.count(IMAGE_PLACEHOLDER) for turn in turns)
    if tags != len(images):
        raise RecordError("image_count_mismatch",
                          f"{tags} {IMAGE_PLACEHOLDER} tag(s) in the conversation but {len(images)} image(s) listed")
    return Conversation(record_id, turns, images)
