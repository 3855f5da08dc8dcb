"""Training checkpoint -> model for generation, a model-only Chrysalis checkpoint, or Hugging Face safetensors.

    python -m engine.training.export --load CKPT --output MODEL_DIR [--hf-output HF_DIR]

`--load` is a training `--save` directory (the checkpoint `latest` names, validated; see
engine/training/checkpoint.py) or one `iter_*` directory. Exit status: 0 on success, 1 with one line
`error: ...` naming the file when the checkpoint is missing, incomplete, corrupt or refused (docs/failure_modes.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config import ModelConfig

if TYPE_CHECKING:  # torch and the checkpoint code are imported on use: `--help` stays fast
    import torch

_VOCAB_KEYS = ("base_vocab_size", "image_start_id", "image_end_id")


def record_vocab(record: dict[str, Any]) -> dict[str, int]:
    """The tokenizer ids a model-only checkpoint and a Hugging Face config carry, from a training checkpoint's
    completion record (export and engine.convert)."""
    vocab = record.get("vocab") if isinstance(record.get("vocab"), dict) else {}
    return {k: int(vocab[k]) for k in _VOCAB_KEYS if k in vocab}


def _one_process_vocab_rows(config: ModelConfig, record: dict[str, Any]) -> ModelConfig:
    """The model config with the vocabulary padded as one process pads it. A run at TP t pads the tokenizer's ids to
    a multiple of --make-vocab-size-divisible-by x t (512 rows at TP2 where TP1 has 384); those extra rows are zero
    and an artefact of the layout, so the model read from a checkpoint (export, generation) does not depend on the
    layout that saved it. A --vocab-size given by flag is kept as it is."""
    import dataclasses

    from engine.training.data import padded_vocab_size

    run = record.get("config") if isinstance(record.get("config"), dict) else {}
    data = run.get("data") if isinstance(run.get("data"), dict) else {}
    tp, divisible_by = run.get("tensor_model_parallel_size"), data.get("make_vocab_size_divisible_by")
    real = config.real_vocab_size
    if (run.get("vocab_size_from_flag") is not False or not isinstance(tp, int) or tp <= 1
            or not isinstance(divisible_by, int) or divisible_by < 1 or real is None
            or config.vocab_size != padded_vocab_size(real, divisible_by, tp)):
        return config
    return dataclasses.replace(config, vocab_size=padded_vocab_size(real, divisible_by))


def load_for_generation(load: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """(VPiTModel, tokenizer or None, completion record) from a training checkpoint; single process (fp32 unless
    `dtype`). The vocabulary is padded as for one process, whatever the layout that saved the checkpoint."""
    import torch

    from engine.model import VPiTModel
    from engine.training import checkpoint as ckpt

    dtype = dtype or torch.float32
    path, record = ckpt.open_for_reading(load)
    ckpt.refuse_metaquery_record(path, record, "a VPiT model loader (export, generation)")
    try:
        config = _one_process_vocab_rows(ModelConfig.from_dict(record["model"]), record)
    except (TypeError, ValueError) as err:
        raise ckpt.CheckpointError(f"{path / ckpt.RECORD}: invalid model config ({' '.join(str(err).split())})"
                                   ) from None
    with torch.device("meta"):
        model = VPiTModel(config)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.rope.reset_parameters()
    ckpt.load_model_weights(path, model)
    tokenizer = None
    if (path / "tokenizer").is_dir():
        from engine.tokenizer import load_saved_tokenizer

        tokenizer = load_saved_tokenizer(path / "tokenizer")
    return model.to(device=device, dtype=dtype), tokenizer, {**record, "path": str(path)}


def _refuse_training_folder(out: Path, flag: str) -> None:
    """A model-only checkpoint written into a training --save folder makes the next `--load` of that folder a
    weights-only load from iteration 0 (config.json is taken for a model-only checkpoint); written into an iter_*
    folder, it adds files the checkpoint's record does not list, so the checkpoint is refused from then on."""
    from engine.training import checkpoint as ckpt

    resolved = out.resolve()
    for folder in (resolved, *resolved.parents):
        if (folder / ckpt.RECORD).is_file():
            raise ValueError(f"{flag} {out} is inside the training checkpoint {folder}: files written there would make "
                             "it unusable; choose another folder")
    if resolved.is_dir() and ((resolved / ckpt.LATEST).exists() or any(resolved.glob("iter_*"))):
        raise ValueError(f"{flag} {out} holds training checkpoints: a model-only checkpoint written there would "
                         "replace them on the next --load; choose another folder")


def export_training_checkpoint(load: str | Path, output: str | Path, *, hf_output: str | Path | None = None) -> Path:
    """Writes a model-only checkpoint (engine.checkpoint_io format, tokenizer copied) and optionally exports it to
    Hugging Face through `engine.convert.chrysalis_to_hf`."""
    from engine.checkpoint_io import save_model_checkpoint

    for flag, where in (("--output", output), ("--hf-output", hf_output)):
        if where is not None:
            _refuse_training_folder(Path(where), flag)
    model, tokenizer, record = load_for_generation(load)
    vocab = record_vocab(record)
    extra: dict[str, Any] = {"source": {"training_checkpoint": record["path"], "iteration": record["iteration"],
                                        "stage": record.get("stage")}}
    data = record.get("data") if isinstance(record.get("data"), dict) else {}
    if data.get("vision_encoder") is not None:
        extra["vision_encoder"] = data["vision_encoder"]
    if data.get("tokenizer_fingerprint"):
        extra["tokenizer_fingerprint"] = data["tokenizer_fingerprint"]
    out = save_model_checkpoint(model, output, vocab=vocab, tokenizer=tokenizer, extra=extra)
    if hf_output is not None:
        from engine.convert import chrysalis_to_hf

        chrysalis_to_hf(out, hf_output)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.training.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, metavar="CKPT", help="training --save directory or one iter_*")
    parser.add_argument("--output", required=True, metavar="MODEL_DIR", help="model-only checkpoint to write")
    parser.add_argument("--hf-output", default=None, metavar="HF_DIR",
                        help="also export to Hugging Face safetensors here (default: no)")
    from engine.cli_help import show_defaults

    args = show_defaults(parser).parse_args(argv)
    try:
        out = export_training_checkpoint(args.load, args.output, hf_output=args.hf_output)
    except (ValueError, OSError) as err:  # CheckpointError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}" + (f" and {args.hf_output}" if args.hf_output else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
