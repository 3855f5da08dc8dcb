"""What `--load` needs to give generation: the model, its tokenizer, its chat template and its vision encoder.

Two kinds of checkpoint are accepted:
- a model-only checkpoint (`engine.checkpoint_io`: `config.json` + `model.safetensors`, as written by
  `engine.convert` and `python -m engine.training.export`), with a `tokenizer/` copy and, when exported from
  training, a `vision_encoder` reference in `config.json`;
- a training `--save` directory or one `iter_*` directory of it (`engine.training.export.load_for_generation`),
  whose completion record holds the shards' vision-encoder reference and paths of the builds it trained on.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.tokenizer import ChrysalisTokenizer, load_saved_tokenizer


@dataclass
class LoadedCheckpoint:
    """A checkpoint ready for generation.

    Args:
        kind: "model" (model-only checkpoint) or "training".
        vision_encoder: the encoder reference recorded by preprocess (`manifest.json`'s `vision_encoder`), or None.
        chat_template: the template the training data was built with, when the checkpoint says so.
    """

    model: torch.nn.Module
    tokenizer: ChrysalisTokenizer
    kind: str
    path: Path
    vision_encoder: dict[str, Any] | None
    chat_template: str | None


def _is_model_checkpoint(path: Path) -> bool:
    from engine.training.checkpoint import holds_training_checkpoints

    config = path / "config.json"
    if not config.is_file() or holds_training_checkpoints(path):  # --load M --save M: the trained weights win
        return False
    try:
        data = json.loads(config.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deeply
        return True  # engine.checkpoint_io names the file and what is wrong with it
    return isinstance(data, dict) and data.get("format") == "chrysalis-model"


def _saved_fingerprint(directory: Path) -> str | None:
    """The fingerprint recorded in a checkpoint's tokenizer copy (tokenizer/tokenizer_config.json), if any."""
    try:
        data = json.loads((directory / "tokenizer" / "tokenizer_config.json").read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data.get("fingerprint") if isinstance(data, dict) and isinstance(data.get("fingerprint"), str) else None


def check_tokenizer_fingerprint(tokenizer: ChrysalisTokenizer, expected: str | None, source: str,
                                load: str | Path) -> None:
    """`--tokenizer` must be the tokenizer the checkpoint was trained with: the same fingerprint (files, type and
    image tokens), else token ids would silently mean other tokens."""
    if expected is None:
        return
    found = tokenizer.fingerprint()
    if found != expected:
        raise ValueError(f"--tokenizer {source} (fingerprint {found[:16]}) is not the tokenizer {load} was trained "
                         f"with (fingerprint {expected[:16]}); its token ids would not match the model's")


def _template_from_builds(builds: list[str] | None) -> str | None:
    """The chat template recorded by the first preprocess build a training run read (if it is still there)."""
    for build in builds or []:
        manifest = Path(build) / "manifest.json"
        if manifest.is_file():
            try:
                return json.loads(manifest.read_text()).get("chat_template")
            except json.JSONDecodeError:
                return None
    return None


def load_checkpoint_for_generation(load: str | Path, *, device: torch.device | str = "cpu",
                                   dtype: torch.dtype = torch.float32,
                                   tokenizer_dir: str | Path | None = None, flag: str = "--load") -> LoadedCheckpoint:
    """Loads either kind of checkpoint (see the module docstring) in eval mode.

    Args:
        tokenizer_dir: a saved tokenizer to use instead of the checkpoint's copy (needed when it has none).
        flag: the command-line flag `load` came from, for error messages (`--llm` in the MetaQuery recipe).
    """
    path = Path(load)
    if not path.exists():
        raise FileNotFoundError(f"{flag} {load}: no such file or directory")
    if tokenizer_dir is not None and Path(tokenizer_dir).is_file():
        raise ValueError(f"--tokenizer {tokenizer_dir} is a file; --tokenizer takes a saved tokenizer directory: the "
                         "tokenizer/ folder of the preprocess build the model was trained on (or of a checkpoint)")
    tokenizer = load_saved_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    if _is_model_checkpoint(path):
        from engine.checkpoint_io import load_model_checkpoint

        model, config = load_model_checkpoint(path, device=device, dtype=dtype)
        expected = config.get("tokenizer_fingerprint") or _saved_fingerprint(path)
        if tokenizer is None and (path / "tokenizer").is_dir():
            tokenizer = load_saved_tokenizer(path / "tokenizer")
        kind, encoder, template = "model", config.get("vision_encoder"), config.get("chat_template")
    else:
        from engine.training.checkpoint import MetaQueryCheckpointError
        from engine.training.export import load_for_generation

        try:
            model, saved_tokenizer, record = load_for_generation(path, device=device, dtype=dtype)
        except FileNotFoundError as err:  # the training loader names --load
            raise FileNotFoundError(str(err).replace("--load ", f"{flag} ", 1)) from None
        except MetaQueryCheckpointError:  # named with this command's flag and what to do instead
            use = ("render it with `python -m engine.generate --recipe metaquery --load ...`" if flag == "--load"
                   else f"{flag} takes an LLM: a VPiT training --save directory or a model-only checkpoint")
            raise ValueError(f"{flag} {load} is a MetaQuery checkpoint (learnable queries and a connector on a "
                             f"frozen LLM, not an LLM itself): {use}") from None
        data = record.get("data") if isinstance(record.get("data"), dict) else {}
        expected = data.get("tokenizer_fingerprint") or (saved_tokenizer.fingerprint() if saved_tokenizer else None)
        tokenizer = tokenizer or saved_tokenizer
        kind, encoder, template = "training", data.get("vision_encoder"), _template_from_builds(data.get("builds"))
        path = Path(record["path"])
    if tokenizer_dir is not None:
        check_tokenizer_fingerprint(tokenizer, expected, str(tokenizer_dir), load)
    if tokenizer is None:
        raise FileNotFoundError(f"{flag} {load} holds no tokenizer copy (trained on mock data?); "
                                "pass --tokenizer DIR (a directory written by ChrysalisTokenizer.save)")
    if tokenizer.image_end_id >= model.config.vocab_size:
        raise ValueError(f"the tokenizer's <image_end> id {tokenizer.image_end_id} does not fit the model's "
                         f"vocabulary of {model.config.vocab_size}: wrong --tokenizer for this checkpoint?")
    model.eval().requires_grad_(False)
    return LoadedCheckpoint(model=model, tokenizer=tokenizer, kind=kind, path=path, vision_encoder=encoder,
                            chat_template=template)


def default_chat_template(loaded: LoadedCheckpoint) -> str:
    """The checkpoint's template when recorded; else llama3 when the tokenizer has its special tokens, else plain."""
    if loaded.chat_template:
        return loaded.chat_template
    return "llama3" if loaded.tokenizer.has_special_token("<|eot_id|>") else "plain"


def build_prompt_encoder(reference: dict[str, Any] | None, override: str | None, device: torch.device | str):
    """The vision encoder that made the training data, to encode prompt images exactly like preprocess did.

    Args:
        reference: the checkpoint's encoder reference (name, fingerprint, decoder, compute_dtype).
        override: `--vision-encoder` (a local SigLIP directory, tiny-random or so400m-random).

    The reference only names a local SigLIP directory by its base name (preprocess records no path), so such
    checkpoints need `--vision-encoder`. The encoder is built with the reference's decoder and compute dtype and
    its fingerprint compared: a mismatch is an error when the encoder came from the reference, a warning when the
    user chose it with `--vision-encoder`.
    """
    from engine.vision_encoder import RANDOM_ENCODER_SHAPES, build_vision_encoder

    spec = override
    if spec is None:
        name = (reference or {}).get("name")
        if name in RANDOM_ENCODER_SHAPES:
            spec = name
        elif reference is None:
            raise ValueError("prompt images need a vision encoder and the checkpoint records none: "
                             "pass --vision-encoder (a local SigLIP directory or tiny-random)")
        else:
            raise ValueError(f"the checkpoint's data was encoded with {name!r}, which is not a built-in encoder; "
                             "pass --vision-encoder with that local SigLIP directory")
    decoder, dtype, layer = "auto", None, {}
    if reference:
        if reference.get("decoder") == "pil":
            decoder = "pil"
        if reference.get("compute_dtype") in ("float32", "bfloat16", "float16"):
            dtype = getattr(torch, reference["compute_dtype"])
        # The features preprocess took (hidden_states index, post_layernorm or not), so prompts match training.
        if isinstance(reference.get("feature_layer"), int) and not isinstance(reference["feature_layer"], bool):
            layer["feature_layer"] = reference["feature_layer"]
        if isinstance(reference.get("post_layernorm"), bool):
            layer["post_layernorm"] = reference["post_layernorm"]
    encoder = build_vision_encoder(spec, device=device, dtype=dtype, decoder=decoder, **layer)
    expected = (reference or {}).get("fingerprint")
    if expected and encoder.fingerprint() != expected:
        message = (f"vision encoder {spec} (fingerprint {encoder.fingerprint()[:12]}) differs from the one the "
                   f"training data was encoded with (fingerprint {expected[:12]}, decoder "
                   f"{reference.get('decoder')}, dtype {reference.get('compute_dtype')})")
        if override is None:
            raise ValueError(message)
        print(f"warning: {message}; prompt images may be encoded differently from training", file=sys.stderr)
    return encoder
