"""Building a `ChrysalisTokenizer` from a path, and reloading a saved one."""

from __future__ import annotations

import json
from pathlib import Path

from engine.tokenizer.base import (
    SAVED_CONFIG_NAME,
    SAVED_FORMAT_VERSION,
    ChrysalisTokenizer,
    TokenizerFormatError,
)

TOKENIZER_TYPES = ("sentencepiece", "tiktoken", "huggingface")

# The file looked for when `build_tokenizer` is given a directory.
_DEFAULT_FILE_NAMES = {
    "sentencepiece": "tokenizer.model",
    "tiktoken": "tokenizer.model",
    "huggingface": "tokenizer.json",
}


def build_tokenizer(tokenizer_type: str, path: str | Path) -> ChrysalisTokenizer:
    """Wrap a tokenizer file of the given kind.

    Args:
        tokenizer_type: "sentencepiece" (a `.model` file), "tiktoken" (LLaMA-3's
            `tokenizer.model` BPE ranks) or "huggingface" (a `tokenizer.json`).
        path: The tokenizer file, or a directory holding it under its usual name
            (`tokenizer.model` / `tokenizer.json`).

    Raises:
        ValueError: for an unknown `tokenizer_type`.
        FileNotFoundError: if the file does not exist (the message names it).
        TokenizerFormatError: if the file is not in the expected format.
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(
            f"unknown tokenizer type {tokenizer_type!r}; expected one of {list(TOKENIZER_TYPES)}"
        )
    path = Path(path)
    if path.is_dir():
        path = path / _DEFAULT_FILE_NAMES[tokenizer_type]
    # Imported here so `import engine.tokenizer` needs only the standard library.
    if tokenizer_type == "sentencepiece":
        from engine.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer(path)
    if tokenizer_type == "tiktoken":
        from engine.tokenizer.tiktoken_tokenizer import TiktokenTokenizer

        return TiktokenTokenizer(path)
    from engine.tokenizer.huggingface_tokenizer import HuggingFaceTokenizer

    return HuggingFaceTokenizer(path)


def load_saved_tokenizer(directory: str | Path) -> ChrysalisTokenizer:
    """Rebuild the tokenizer that `ChrysalisTokenizer.save` wrote into `directory`.

    Args:
        directory: A directory holding `tokenizer_config.json` and the copied files.

    Raises:
        FileNotFoundError: if the directory has no tokenizer_config.json.
        TokenizerFormatError: if the config is not ours, or the rebuilt tokenizer's
            fingerprint differs from the recorded one (files changed after saving).
    """
    directory = Path(directory)
    config_path = directory / SAVED_CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no saved tokenizer in {directory}: {config_path} is missing")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerFormatError(f"{config_path} is not valid JSON ({error})") from None
    except (ValueError, RecursionError) as error:  # valid syntax json refuses: nesting, a huge integer
        raise TokenizerFormatError(f"{config_path} is not usable JSON ({type(error).__name__})") from None
    if not isinstance(config, dict) or "type" not in config or "files" not in config:
        raise TokenizerFormatError(
            f"{config_path} was not written by ChrysalisTokenizer.save (no 'type'/'files')"
        )
    if config.get("format_version") != SAVED_FORMAT_VERSION:
        raise TokenizerFormatError(
            f"{config_path} has format_version {config.get('format_version')!r}; this "
            f"code reads version {SAVED_FORMAT_VERSION}"
        )
    tokenizer_type = config["type"]
    files = [_file_inside(directory, name, config_path) for name in config["files"]]
    if tokenizer_type == "huggingface":
        from engine.tokenizer.huggingface_tokenizer import HuggingFaceTokenizer

        tokenizer: ChrysalisTokenizer = HuggingFaceTokenizer(
            files[0], config_path=files[1] if len(files) > 1 else None
        )
    else:
        tokenizer = build_tokenizer(tokenizer_type, files[0])
    recorded = config.get("fingerprint")
    if recorded is not None and recorded != tokenizer.fingerprint():
        raise TokenizerFormatError(
            f"the tokenizer files in {directory} do not match the fingerprint recorded in "
            f"{config_path}; they were changed after saving"
        )
    return tokenizer


def _file_inside(directory: Path, name: object, config_path: Path) -> Path:
    """`directory / name`, refusing names that leave the directory (absolute paths, `..`, links out)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise TokenizerFormatError(f"{config_path}: 'files' holds {name!r}, not a file name")
    path = directory / name
    root = directory.resolve()
    if Path(name).is_absolute() or not path.resolve().is_relative_to(root):
        raise TokenizerFormatError(f"{config_path}: tokenizer file {name!r} is outside {directory}")
    return path
