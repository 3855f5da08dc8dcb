"""Tests for the tokenizer wrappers: round-trips, appended image tokens, special
tokens, injection safety, fingerprints, save/load, errors and tiktoken parity.

All tokenizers are tiny ones trained here from a short corpus (nothing downloaded).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.tokenizer import (
    IMAGE_END_PIECE,
    IMAGE_START_PIECE,
    ChrysalisTokenizer,
    TokenizerFormatError,
    build_tokenizer,
    load_saved_tokenizer,
)
from engine.tokenizer.tiktoken_tokenizer import (
    LLAMA3_PATTERN,
    LLAMA3_SPECIAL_TOKENS,
    _split_whitespaces_or_nonwhitespaces,
)
from engine.tokenizer.tiny import (
    build_tiny_tiktoken,
    train_tiny_hf_tokenizer,
    train_tiny_sentencepiece,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_TOKENIZER_DIR = REPO_ROOT / "examples" / "data" / "tokenizer"

CORPUS = [
    "Hello world, this is a tiny corpus for testing the tokenizer wrappers.",
    "The quick brown fox jumps over the lazy dog, again and again and again.",
    "Über café naïve façade — déjà vu. 日本語のテキスト。Ελληνικά. Привет мир!",
    "Numbers 12345 and symbols #@$%^&*() and emoji 🙂🚀 appear here too.",
    "The user asks a question and the assistant answers with an image.",
] * 4

ROUND_TRIP_TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "Über café naïve — 日本語 🙂🚀 ☃ \u00a0nbsp",
    "tabs\tand\nnew\n\nlines\r\n",
    "never seen: ქართული ✓ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "",
]

KINDS = ("sentencepiece", "tiktoken", "huggingface")


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny tokenizer file per kind."""
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "sentencepiece": train_tiny_sentencepiece(CORPUS, root / "sp", vocab_size=400),
        "tiktoken": build_tiny_tiktoken(CORPUS, root / "tt", num_merges=150),
        "huggingface": train_tiny_hf_tokenizer(CORPUS, root / "hf", vocab_size=400),
    }


@pytest.fixture(scope="module")
def tokenizers(tokenizer_files: dict[str, Path]) -> dict[str, ChrysalisTokenizer]:
    return {kind: build_tokenizer(kind, path) for kind, path in tokenizer_files.items()}


