"""Where the frozen LLM comes from, and its identity (so a checkpoint is resumed and rendered with the same one).

Three sources, recorded in every MetaQuery checkpoint as `{"kind", "path", "fingerprint"}`:
  * `--llm CKPT`: a Chrysalis checkpoint, model-only (`engine.checkpoint_io`) or a VPiT training `--save`
    directory (any `iter_*` of it); its tokenizer must be the build's. Fingerprint: sha256 of its config.json /
    completion record, which hold the sha256 of every weight file.
  * `--load-hf DIR`: a Hugging Face LLaMA, imported by `engine.convert` (a plain LLaMA gets VPiT's two image
    tokens and a random projector: prompt images then mean nothing to it, see docs/metaquery.md). Fingerprint:
    sha256 of config.json and every weight file.
  * neither: a random LLaMA of the model flags (`--model-preset`, ...), for tests and benchmarks. Fingerprint: its
    model config and seed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from engine.data.manifest import sha256_file as _sha256


def chrysalis_fingerprint(path: Path) -> str:
    """sha256 of the file that lists the checkpoint's weight hashes (config.json or the completion record)."""
    from engine.training.checkpoint import RECORD

    for name in ("config.json", RECORD):
        if (path / name).is_file():
            return _sha256(path / name)
    raise FileNotFoundError(f"{path}: neither config.json nor {RECORD}")


def hf_fingerprint(path: Path) -> str:
    files = sorted(p for p in path.iterdir() if p.is_file() and (p.name == "config.json" or p.suffix == ".safetensors"))
    return hashlib.sha256(json.dumps({p.name: _sha256(p) for p in files}, sort_keys=True).encode()).hexdigest()


def load_llm(*, llm: str | None, load_hf: str | None, model_config, seed: int, vocab: dict[str, int],
             make_vocab_size_divisible_by: int, tensor_parallel_size: int, build_tokenizer_fingerprint: str | None,
             log=print) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(VPiTModel on CPU in fp32, its reference). Raises ValueError naming the flag on a mismatch with the build.

    Args:
        vocab: the build's tokenizer ids (base_vocab_size, image_start_id, image_end_id, vocab_size).
    """
    if llm and load_hf:
        raise ValueError("give either --llm (a Chrysalis checkpoint) or --load-hf (a Hugging Face LLaMA), not both")
    if llm:
        from engine.generation.loading import load_checkpoint_for_generation

        loaded = load_checkpoint_for_generation(llm, dtype=torch.float32, flag="--llm")
        found = loaded.tokenizer.fingerprint()
        if build_tokenizer_fingerprint and found != build_tokenizer_fingerprint:
            raise ValueError(f"--llm {llm}: its tokenizer (fingerprint {found[:16]}) is not the one the --data-path "
                             f"builds were made with ({build_tokenizer_fingerprint[:16]}); rebuild the data with the "
                             "LLM's tokenizer")
        model = loaded.model.requires_grad_(False)
        reference = {"kind": "chrysalis", "path": str(Path(loaded.path).resolve()),
                     "fingerprint": chrysalis_fingerprint(Path(loaded.path)), "vision_encoder": loaded.vision_encoder}
    elif load_hf:
        from engine.convert import hf_to_chrysalis

        model, hf_vocab = hf_to_chrysalis(load_hf, dtype=torch.float32, seed=seed,
                                          make_vocab_size_divisible_by=make_vocab_size_divisible_by
                                          * tensor_parallel_size)
        for key in ("base_vocab_size", "image_start_id", "image_end_id"):
            if hf_vocab[key] != vocab[key]:
                raise ValueError(f"--load-hf {load_hf}: {key} {hf_vocab[key]} differs from the builds' tokenizer "
                                 f"({vocab[key]}); preprocess with that model's tokenizer")
        reference = {"kind": "hf", "path": str(Path(load_hf).resolve()), "fingerprint": hf_fingerprint(Path(load_hf))}
    else:
        from engine.model import build_model
        from engine.training.data import padded_vocab_size

        size = padded_vocab_size(vocab["vocab_size"], make_vocab_size_divisible_by, tensor_parallel_size)
        model_config = model_config.replace(vocab_size=size,
                                            real_vocab_size=vocab["vocab_size"] if vocab["vocab_size"] < size else None)
        model = build_model(model_config, device="cpu", dtype=torch.float32, seed=seed)
        identity = json.dumps({"model": model_config.to_dict(), "seed": seed}, sort_keys=True, default=str)
        reference = {"kind": "random", "path": None, "fingerprint": hashlib.sha256(identity.encode()).hexdigest(),
                     "model": model_config.to_dict(), "seed": seed}
        log("note: no --llm / --load-hf: the frozen LLM is a random LLaMA of the model flags (tests, benchmarks)")
    if model.config.vocab_size <= vocab["image_end_id"]:
        raise ValueError(f"the LLM's vocabulary ({model.config.vocab_size}) does not hold the builds' <image_end> id "
                         f"{vocab['image_end_id']}")
    if model.config.vocab_size % tensor_parallel_size:
        raise ValueError(f"the LLM's vocabulary ({model.config.vocab_size} rows) is not divisible by "
                         f"--tensor-model-parallel-size {tensor_parallel_size}")
    reference["model_config"] = model.config.to_dict()
    return model.requires_grad_(False).eval(), reference


def reload_llm(reference: dict[str, Any], override: str | None = None, log=print) -> torch.nn.Module:
    """The LLM a checkpoint recorded (generation), from its path or `override` (`--llm`); a changed fingerprint is
    an error from the recorded path, a warning with an override."""
    from engine.config import ModelConfig

    kind = reference.get("kind")
    path = override or reference.get("path")
    if kind == "random" and override is None:
        from engine.model import build_model

        return build_model(ModelConfig.from_dict(reference["model"]), seed=int(reference["seed"])).eval()
    if path is None or not Path(path).exists():
        raise ValueError(f"the checkpoint's LLM {path!r} is not there: pass --llm with its current location")
    if kind == "hf" and override is None:
        from engine.convert import hf_to_chrysalis

        found = hf_fingerprint(Path(path))
        model = None
    else:
        from engine.generation.loading import load_checkpoint_for_generation

        loaded = load_checkpoint_for_generation(path, dtype=torch.float32,
                                                flag="--llm" if override else "the recorded LLM")
        model, found = loaded.model, chrysalis_fingerprint(Path(loaded.path))
    if found != reference.get("fingerprint"):
        message = (f"the LLM at {path} (fingerprint {found[:12]}) is not the one this checkpoint was trained with "
                   f"({str(reference.get('fingerprint'))[:12]})")
        if override is None:
            raise ValueError(message)
        log(f"warning: {message}")
    if model is None:
        saved = ModelConfig.from_dict(reference["model_config"])
        model, _ = hf_to_chrysalis(path, dtype=torch.float32)
        if model.config.vocab_size != saved.vocab_size:
            model.resize_token_embeddings(saved.num_real_tokens, saved.vocab_size)
    return model.requires_grad_(False).eval()
