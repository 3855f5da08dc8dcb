"""Model-only Chrysalis checkpoints: a directory with `config.json` and `model.safetensors`.

This is what `engine.convert` writes and reads. Weights are safetensors (no pickle); `config.json` is written
last and records the sha256 of the weights, so a truncated or corrupted file is detected at load with its name.

    CKPT/
      config.json        {"format": "chrysalis-model", "format_version": 1, "model": {...ModelConfig...},
                          "vocab": {"base_vocab_size", "image_start_id", "image_end_id"}, "sha256": {...},
                          "tokenizer_fingerprint": ... (when a tokenizer is saved with it)}
      model.safetensors  the model's state dict (a tied LM head is stored once, as tok_embeddings.weight)
      tokenizer/         optional copy of the tokenizer
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig

FORMAT = "chrysalis-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model."""


def json_refusal(err: Exception) -> str:
    """What json refused in syntactically valid text, in a few words (nesting, an integer of 5,000 digits)."""
    return "nested too deeply" if isinstance(err, RecursionError) else str(err).split(";")[0]


def read_json(path: Path) -> Any:
    """The JSON in `path`; CheckpointError, one line naming the file, for anything else (missing, unreadable,
    not UTF-8, not JSON, JSON that json refuses)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path} is not valid UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{path} is not usable JSON ({json_refusal(err)})") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """`read_json` of a file that must hold a JSON object."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors save through a temp file + rename, so a crash never leaves a half-written file in place."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Raises CheckpointError naming every missing, unexpected or mis-shaped tensor."""
    problems = []
    for name, tensor in expected.items():
        if name not in found:
            problems.append(f"missing tensor {name!r} (expected shape {tuple(tensor.shape)})")
        elif tuple(found[name].shape) != tuple(tensor.shape):
            problems.append(f"tensor {name!r} has shape {tuple(found[name].shape)}, expected {tuple(tensor.shape)}")
    for name in sorted(set(found) - set(expected)):
        problems.append(f"unexpected tensor {name!r} with shape {tuple(found[name].shape)}")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointError(f"{source} does not match the model:\n  " + "\n  ".join(shown))


def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the tied LM head duplicate (safetensors refuses shared storage)."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("output.weight", None)
    return state


def save_model_checkpoint(model: torch.nn.Module, directory: str | Path, *, vocab: dict[str, int],
                          tokenizer: Any = None, extra: dict[str, Any] | None = None) -> Path:
    """Writes a model-only checkpoint; `config.json` goes last, so its presence means the rest is complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    save_tensors_atomic(model_state_for_saving(model), weights, metadata={"format": FORMAT})
    if tokenizer is not None:
        tokenizer.save(directory / "tokenizer")
        extra = {"tokenizer_fingerprint": tokenizer.fingerprint(), **(extra or {})}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "vocab": vocab,
        "sha256": {WEIGHTS_FILE: sha256_file(weights)},
        **(extra or {}),
    }
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def read_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a Chrysalis checkpoint: {path} is missing "
                              "(an interrupted save leaves no config.json)")
    config = read_json_object(path)
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format is {config.get('format')!r}, expected {FORMAT!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {config.get('format_version')} is not supported "
                              f"(this Chrysalis reads version {FORMAT_VERSION})")
    return config


def load_model_checkpoint(directory: str | Path, device: torch.device | str = "cpu",
                          dtype: torch.dtype | None = None, verify: bool = True):
    """Loads a model-only checkpoint into a new `VPiTModel`; returns (model, config dict).

    Args:
        dtype: cast weights to this dtype (default: keep the stored dtype).
        verify: check the weights' sha256 against `config.json` first.
    """
    from engine.model import VPiTModel

    directory = Path(directory)
    config = read_checkpoint_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing")
    if verify:
        expected = (config.get("sha256") or {}).get(WEIGHTS_FILE) if isinstance(config.get("sha256"), dict) else None
        if expected and sha256_file(weights) != expected:
            raise CheckpointError(f"{weights} is corrupt: its sha256 does not match {directory / 'config.json'}")
    if not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{directory / 'config.json'}: 'model' (the model config) is missing or not an object")
    try:
        model_config = ModelConfig.from_dict(config["model"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{directory / 'config.json'}: invalid model config ({' '.join(str(err).split())})"
                              ) from None
    state = load_tensors(weights)
    with torch.device("meta"):
        model = VPiTModel(model_config)
    check_state_dict(model_state_for_saving(model), state, str(weights))
    stored_dtype = next(iter(state.values())).dtype
    model.to_empty(device=device)
    model.to(dtype or stored_dtype)
    model.tie_weights()
    model.load_state_dict(state, strict=not model_config.tie_embeddings)
    model.rope.reset_parameters()
    return model, config