def test_import_needs_only_the_standard_library() -> None:
    code = (
        "import sys, engine.tokenizer\n"
        "loaded = [m for m in ('tiktoken', 'sentencepiece', 'tokenizers', 'regex', 'transformers')"
        " if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_encode_decode_round_trip(tokenizers: dict[str, ChrysalisTokenizer], kind: str, text: str) -> None:
    tokenizer = tokenizers[kind]
    ids = tokenizer.encode(text)
    assert all(isinstance(token_id, int) for token_id in ids)
    assert all(0 <= token_id < tokenizer.base_vocab_size for token_id in ids)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("kind", KINDS)
def test_image_tokens_are_appended_after_the_base_vocabulary(
    tokenizers: dict[str, ChrysalisTokenizer], kind: str
) -> None:
    tokenizer = tokenizers[kind]
    assert tokenizer.kind == kind
    assert tokenizer.vocab_size == tokenizer.base_vocab_size + 2
    assert tokenizer.image_start_id == tokenizer.base_vocab_size
    assert tokenizer.image_end_id == tokenizer.base_vocab_size + 1
    assert tokenizer.special_token_id(IMAGE_START_PIECE) == tokenizer.image_start_id
    assert tokenizer.special_token_id(IMAGE_END_PIECE) == tokenizer.image_end_id
    hello = tokenizer.encode("hi")
    decoded = tokenizer.decode(hello + [tokenizer.image_start_id, tokenizer.image_start_id, tokenizer.image_end_id])
    assert decoded == "hi<image_start><image_start><image_end>"
    # The wrapped ids below the image tokens keep their meaning: bos/eos/pad are
    # ordinary wrapped ids, never the appended ones.
    assert tokenizer.eos_id < tokenizer.base_vocab_size
    assert tokenizer.pad_id < tokenizer.base_vocab_size
    with pytest.raises(ValueError, match="outside"):
        tokenizer.decode([tokenizer.vocab_size])


def test_tiktoken_special_tokens_follow_metas_llama3_order(tokenizers: dict[str, ChrysalisTokenizer]) -> None:
    tokenizer = tokenizers["tiktoken"]
    num_ranks = tokenizer.num_bpe_ranks
    assert len(LLAMA3_SPECIAL_TOKENS) == 256
    assert len(set(LLAMA3_SPECIAL_TOKENS)) == 256
    assert tokenizer.base_vocab_size == num_ranks + 256
    # Offsets from the first special token, as in the real LLaMA-3 (128000 + offset).
    expected_offsets = {
        "<|begin_of_text|>": 0,
        "<|end_of_text|>": 1,
        "<|reserved_special_token_0|>": 2,
        "<|reserved_special_token_3|>": 5,
        "<|start_header_id|>": 6,
        "<|end_header_id|>": 7,
        "<|reserved_special_token_4|>": 8,
        "<|eot_id|>": 9,
        "<|reserved_special_token_5|>": 10,
        "<|reserved_special_token_250|>": 255,
    }
    for piece, offset in expected_offsets.items():
        assert tokenizer.special_token_id(piece) == num_ranks + offset, piece
    assert tokenizer.bos_id == num_ranks
    assert tokenizer.eos_id == num_ranks + 1
    assert tokenizer.pad_id == tokenizer.eos_id
    assert tokenizer.decode([num_ranks + 9, num_ranks + 6]) == "<|eot_id|><|start_header_id|>"


def test_sentencepiece_and_huggingface_specials(tokenizers: dict[str, ChrysalisTokenizer]) -> None:
    sentencepiece = tokenizers["sentencepiece"]
    assert (sentencepiece.bos_id, sentencepiece.eos_id) == (1, 2)
    assert sentencepiece.pad_id == 2  # no pad piece: falls back to EOS
    assert sentencepiece.special_token_id("<s>") == 1
    assert sentencepiece.special_token_id("</s>") == 2
    assert sentencepiece.decode([1] + sentencepiece.encode("hi") + [2]) == "<s>hi</s>"

    huggingface = tokenizers["huggingface"]
    assert huggingface.bos_id == huggingface.special_token_id("<|begin_of_text|>")
    assert huggingface.eos_id == huggingface.special_token_id("<|end_of_text|>")
    assert huggingface.decode([huggingface.special_token_id("<|eot_id|>")]) == "<|eot_id|>"


@pytest.mark.parametrize("kind", KINDS)
def test_missing_special_token_raises_key_error(tokenizers: dict[str, ChrysalisTokenizer], kind: str) -> None:
    with pytest.raises(KeyError, match="no special token '<\\|not_a_token\\|>'"):
        tokenizers[kind].special_token_id("<|not_a_token|>")
    assert not tokenizers[kind].has_special_token("<|not_a_token|>")


@pytest.mark.parametrize("kind", KINDS)
def test_special_token_strings_in_user_text_stay_text(
    tokenizers: dict[str, ChrysalisTokenizer], kind: str
) -> None:
    tokenizer = tokenizers[kind]
    pieces = {
        "sentencepiece": ["<s>", "</s>", "<unk>"],
        "tiktoken": ["<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>"],
        "huggingface": ["<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>"],
    }[kind]
    forbidden = {tokenizer.special_token_id(piece) for piece in pieces}
    forbidden |= {tokenizer.image_start_id, tokenizer.image_end_id}
    text = "user says " + " ".join(pieces) + " <image_start> x <image_end> <image>"
    ids = tokenizer.encode(text)
    assert not forbidden & set(ids)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("kind", KINDS)
def test_fingerprint_is_stable_and_tracks_file_bytes(
    tokenizer_files: dict[str, Path], tokenizers: dict[str, ChrysalisTokenizer], kind: str, tmp_path: Path
) -> None:
    tokenizer = tokenizers[kind]
    fingerprint = tokenizer.fingerprint()
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    assert build_tokenizer(kind, tokenizer_files[kind]).fingerprint() == fingerprint
    others = {other.fingerprint() for other_kind, other in tokenizers.items() if other_kind != kind}
    assert fingerprint not in others
    # The same corpus with a different size gives a different file, so a different fingerprint.
    if kind == "tiktoken":
        smaller = build_tiny_tiktoken(CORPUS, tmp_path, num_merges=20)
    elif kind == "sentencepiece":
        smaller = train_tiny_sentencepiece(CORPUS, tmp_path, vocab_size=350)
    else:
        smaller = train_tiny_hf_tokenizer(CORPUS, tmp_path, vocab_size=300)
    assert build_tokenizer(kind, smaller).fingerprint() != fingerprint


def test_fingerprint_covers_the_kind(tokenizer_files: dict[str, Path]) -> None:
    # No file loads as two different kinds, so change the kind on an instance to
    # check that it enters the hash along with the file bytes.
    tokenizer = build_tokenizer("tiktoken", tokenizer_files["tiktoken"])
    fingerprint = tokenizer.fingerprint()
    tokenizer.kind = "renamed"  # instance attribute shadows the class attribute
    assert tokenizer.fingerprint() != fingerprint


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_rebuild_an_identical_tokenizer(
    tokenizers: dict[str, ChrysalisTokenizer], kind: str, tmp_path: Path
) -> None:
    tokenizer = tokenizers[kind]
    config_path = tokenizer.save(tmp_path / "saved")
    config = json.loads(config_path.read_text())
    assert config["type"] == kind
    assert config["fingerprint"] == tokenizer.fingerprint()
    assert config["image_start_id"] == tokenizer.image_start_id
    for name in config["files"]:
        assert (tmp_path / "saved" / name).is_file()

    loaded = load_saved_tokenizer(tmp_path / "saved")
    assert type(loaded) is type(tokenizer)
    assert loaded.fingerprint() == tokenizer.fingerprint()
    assert (loaded.base_vocab_size, loaded.bos_id, loaded.eos_id, loaded.pad_id) == (
        tokenizer.base_vocab_size,
        tokenizer.bos_id,
        tokenizer.eos_id,
        tokenizer.pad_id,
    )
    text = ROUND_TRIP_TEXTS[2]
    assert loaded.encode(text) == tokenizer.encode(text)

    # Pointing build_tokenizer at the saved directory also works (our own
    # tokenizer_config.json there must not be mistaken for Hugging Face's).
    rebuilt = build_tokenizer(kind, tmp_path / "saved")
    assert rebuilt.fingerprint() == tokenizer.fingerprint()
    assert rebuilt.eos_id == tokenizer.eos_id


def test_huggingface_save_keeps_its_own_config(tokenizers: dict[str, ChrysalisTokenizer], tmp_path: Path) -> None:
    tokenizer = tokenizers["huggingface"]
    assert len(tokenizer.files) == 2  # tokenizer.json and the tokenizer_config.json next to it
    tokenizer.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["files"] == ["tokenizer.json", "hf_tokenizer_config.json"]
    hf_config = json.loads((tmp_path / "hf_tokenizer_config.json").read_text())
    assert hf_config["eos_token"] == "<|end_of_text|>"


def test_load_refuses_changed_files(tokenizers: dict[str, ChrysalisTokenizer], tmp_path: Path) -> None:
    tokenizers["tiktoken"].save(tmp_path)
    model = tmp_path / "tokenizer.model"
    lines = model.read_text().splitlines()
    # Swap two ranks: still a valid file, but a different tokenizer.
    first, second = lines[300].split()[0], lines[301].split()[0]
    lines[300], lines[301] = f"{second} 300", f"{first} 301"
    model.write_text("\n".join(lines) + "\n")
    with pytest.raises(TokenizerFormatError, match="do not match the fingerprint"):
        load_saved_tokenizer(tmp_path)


@pytest.mark.parametrize("escape", ["../outside.model", "/etc/passwd", "sub/../../outside.model"])
def test_load_refuses_files_outside_the_directory(tokenizers: dict[str, ChrysalisTokenizer], tmp_path: Path,
                                                  escape: str) -> None:
    saved = tmp_path / "saved"
    tokenizers["tiktoken"].save(saved)
    # A real tokenizer file outside the folder: without the check it would load (and the fingerprint may pass).
    (tmp_path / "outside.model").write_bytes((saved / "tokenizer.model").read_bytes())
    config_path = saved / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["files"] = [escape]
    config_path.write_text(json.dumps(config))
    with pytest.raises(TokenizerFormatError, match="outside"):
        load_saved_tokenizer(saved)


def test_save_refuses_the_source_directory(tokenizer_files: dict[str, Path]) -> None:
    tokenizer = build_tokenizer("huggingface", tokenizer_files["huggingface"])
    with pytest.raises(ValueError, match="directory it was loaded from"):
        tokenizer.save(tokenizer_files["huggingface"].parent)


def test_load_saved_tokenizer_without_config_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer_config.json")):
        load_saved_tokenizer(tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_file_error_names_the_path(kind: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.bin"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_tokenizer(kind, missing)


@pytest.mark.parametrize("kind", KINDS)
def test_garbled_file_error_names_the_path(kind: str, tmp_path: Path) -> None:
    garbled = tmp_path / "garbled.bin"
    garbled.write_bytes(b"\x00\x01this is not a tokenizer at all\n\xff\xfe")
    with pytest.raises(TokenizerFormatError, match=str(garbled)):
        build_tokenizer(kind, garbled)


def test_tiktoken_file_checks(tmp_path: Path) -> None:
    single_bytes = [f"{base64.b64encode(bytes([value])).decode()} {value}" for value in range(256)]
    gap = tmp_path / "gap.model"
    gap.write_text("\n".join(single_bytes + [f"{base64.b64encode(b'ab').decode()} 300"]) + "\n")
    with pytest.raises(TokenizerFormatError, match="without gaps"):
        build_tokenizer("tiktoken", gap)
    missing_byte = tmp_path / "missing_byte.model"
    missing_byte.write_text("\n".join(single_bytes[1:] + [f"{base64.b64encode(b'ab').decode()} 0"]) + "\n")
    with pytest.raises(TokenizerFormatError, match="single-byte"):
        build_tokenizer("tiktoken", missing_byte)
    bad_base64 = tmp_path / "bad.model"
    bad_base64.write_text("\n".join(single_bytes + ["@@@ 256"]) + "\n")
    with pytest.raises(TokenizerFormatError, match="line 257"):
        build_tokenizer("tiktoken", bad_base64)


def test_huggingface_without_config_uses_common_names(tokenizer_files: dict[str, Path], tmp_path: Path) -> None:
    lonely = tmp_path / "tokenizer.json"
    lonely.write_bytes(tokenizer_files["huggingface"].read_bytes())
    tokenizer = build_tokenizer("huggingface", lonely)
    assert tokenizer.files == (lonely,)
    assert tokenizer.bos_id == tokenizer.special_token_id("<|begin_of_text|>")
    assert tokenizer.eos_id == tokenizer.special_token_id("<|end_of_text|>")
    # A config naming another EOS wins over the common names.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|eot_id|>"}}))
    configured = build_tokenizer("huggingface", lonely)
    assert configured.eos_id == configured.special_token_id("<|eot_id|>")
    assert configured.fingerprint() != tokenizer.fingerprint()


def test_unknown_tokenizer_type() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer type 'gpt2'"):
        build_tokenizer("gpt2", "x")


def test_sentencepiece_continuation_has_no_dummy_prefix(tokenizers: dict[str, ChrysalisTokenizer]) -> None:
    tokenizer = tokenizers["sentencepiece"]
    ids = tokenizer.encode("User: ") + tokenizer.encode_continuation("hello world")
    assert tokenizer.decode(ids) == "User: hello world"
    # A run after an image token keeps its leading space.
    ids = tokenizer.encode("a") + [tokenizer.image_end_id] + tokenizer.encode_continuation(" b")
    assert tokenizer.decode(ids) == "a<image_end> b"


@pytest.mark.parametrize("use_demo_file", [False, True])
def test_tiktoken_ids_match_tiktoken_encoding_built_directly(
    tokenizer_files: dict[str, Path], use_demo_file: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    # load_tiktoken_bpe caches local files by path; an empty cache dir disables that.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    path = DEMO_TOKENIZER_DIR / "tokenizer.model" if use_demo_file else tokenizer_files["tiktoken"]
    ranks = load_tiktoken_bpe(str(path))
    reference = tiktoken.Encoding(
        name="reference",
        pat_str=LLAMA3_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={piece: len(ranks) + index for index, piece in enumerate(LLAMA3_SPECIAL_TOKENS)},
    )
    ours = build_tokenizer("tiktoken", path)
    texts = ROUND_TRIP_TEXTS + CORPUS[:5] + ["The butterfly <|eot_id|> image " * 20, " " * 1000 + "x"]
    for text in texts:
        assert ours.encode(text) == reference.encode(text, disallowed_special=()), text
    specials = [len(ranks) + 9, len(ranks)]
    assert ours.decode(specials) == reference.decode(specials)
    assert reference.encode("<|eot_id|>", allowed_special="all") == [ours.special_token_id("<|eot_id|>")]


def test_long_runs_are_split_like_meta() -> None:
    text = "a" * 7 + " " * 5 + "bc"
    pieces = list(_split_whitespaces_or_nonwhitespaces(text, max_run=3))
    assert "".join(pieces) == text
    assert pieces == ["aaa", "aaa", "a   ", "  bc"]
    assert list(_split_whitespaces_or_nonwhitespaces("", max_run=3)) == [""]


def test_bundled_demo_tokenizer_is_reproducible_and_small(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_tokenizer", DEMO_TOKENIZER_DIR / "make_tokenizer.py")
    assert spec is not None and spec.loader is not None
    make_tokenizer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tokenizer)
    rebuilt = build_tiny_tiktoken(make_tokenizer.DEMO_CORPUS, tmp_path, num_merges=make_tokenizer.NUM_MERGES)
    committed = DEMO_TOKENIZER_DIR / "tokenizer.model"
    assert rebuilt.read_bytes() == committed.read_bytes()
    assert committed.stat().st_size < 50_000
    tokenizer = build_tokenizer("tiktoken", DEMO_TOKENIZER_DIR)
    assert tokenizer.num_bpe_ranks > 256 + 200  # a few hundred merges
    assert tokenizer.has_special_token("<|eot_id|>")
    # The merges compress its own kind of text well below one token per byte.
    sentence = "The assistant looks at the image of the butterfly."
    assert len(tokenizer.encode(sentence)) < len(sentence.encode()) / 3
