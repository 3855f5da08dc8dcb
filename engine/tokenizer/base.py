"""The tokenizer interface every Chrysalis component talks to.

A `ChrysalisTokenizer` wraps one text tokenizer (SentencePiece, tiktoken or a
Hugging Face `tokenizer.json`) and appends the two VPiT image tokens after the
wrapped vocabulary:

    ids [0, base_vocab_size)      the wrapped tokenizer's own ids, specials included
    base_vocab_size               <image_start>
    base_vocab_size + 1           <image_end>

The image tokens are appended by this wrapper rather than added into the
underlying tokenizer so that every wrapped id keeps the meaning it has in the
pretrained LLaMA checkpoint: only two new embedding rows are needed, and the
wrapped tokenizer's files are copied into checkpoints byte for byte.
"""

from __future__ import annotations

import abc
import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

IMAGE_START_PIECE = "<image_start>"
IMAGE_END_PIECE = "<image_end>"

# Name of the JSON file `save` writes next to the copied tokenizer files.
SAVED_CONFIG_NAME = "tokenizer_config.json"
# Bumped whenever the meaning of a saved directory or of the fingerprint changes
# (for example a different way of appending the image tokens), so shards made
# under an old convention are refused instead of silently mixed.
SAVED_FORMAT_VERSION = 1


class TokenizerFormatError(ValueError):
    """A tokenizer file exists but is not in the format its kind expects."""


