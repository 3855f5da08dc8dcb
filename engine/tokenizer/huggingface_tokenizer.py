"""Hugging Face `tokenizer.json` tokenizers, read with the `tokenizers` library.

BOS/EOS/PAD come from a `tokenizer_config.json` next to the `tokenizer.json`
(its `bos_token` / `eos_token` / `pad_token` entries) when there is one,
otherwise from the first of a list of common special-token names the vocabulary
contains. `transformers` is not needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.tokenizer.base import ChrysalisTokenizer, TokenizerFormatError, read_existing_file

if TYPE_CHECKING:
    import tokenizers

HF_CONFIG_NAME = "tokenizer_config.json"
# Inside a Chrysalis `save` directory our own tokenizer_config.json takes that
# name (SAVED_CONFIG_NAME), so the Hugging Face one is stored under this one.
SAVED_HF_CONFIG_NAME = "hf_tokenizer_config.json"

# Tried in order when no tokenizer_config.json names the token.
COMMON_BOS_TOKENS = ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|startoftext|>")
COMMON_EOS_TOKENS = ("<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|endoftext|>", "<|im_end|>")
COMMON_PAD_TOKENS = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


def _token_text(entry: object) -> str | None:
    """The token string of a tokenizer_config.json entry (a string or an AddedToken dict)."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


class HuggingFaceTokenizer(ChrysalisTokenizer):
    """A `tokenizer.json` plus the image tokens.

    The wrapped tokenizer's special tokens are its added tokens marked
    `special`. Encoding sets the `tokenizers` option `encode_special_tokens`, so
    their strings in user text are split like ordinary text instead of being
    matched. Added tokens that are not marked special are ordinary vocabulary:
    they are matched in text and decode back to the same text.

    Args:
        path: The `tokenizer.json` file.
        config_path: A Hugging Face `tokenizer_config.json` naming BOS/EOS/PAD.
            Defaults to the one next to `path` when it exists.
    """

    kind = "huggingface"

    def __init__(self, path: str | Path, config_path: str | Path | None = None) -> None:
        import tokenizers

        self._path = Path(path)
        content = read_existing_file(self._path, self.kind)
        try:
            tokenizer = tokenizers.Tokenizer.from_str(content.decode("utf-8"))
        except Exception as error:  # the Rust side raises plain Exception subclasses
            raise TokenizerFormatError(
                f"{self._path} is not a Hugging Face tokenizer.json ({error})"
            ) from None
        tokenizer.encode_special_tokens = True
        self._tokenizer: tokenizers.Tokenizer = tokenizer

        if config_path is None:
            config_path = _default_hf_config_path(self._path)
        self._config_path = Path(config_path) if config_path is not None else None
        hf_config: dict[str, Any] = {}
        if self._config_path is not None:
            try:
                hf_config = json.loads(read_existing_file(self._config_path, self.kind))
            except json.JSONDecodeError as error:
                raise TokenizerFormatError(
                    f"{self._config_path} is not valid JSON ({error})"
                ) from None

        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # Ids may have holes; the embedding table must cover the largest one.
        self._base_vocab_size = max(vocab.values()) + 1
        self._special_ids = {
            added.content: token_id
            for token_id, added in tokenizer.get_added_tokens_decoder().items()
            if added.special
        }
        self._bos_id = self._find_token(vocab, hf_config.get("bos_token"), COMMON_BOS_TOKENS)
        eos_id = self._find_token(vocab, hf_config.get("eos_token"), COMMON_EOS_TOKENS)
        if eos_id is None:
            raise TokenizerFormatError(
                f"cannot find an EOS token for {self._path}: put a tokenizer_config.json "
                f"with 'eos_token' next to it, or use one of {list(COMMON_EOS_TOKENS)}"
            )
        self._eos_id = eos_id
        pad_id = self._find_token(vocab, hf_config.get("pad_token"), COMMON_PAD_TOKENS)
        self._pad_id = pad_id if pad_id is not None else eos_id

    def _find_token(
        self, vocab: dict[str, int], configured: object, common_names: tuple[str, ...]
    ) -> int | None:
        """Id of the configured token if given, else of the first common name present."""
        configured_text = _token_text(configured)
        if configured_text is not None:
            if configured_text not in vocab:
                raise TokenizerFormatError(
                    f"{self._config_path} names token {configured_text!r}, which "
                    f"{self._path} does not contain"
                )
            return vocab[configured_text]
        for name in common_names:
            if name in vocab:
                return vocab[name]
        return None

    @property
    def base_vocab_size(self) -> int:
        return self._base_vocab_size

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def files(self) -> tuple[Path, ...]:
        if self._config_path is None:
            return (self._path,)
        return (self._path, self._config_path)

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: no post-processor BOS/EOS; callers add them.
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_continuation_batch(self, texts: list[str]) -> list[list[int]]:
        """`[self.encode_continuation(t) for t in texts]` in one call into the Rust library.

        One call per conversation (or per chunk of conversations) instead of one per piece: the
        per-call overhead, not the BPE, dominates short pieces. `encode_batch_fast` skips the character
        offsets we never read; the ids are those of `encode`. Batch encoding pads when the tokenizer.json
        configures padding, so then we keep the per-text calls.
        """
        if not texts:
            return []
        if self._tokenizer.padding is not None:
            return [self.encode(text) for text in texts]
        batch = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        return [encoding.ids for encoding in batch(texts, add_special_tokens=False)]

    def _decode_base(self, ids: list[int], at_start: bool) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def _base_special_token_id(self, piece: str) -> int | None:
        return self._special_ids.get(piece)

    def _saved_file_names(self) -> list[str]:
        names = [self._path.name]
        if self._config_path is not None:
            names.append(SAVED_HF_CONFIG_NAME)
        return names

    def _extra_saved_config(self) -> dict[str, Any]:
        return {"hf_config_file": SAVED_HF_CONFIG_NAME if self._config_path is not None else None}


def _default_hf_config_path(tokenizer_json: Path) -> Path | None:
    """The Hugging Face tokenizer_config.json that belongs to `tokenizer_json`, if any.

    Normally the tokenizer_config.json next to it. Inside a Chrysalis `save`
    directory that name holds our own config, which points at the renamed copy.
    """
    sibling = tokenizer_json.parent / HF_CONFIG_NAME
    if not sibling.is_file():
        return None
    try:
        config = json.loads(sibling.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return sibling  # not ours; let the caller report the broken JSON
    # HF_CONFIG_NAME == SAVED_CONFIG_NAME, so the file may be ours rather than Hugging Face's.
    is_chrysalis_config = isinstance(config, dict) and "fingerprint" in config and "type" in config
    if not is_chrysalis_config:
        return sibling
    saved_hf_config = config.get("hf_config_file")
    return tokenizer_json.parent / saved_hf_config if saved_hf_config else None
