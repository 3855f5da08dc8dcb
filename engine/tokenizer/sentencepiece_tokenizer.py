"""SentencePiece tokenizers (a `.model` file, e.g. LLaMA-1/2's `tokenizer.model`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.tokenizer.base import ChrysalisTokenizer, TokenizerFormatError, read_existing_file

if TYPE_CHECKING:
    import sentencepiece


_CONTINUATION_SENTINEL = "\n"
_DECODE_MARKER = "a"


class SentencePieceTokenizer(ChrysalisTokenizer):
    """A SentencePiece model plus the image tokens.

    The wrapped tokenizer's special tokens are its control pieces (`<s>`, `</s>`,
    ...) and its unknown piece. SentencePiece never produces control ids from
    input text, so `encode` is injection-safe as is. User-defined symbols are not
    special: SentencePiece always matches them in text, exactly as it would for
    any other piece, and they decode back to the same text.

    Args:
        path: The `.model` file.
    """

    kind = "sentencepiece"

    def __init__(self, path: str | Path) -> None:
        import sentencepiece

        self._path = Path(path)
        model_bytes = read_existing_file(self._path, self.kind)
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(model_bytes)
        except (RuntimeError, OSError) as error:
            raise TokenizerFormatError(
                f"{self._path} is not a SentencePiece model file ({error})"
            ) from None
        self._processor: sentencepiece.SentencePieceProcessor = processor
        if processor.eos_id() < 0:
            raise TokenizerFormatError(
                f"SentencePiece model {self._path} has no EOS piece; Chrysalis needs one "
                "to end documents"
            )
        self._special_ids: dict[str, int] = {
            processor.id_to_piece(token_id): token_id
            for token_id in range(processor.get_piece_size())
            if processor.is_control(token_id) or processor.is_unknown(token_id)
        }

    @property
    def base_vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def bos_id(self) -> int | None:
        bos = self._processor.bos_id()
        return bos if bos >= 0 else None

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    @property
    def pad_id(self) -> int:
        pad = self._processor.pad_id()
        return pad if pad >= 0 else self.eos_id

    @property
    def files(self) -> tuple[Path, ...]:
        return (self._path,)

    def encode(self, text: str) -> list[int]:
        return list(self._processor.encode(text, out_type=int))

    def encode_continuation(self, text: str) -> list[int]:
        # SentencePiece has no switch for its dummy-prefix space at encode time
        # (editing the model proto would need protobuf), so encode a sentinel
        # newline in front and drop the sentinel's ids. A newline never merges with
        # the following text in byte-fallback vocabularies like LLaMA-2's; where it
        # does (the check below fails) we fall back to the plain encoding.
        sentinel_ids = self.encode(_CONTINUATION_SENTINEL)
        ids = self.encode(_CONTINUATION_SENTINEL + text)
        if ids[: len(sentinel_ids)] != sentinel_ids:
            return self.encode(text)
        return ids[len(sentinel_ids) :]

    def encode_continuation_batch(self, texts: list[str]) -> list[list[int]]:
        """`[self.encode_continuation(t) for t in texts]` with one batched SentencePiece call."""
        if not texts:
            return []
        sentinel_ids = self.encode(_CONTINUATION_SENTINEL)
        size = len(sentinel_ids)
        # num_threads=1: workers already use every core; SentencePiece's pool would only oversubscribe.
        batch = self._processor.encode([_CONTINUATION_SENTINEL + text for text in texts], out_type=int,
                                       num_threads=1)
        return [ids[size:] if ids[:size] == sentinel_ids else self.encode(text) for ids, text in zip(batch, texts)]

    def _decode_base(self, ids: list[int], at_start: bool) -> str:
        # SentencePiece decodes control pieces to "" and unknown to " ⁇ "; we want
        # them visible as their own text, so decode the ordinary runs between them.
        # Special pieces are not text: text right after BOS still starts the text.
        special_ids = set(self._special_ids.values())
        pieces: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id in special_ids:
                if run:
                    pieces.append(self._decode_run(run, at_start))
                    at_start = False
                    run = []
                pieces.append(self._processor.id_to_piece(token_id))
            else:
                run.append(token_id)
        if run:
            pieces.append(self._decode_run(run, at_start))
        return "".join(pieces)

    def _decode_run(self, ids: list[int], at_start: bool) -> str:
        """Decode ordinary ids; keep a leading space unless they start the text.

        SentencePiece drops the space of a leading "▁" because it assumes the
        dummy prefix put it there; that is only true at the start of the text.
        """
        if at_start:
            return self._processor.decode(ids)
        marker_ids = self.encode(_DECODE_MARKER)
        marker_text = self._processor.decode(marker_ids)
        decoded = self._processor.decode(marker_ids + ids)
        if marker_text and decoded.startswith(marker_text):
            return decoded[len(marker_text) :]
        return self._processor.decode(ids)

    def _base_special_token_id(self, piece: str) -> int | None:
        return self._special_ids.get(piece)

    def _extra_saved_config(self) -> dict[str, Any]:
        return {}
