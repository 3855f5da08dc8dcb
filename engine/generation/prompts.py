"""Generation inputs: `--prompt`/`--image` or a `--batch-file`, turned into `PromptTokens`.

A batch file is JSONL, one object per line: `{"prompt": str, "images": [paths], "system": str}` (`images` and
`system` optional). Image paths are relative to the batch file's directory unless absolute.

Each image goes where the prompt has a literal `<image>`; a prompt with images and no `<image>` gets them at its
start, one `<image>\\n` each (LLaVA's convention, which the training data follows).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.generation.decode import PromptTokens
from engine.tokenizer import IMAGE_PLACEHOLDER, ChrysalisTokenizer, Turn, encode_generation_prompt


@dataclass
class PromptInput:
    """One request: the user's text, its images (paths) and an optional system message."""

    prompt: str
    images: list[str] = field(default_factory=list)
    system: str | None = None


def read_batch_file(path: str | Path) -> list[PromptInput]:
    """Parses a `--batch-file`; errors name the line."""
    path = Path(path)
    inputs: list[PromptInput] = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):  # -sig: a BOM
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
        except (ValueError, RecursionError) as err:  # valid syntax json refuses: nesting, a huge integer
            what = "nested too deeply" if isinstance(err, RecursionError) else str(err).split(";")[0]
            raise ValueError(f"{where}: not usable JSON ({what})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{where}: expected an object with a string 'prompt'")  # noqa: TRY004 (bad input, not a bug)
        images = record.get("images") or []
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
            raise ValueError(f"{where}: 'images' must be a list of paths")
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"{where}: 'system' must be a string")
        resolved = [str(p if Path(p).is_absolute() else path.parent / p) for p in images]
        inputs.append(PromptInput(record["prompt"], resolved, system))
    if not inputs:
        raise ValueError(f"{path}: no prompts")
    return inputs


def prompt_turns(item: PromptInput) -> list[Turn]:
    """The conversation for one request, with one `<image>` per image."""
    count = item.prompt.count(IMAGE_PLACEHOLDER)
    content = item.prompt
    if count == 0 and item.images:
        content = f"{IMAGE_PLACEHOLDER}\n" * len(item.images) + content
    elif count != len(item.images):
        raise ValueError(f"prompt {item.prompt[:60]!r} has {count} {IMAGE_PLACEHOLDER} tag(s) but "
                         f"{len(item.images)} image(s)")
    turns = [Turn("system", item.system)] if item.system else []
    return turns + [Turn("user", content)]


def encode_prompt(item: PromptInput, tokenizer: ChrysalisTokenizer, template: str, *, seed: int,
                  image_tokens: torch.Tensor | None = None, tokens_per_image: int = 64) -> PromptTokens:
    """Tokenizes one request with the chat template, ending where the assistant's reply begins.

    Args:
        image_tokens: [n, tokens_per_image, vision_dim], the encoded images of `item` in order.
    """
    encoded = encode_generation_prompt(prompt_turns(item), tokenizer, template, tokens_per_image=tokens_per_image)
    return PromptTokens(tokens=encoded.tokens, image_slot_starts=[span.slot_start for span in encoded.images],
                        image_tokens=image_tokens if encoded.images else None, seed=seed)


def encode_images(paths: list[str], encoder) -> torch.Tensor:
    """Image files -> [n, 64, 1152] bf16 through `VisionEncoder.encode_images` (preprocess's own code path)."""
    from engine.vision_encoder import ImageDecodeError

    blobs = []
    for path in paths:
        try:
            blobs.append(Path(path).read_bytes())
        except OSError as err:
            raise FileNotFoundError(f"--image {path}: {err.strerror}") from None
    try:
        return encoder.encode_images(blobs)
    except ImageDecodeError:
        # Find which one, for the message.
        for path, blob in zip(paths, blobs):
            try:
                encoder.encode_images([blob])
            except ImageDecodeError as err:
                raise ValueError(f"--image {path}: {err}") from None
        raise
