"""LLaMA-3 style tiktoken tokenizers (Meta's `tokenizer.model` BPE-ranks format).

The file holds one `base64(token_bytes) rank` line per BPE token. As in Meta's
llama3 `tokenizer.py`, the 256 LLaMA-3 special tokens are appended right after
the BPE ranks, so for the real LLaMA-3 file `<|begin_of_text|>` is 128000 and
`<|eot_id|>` is 128009; for a tiny file with N ranks they start at N.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.tokenizer.base import ChrysalisTokenizer, TokenizerFormatError, read_existing_file

if TYPE_CHECKING:
    import tiktoken

# Meta's LLaMA-3 pre-tokenization pattern (the same as OpenAI's cl100k_base).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

LLAMA3_NUM_RESERVED_SPECIAL_TOKENS = 256
# Meta's exact order: ten named/reserved tokens, then reserved 5..250, 256 in all.
LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
) + tuple(
    f"<|reserved_special_token_{i}|>" for i in range(5, LLAMA3_NUM_RESERVED_SPECIAL_TOKENS - 5)
)

# Meta splits long inputs before handing them to tiktoken, whose regex backtracking
# gets very slow (and can overflow the stack) on huge strings and on very long runs
# of whitespace or non-whitespace. We reproduce the split so ids match Meta's.
_MAX_ENCODE_CHARS = 400_000
_MAX_NO_WHITESPACE_CHARS = 25_000


def parse_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE-ranks file into {token_bytes: rank}.

    We parse it ourselves rather than call `tiktoken.load.load_tiktoken_bpe`:
    that function caches local files by path in a temp directory, so a changed
    file at the same path could silently load stale ranks, and its errors do not
    say what is wrong with the file.

    Args:
        path: The `tokenizer.model` file.

    Raises:
        FileNotFoundError: if the file does not exist.
        TokenizerFormatError: if a line is not `base64 rank`, ranks are not
            0..N-1 without gaps or repeats, or a single byte is missing.
    """
    path = Path(path)
    content = read_existing_file(path, "tiktoken")
    ranks: dict[bytes, int] = {}
    for line_number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError("expected two fields")
            token = base64.b64decode(fields[0], validate=True)
            rank = int(fields[1])
        except (ValueError, binascii.Error) as error:
            shown = line[:60].decode("utf-8", errors="replace")
            raise TokenizerFormatError(
                f"{path} is not a tiktoken BPE file: line {line_number} ({shown!r}) is not "
                f"'<base64 token> <rank>' ({error})"
            ) from None
        if token in ranks:
            raise TokenizerFormatError(f"{path}: token {token!r} appears twice (line {line_number})")
        ranks[token] = rank
    if not ranks:
        raise TokenizerFormatError(f"{path} is not a tiktoken BPE file: it has no token lines")
    # Special tokens are numbered from len(ranks), so ranks must be exactly 0..N-1.
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerFormatError(
            f"{path}: ranks must be 0..{len(ranks) - 1} without gaps or repeats"
        )
    missing_bytes = [value for value in range(256) if bytes([value]) not in ranks]
    if missing_bytes:
        raise TokenizerFormatError(
            f"{path}: byte-level BPE needs all 256 single-byte tokens; "
            f"{len(missing_bytes)} are missing (first: {missing_bytes[0]})"
        )
    return ranks


def _split_whitespaces_or_nonwhitespaces(text: str, max_run: int) -> Iterator[str]:
    """Split `text` so no piece has more than `max_run` consecutive (non-)spaces.

    Follows Meta's llama3 tokenizer so encodings of pathological inputs agree.
    """
    current_run = 0
    current_is_space = text[0].isspace() if text else False
    piece_start = 0
    for index, char in enumerate(text):
        is_space = char.isspace()
        if current_is_space ^ is_space:
            current_run = 1
            current_is_space = is_space
        else:
            current_run += 1
            if current_run > max_run:
                yield text[piece_start:index]
                piece_start = index
                current_run = 1
    yield text[piece_start:]


class TiktokenTokenizer(ChrysalisTokenizer):
    """A LLaMA-3 `tokenizer.model` read with tiktoken, plus the image tokens.

    Args:
        path: The BPE-ranks file.
    """

    kind = "tiktoken"

    def __init__(self, path: str | Path) -> None:
        import tiktoken

        self._path = Path(path)
        ranks = parse_tiktoken_ranks(self._path)
        self._num_ranks = len(ranks)
        self._special_ids = {
            piece: self._num_ranks + index for index, piece in enumerate(LLAMA3_SPECIAL_TOKENS)
        }
        self._encoding: tiktoken.Encoding = tiktoken.Encoding(
            name=self._path.name,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self._special_ids,
        )

    @property
    def base_vocab_size(self) -> int:
        return self._num_ranks + len(LLAMA3_SPECIAL_TOKENS)

    @property
    def bos_id(self) -> int:
        return self._special_ids["<|begin_of_text|>"]

    @property
    def eos_id(self) -> int:
        return self._special_ids["<|end_of_text|>"]

    @property
    def pad_id(self) -> int:
        # LLaMA-3 has no pad token (Meta uses -1); padding positions are masked
        # out of the loss anyway, so EOS is a safe in-vocabulary filler.
        return self.eos_id

    @property
    def files(self) -> tuple[Path, ...]:
        return (self._path,)

    @property
    def num_bpe_ranks(self) -> int:
        """Number of BPE tokens in the file (the first special token's id)."""
        return self._num_ranks

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for start in range(0, len(text), _MAX_ENCODE_CHARS):
            chunk = text[start : start + _MAX_ENCODE_CHARS]
            for piece in _split_whitespaces_or_nonwhitespaces(chunk, _MAX_NO_WHITESPACE_CHARS):
                # encode_ordinary treats special-token strings as plain text.
                ids.extend(self._encoding.encode_ordinary(piece))
        return ids

    def encode_continuation_batch(self, texts: list[str]) -> list[list[int]]:
        """`[self.encode_continuation(t) for t in texts]`, without the splitting loop for short texts.

        A text of at most `_MAX_NO_WHITESPACE_CHARS` characters is never split by `encode`, so it goes to
        tiktoken directly. We do not use `encode_ordinary_batch`: it starts a thread pool per call, which
        costs more than it saves on conversation-sized pieces (and workers already use every core).
        """
        encode_ordinary = self._encoding.encode_ordinary
        return [encode_ordinary(text) if len(text) <= _MAX_NO_WHITESPACE_CHARS else self.encode(text)
                for text in texts]

    def _decode_base(self, ids: list[int], at_start: bool) -> str:
        return self._encoding.decode(ids)

    def _base_special_token_id(self, piece: str) -> int | None:
        return self._special_ids.get(piece)

    def _extra_saved_config(self) -> dict[str, Any]:
        return {"pattern": "llama3", "special_tokens": "llama3", "num_bpe_ranks": self._num_ranks}