class ChrysalisTokenizer(abc.ABC):
    """A wrapped text tokenizer plus the two appended VPiT image tokens.

    Subclasses provide the wrapped tokenizer's vocabulary size, BOS/EOS/PAD ids,
    plain-text encoding, decoding of wrapped ids and special-token lookup; this
    class adds the image tokens, fingerprinting and saving on top.
    """

    kind: str

    # ------------------------------------------------------------------
    # What a backend must provide.
    # ------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def base_vocab_size(self) -> int:
        """Size of the wrapped tokenizer's vocabulary, its special tokens included."""

    @property
    @abc.abstractmethod
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None when the wrapped tokenizer has none."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int:
        """End-of-sequence id."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """Padding id; equal to `eos_id` when the wrapped tokenizer has no pad token."""

    @property
    @abc.abstractmethod
    def files(self) -> tuple[Path, ...]:
        """The files the wrapped tokenizer was read from, main file first."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Encode plain text: no BOS/EOS, and special-token strings stay text.

        A literal "<|eot_id|>" or "<image_start>" inside `text` is encoded as the
        ordinary characters it is made of, never as the special id, so that user
        text cannot inject control tokens.

        Args:
            text: Any unicode string.

        Returns:
            Ids, all below `base_vocab_size`.
        """

    @abc.abstractmethod
    def _decode_base(self, ids: list[int], at_start: bool) -> str:
        """Decode wrapped ids (all < base_vocab_size); specials render as their text.

        `at_start` is False when the ids continue text decoded before them (after
        an image token), which matters to SentencePiece's leading-space handling.
        """

    @abc.abstractmethod
    def _base_special_token_id(self, piece: str) -> int | None:
        """Id of the wrapped tokenizer's special token `piece`, or None if absent."""

    @abc.abstractmethod
    def _extra_saved_config(self) -> dict[str, Any]:
        """Kind-specific entries `save` adds to tokenizer_config.json."""

    def encode_continuation(self, text: str) -> list[int]:
        """Encode text that directly follows other text of the same sequence.

        Same as `encode` except for SentencePiece, whose `encode` adds a "dummy
        prefix" space meant for the start of a text; chat templates encode their
        pieces separately and use this for every piece after the first, so that
        "User: " followed by "hi" does not become "User:  hi".
        """
        return self.encode(text)

    # ------------------------------------------------------------------
    # The appended image tokens.
    # ------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Wrapped vocabulary plus `<image_start>` and `<image_end>`."""
        return self.base_vocab_size + 2

    @property
    def image_start_id(self) -> int:
        """Id of `<image_start>`; also the placeholder id of image slot positions."""
        return self.base_vocab_size

    @property
    def image_end_id(self) -> int:
        """Id of `<image_end>`."""
        return self.base_vocab_size + 1

    # ------------------------------------------------------------------
    # Shared behaviour.
    # ------------------------------------------------------------------
    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text.

        Our image ids render as the literal strings "<image_start>" and
        "<image_end>"; the wrapped tokenizer's special tokens render as their text.
        Runs of wrapped ids between image ids are decoded separately, so a
        multi-byte character split by an image token does not survive (it cannot
        in a well-formed sequence anyway).

        Args:
            ids: Token ids, each in [0, vocab_size).

        Raises:
            ValueError: if an id is outside [0, vocab_size).
        """
        pieces: list[str] = []
        run: list[int] = []
        for token_id in ids:
            token_id = int(token_id)
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(
                    f"token id {token_id} is outside this {self.kind} tokenizer's "
                    f"vocabulary [0, {self.vocab_size})"
                )
            if token_id < self.base_vocab_size:
                run.append(token_id)
                continue
            if run:
                pieces.append(self._decode_base(run, at_start=not pieces))
                run = []
            pieces.append(IMAGE_START_PIECE if token_id == self.image_start_id else IMAGE_END_PIECE)
        if run:
            pieces.append(self._decode_base(run, at_start=not pieces))
        return "".join(pieces)

    def special_token_id(self, piece: str) -> int:
        """Id of a special token, e.g. "<|eot_id|>".

        Looks up the wrapped tokenizer's special tokens and our two image tokens.

        Args:
            piece: The special token's exact text.

        Raises:
            KeyError: if the tokenizer has no such special token.
        """
        if piece == IMAGE_START_PIECE:
            return self.image_start_id
        if piece == IMAGE_END_PIECE:
            return self.image_end_id
        token_id = self._base_special_token_id(piece)
        if token_id is None:
            raise KeyError(
                f"{self.kind} tokenizer {self.files[0]} has no special token {piece!r}"
            )
        return token_id

    def has_special_token(self, piece: str) -> bool:
        """Whether `special_token_id(piece)` would succeed."""
        try:
            self.special_token_id(piece)
        except KeyError:
            return False
        return True

    def fingerprint(self) -> str:
        """Stable sha256 hex digest of the kind and the tokenizer files' bytes.

        File names are not hashed, so a copy made by `save` has the same
        fingerprint as the original. Shards record this to refuse mixing data
        tokenized by different tokenizers.
        """
        digest = hashlib.sha256()
        digest.update(f"chrysalis-tokenizer-v{SAVED_FORMAT_VERSION}\0{self.kind}\0".encode())
        for path in self.files:
            content = path.read_bytes()
            # Length prefix so that the boundary between files is unambiguous.
            digest.update(len(content).to_bytes(8, "little"))
            digest.update(content)
        return digest.hexdigest()

    def save(self, directory: str | Path) -> Path:
        """Copy the tokenizer files into `directory` and describe them there.

        Writes `tokenizer_config.json` ({"type": kind, "files": [...], ...}) so
        that `load_saved_tokenizer(directory)` rebuilds an identical tokenizer.

        Args:
            directory: Destination; created if missing. Must not be the directory
                the tokenizer was loaded from (the copy would overwrite files there).

        Returns:
            The path of the written tokenizer_config.json.
        """
        directory = Path(directory)
        source_dirs = {path.resolve().parent for path in self.files}
        if directory.exists() and directory.resolve() in source_dirs:
            raise ValueError(
                f"refusing to save the tokenizer into {directory}, the directory it was "
                "loaded from; choose another directory"
            )
        directory.mkdir(parents=True, exist_ok=True)
        saved_names = self._saved_file_names()
        for source, name in zip(self.files, saved_names, strict=True):
            shutil.copyfile(source, directory / name)
        config: dict[str, Any] = {
            "type": self.kind,
            "files": saved_names,
            "format_version": SAVED_FORMAT_VERSION,
            "fingerprint": self.fingerprint(),
            # The ids below are informational (they are recomputed on load) but make
            # a checkpoint's tokenizer readable without loading it.
            "base_vocab_size": self.base_vocab_size,
            "vocab_size": self.vocab_size,
            "image_start_id": self.image_start_id,
            "image_end_id": self.image_end_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            **self._extra_saved_config(),
        }
        config_path = directory / SAVED_CONFIG_NAME
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        return config_path

    def _saved_file_names(self) -> list[str]:
        """Names the tokenizer files get inside a `save` directory."""
        return [path.name for path in self.files]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(file={str(self.files[0])!r}, "
            f"base_vocab_size={self.base_vocab_size}, vocab_size={self.vocab_size})"
        )


def read_existing_file(path: str | Path, kind: str) -> bytes:
    """Read a tokenizer file, with an error naming it when it is missing.

    Args:
        path: The tokenizer file.
        kind: The tokenizer kind, for the error message.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{kind} tokenizer file not found: {path}")
    if not path.is_file():
        raise FileNotFoundError(f"{kind} tokenizer path is not a file: {path}")
    return path.read_bytes()
