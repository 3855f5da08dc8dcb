"""Tiny tokenizers trained from a small corpus, for tests and the demo.

Nothing is downloaded: each builder trains in well under a second on a few
kilobytes of text and writes files in the same formats as the real LLaMA
tokenizers, so every code path of the wrappers is exercised.
"""

from __future__ import annotations

import base64
import collections
import json
from collections.abc import Sequence
from pathlib import Path

# The special tokens the tiny Hugging Face tokenizer gets, so that both chat
# templates work with it.
TINY_HF_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)


def train_tiny_sentencepiece(
    corpus: Sequence[str], out_dir: str | Path, vocab_size: int = 400
) -> Path:
    """Train a small LLaMA-2-style SentencePiece BPE model.

    Uses LLaMA-2's settings that matter for round-trips: byte fallback, identity
    normalization, whitespace kept, `<unk>`=0, `<s>`=1, `</s>`=2, no pad piece.

    Args:
        corpus: Training sentences.
        out_dir: Directory for `tokenizer.model` (created if missing).
        vocab_size: Target vocabulary; it must cover the 259 byte/meta pieces plus
            every distinct character of the corpus. SentencePiece may stop short of
            it on a tiny corpus (`hard_vocab_limit=False`).

    Returns:
        The path of the written `tokenizer.model`.
    """
    import io

    import sentencepiece

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,  # one thread keeps the trained model byte-identical across runs
        minloglevel=2,
    )
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def learn_byte_bpe_merges(corpus: Sequence[str], num_merges: int) -> list[bytes]:
    """Learn byte-level BPE tokens from `corpus`, in merge order.

    A textbook BPE over the words produced by LLaMA-3's pre-tokenization pattern.
    Written by hand because neither tiktoken nor any installed library trains a
    tiktoken-format ranks file; at this size the quadratic recount is instant.

    Args:
        corpus: Training text.
        num_merges: Upper bound on the number of new tokens.

    Returns:
        The new multi-byte tokens, first-learned first (fewer if the corpus runs
        out of pairs).
    """
    import regex

    from engine.tokenizer.tiktoken_tokenizer import LLAMA3_PATTERN

    pattern = regex.compile(LLAMA3_PATTERN)
    word_counts: collections.Counter[tuple[bytes, ...]] = collections.Counter()
    for text in corpus:
        for word in pattern.findall(text):
            encoded = word.encode("utf-8")
            word_counts[tuple(bytes([value]) for value in encoded)] += 1

    known_tokens: set[bytes] = {bytes([value]) for value in range(256)}
    new_tokens: list[bytes] = []
    words = dict(word_counts)
    while len(new_tokens) < num_merges:
        pair_counts: collections.Counter[tuple[bytes, bytes]] = collections.Counter()
        for word, count in words.items():
            for left, right in zip(word, word[1:]):
                pair_counts[(left, right)] += count
        if not pair_counts:
            break
        # Ties broken by the pair's bytes so the result does not depend on dict order.
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merged = best[0] + best[1]
        words = {_merge_pair(word, best, merged): count for word, count in words.items()}
        # Different pairs can spell the same bytes ("a"+"bc", "ab"+"c"); a ranks file
        # holds each byte string once, and the earlier rank already covers it.
        if merged not in known_tokens:
            known_tokens.add(merged)
            new_tokens.append(merged)
    return new_tokens


def _merge_pair(
    word: tuple[bytes, ...], pair: tuple[bytes, bytes], merged: bytes
) -> tuple[bytes, ...]:
    """Replace every non-overlapping occurrence of `pair` in `word` by `merged`."""
    result: list[bytes] = []
    index = 0
    while index < len(word):
        if index + 1 < len(word) and (word[index], word[index + 1]) == pair:
            result.append(merged)
            index += 2
        else:
            result.append(word[index])
            index += 1
    return tuple(result)


def build_tiny_tiktoken(corpus: Sequence[str], out_dir: str | Path, num_merges: int = 300) -> Path:
    """Write a LLaMA-3-format BPE ranks file learned from `corpus`.

    Ranks 0..255 are the single bytes in byte order, then the learned merges.
    Loaded with the tiktoken wrapper, the 256 LLaMA-3 special tokens follow.

    Args:
        corpus: Training text.
        out_dir: Directory for `tokenizer.model` (created if missing).
        num_merges: Number of merges to learn (fewer if the corpus runs out).

    Returns:
        The path of the written `tokenizer.model`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = [bytes([value]) for value in range(256)] + learn_byte_bpe_merges(corpus, num_merges)
    lines = [f"{base64.b64encode(token).decode('ascii')} {rank}" for rank, token in enumerate(tokens)]
    path = out_dir / "tokenizer.model"
    path.write_text("\n".join(lines) + "\n")
    return path


def train_tiny_hf_tokenizer(corpus: Sequence[str], out_dir: str | Path, vocab_size: int = 400) -> Path:
    """Train a byte-level BPE `tokenizer.json` plus a `tokenizer_config.json`.

    The vocabulary starts with the special tokens in `TINY_HF_SPECIAL_TOKENS`
    (ids 0..4), so both chat templates work; the config names
    `<|begin_of_text|>` as BOS and `<|end_of_text|>` as EOS.

    Args:
        corpus: Training text.
        out_dir: Directory for the two files (created if missing).
        vocab_size: Target vocabulary, at least 256 + the special tokens; the
            trainer stops early on a tiny corpus.

    Returns:
        The path of the written `tokenizer.json`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_HF_SPECIAL_TOKENS),
        # All 256 byte symbols, so any text round-trips even if the corpus lacks them.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    path = out_dir / "tokenizer.json"
    tokenizer.save(str(path))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path
