"""Hugging Face LLaMA <-> Chrysalis checkpoint conversion.

    python -m engine.convert hf-to-chrysalis --hf-dir DIR --output CKPT [--make-vocab-size-divisible-by 128]
    python -m engine.convert chrysalis-to-hf --load CKPT --output DIR [--max-shard-size 5GB]

Importing appends `<image_start>` and `<image_end>` after the Hugging Face vocabulary (new rows = mean of the
existing rows, as MetaMorph's `initialize_vision_tokenizer`), pads the vocabulary as Megatron does (zero rows that
are masked out of every softmax: `ModelConfig.real_vocab_size`), and initialises the VPiT projector and
continuous-token head. Exporting writes a standard `LlamaForCausalLM` directory with the real vocabulary rows only
(`vocab_size` = the tokenizer's ids, image tokens included, so our tokenizer's ids stay valid and Hugging Face
generation can never pick a padding row) plus `vpit_heads.safetensors` with the projector and head, and records the
Chrysalis vocabulary layout in `config.json["chrysalis"]`, so that export -> import round-trips bit-exactly at the
same `--make-vocab-size-divisible-by` (and to the same real rows at any other).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path, PurePosixPath
from typing import Any


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?B?)", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 5GB, 500MB")
    unit = {"": 1, "B": 1, "K": 1024, "KB": 1024, "M": 1024**2, "MB": 1024**2, "G": 1024**3, "GB": 1024**3}
    return int(float(match.group(1)) * unit[match.group(2)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("hf-to-chrysalis", help="import a local Hugging Face LLaMA (safetensors)")
    imp.add_argument("--hf-dir", required=True, type=Path)
    imp.add_argument("--output", required=True, type=Path)
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128, help="(default: %(default)s)")
    imp.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: keep the stored dtype")
    imp.add_argument("--seed", type=int, default=0, help="seed for the new projector and head (default: %(default)s)")
    imp.add_argument("--tokenizer-type", choices=["sentencepiece", "tiktoken", "huggingface"], default=None,
                     help="store a copy of this tokenizer in the checkpoint")
    imp.add_argument("--tokenizer-model", type=Path, default=None)
    exp = sub.add_parser("chrysalis-to-hf", help="export to a Hugging Face LLaMA directory")
    exp.add_argument("--load", required=True, type=Path)
    exp.add_argument("--output", required=True, type=Path)
    exp.add_argument("--max-shard-size", type=_parse_size, default=5 * 1024**3, help="(default: 5GB)")
    from engine.cli_help import show_defaults

    return show_defaults(parser)


if __name__ == "__main__":  # `python -m engine.convert`: --help and usage errors answer before torch is imported
    build_parser().parse_args()

import torch

from engine.checkpoint_io import (
    CheckpointError,
    atomic_write_text,
    check_state_dict,
    load_model_checkpoint,
    load_tensors,
    read_json_object,
    save_model_checkpoint,
    save_tensors_atomic,
)
from engine.config import ModelConfig, RopeScaling

VPIT_HEADS_FILE = "vpit_heads.safetensors"

# Hugging Face name pattern -> Chrysalis name pattern ({i} = layer index).
_LAYER_MAP = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_GLOBAL_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_to_chrysalis_name(name: str) -> str | None:
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name]
    match = _LAYER_RE.match(name)
    if match and match.group(2) in _LAYER_MAP:
        return f"layers.{match.group(1)}.{_LAYER_MAP[match.group(2)]}"
    return None


def chrysalis_to_hf_name(name: str) -> str | None:
    for hf, ours in _GLOBAL_MAP.items():
        if name == ours:
            return hf
    parts = name.split(".", 2)
    if parts[0] == "layers" and len(parts) == 3:
        for hf, ours in _LAYER_MAP.items():
            if parts[2] == ours:
                return f"model.layers.{parts[1]}.{hf}"
    return None


def pad_vocab_size(size: int, divisible_by: int) -> int:
    """Megatron's padding: round up to a multiple of `divisible_by` (callers multiply in the TP size)."""
    return int(math.ceil(size / divisible_by) * divisible_by) if divisible_by > 1 else size


# ------------------------------------------------------------------------------------------------ configs
def model_config_from_hf(hf: dict[str, Any], vocab_size: int) -> ModelConfig:
    """Maps a Hugging Face LLaMA `config.json` to ModelConfig; refuses features we do not implement."""
    where = "config.json"
    if hf.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{where}: model_type {hf.get('model_type')!r} is not 'llama'")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise CheckpointError(f"{where}: {flag}=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {hf.get('hidden_act')!r} is not supported (SwiGLU needs silu)")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise CheckpointError(f"{where}: head_dim {head_dim} x {heads} heads != hidden_size {hf['hidden_size']}")
    # transformers >= 5 keeps RoPE settings in `rope_parameters`; older configs use rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_scaling = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise CheckpointError(f"{where}: rope scaling type {kind!r} is not supported (only 'llama3')")
        rope_scaling = RopeScaling(
            factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
    max_pos = hf.get("max_position_embeddings", 4096)
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=hf["hidden_size"], ffn_hidden_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads, seq_length=min(4096, max_pos),
        max_position_embeddings=max_pos, rotary_base=float(theta), rope_scaling=rope_scaling,
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-5)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
    )


def hf_config_from_model(config: ModelConfig, vocab: dict[str, int]) -> dict[str, Any]:
    hf: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_query_groups,
        "head_dim": config.head_dim,
        "vocab_size": config.num_real_tokens,  # the padding is not exported
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.norm_epsilon,
        "rope_theta": config.rotary_base,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": config.init_method_std,
        "torch_dtype": "float32",
        "chrysalis": {**vocab, "real_vocab_size": config.num_real_tokens, "visual_loss_coef": config.visual_loss_coef,
                      "vision_dim": config.vision_dim},
    }
    if config.rope_scaling is not None:
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": config.rope_scaling.factor,
                              "low_freq_factor": config.rope_scaling.low_freq_factor,
                              "high_freq_factor": config.rope_scaling.high_freq_factor,
                              "original_max_position_embeddings": config.rope_scaling.original_max_position_embeddings}
    return hf


# ------------------------------------------------------------------------------------------------ HF files
def read_hf_state_dict(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Reads a single-file or sharded (`model.safetensors.index.json`) safetensors checkpoint."""
    index = hf_dir / "model.safetensors.index.json"
    single = hf_dir / "model.safetensors"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: not a valid safetensors index ('weight_map' must map tensor names to "
                                  "shard file names)")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            pure = PurePosixPath(shard)
            if not shard or pure.is_absolute() or ".." in pure.parts or "\\" in shard:
                raise CheckpointError(f"{index} names shard {shard!r}, which is not a file inside {hf_dir}")
            path = hf_dir / shard
            if not path.is_file():
                raise CheckpointError(f"{index} names shard {shard}, which is missing")
            state.update(load_tensors(path))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise CheckpointError(f"{index} lists tensors not found in any shard: {', '.join(missing[:5])}")
        return state
    if single.is_file():
        return load_tensors(single)
    raise CheckpointError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json "
                          "(only safetensors checkpoints are read; pickled .bin files are refused)")


def write_hf_state_dict(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> None:
    total = sum(t.numel() * t.element_size() for t in state.values())
    if total <= max_shard_bytes:
        save_tensors_atomic(state, out_dir / "model.safetensors", metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_tensors_atomic(shard, out_dir / filename, metadata={"format": "pt"})
        weight_map.update({name: filename for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_text(out_dir / "model.safetensors.index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------ conversion
def hf_to_chrysalis(hf_dir: str | Path, output: str | Path | None = None, *, make_vocab_size_divisible_by: int = 128,
                    dtype: torch.dtype | None = None, seed: int = 0, tokenizer: Any = None):
    """Imports a local Hugging Face LLaMA; returns (model, vocab layout). Writes a checkpoint when `output` is set.

    A directory exported by `chrysalis_to_hf` (it has `config.json["chrysalis"]` and `vpit_heads.safetensors`)
    comes back exactly; a plain LLaMA gets the two image tokens appended and a freshly initialised projector/head.
    Either way the real vocabulary is padded to a multiple of `make_vocab_size_divisible_by` with zero rows.
    """
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} is missing")
    hf = read_json_object(config_path)
    hf_state = read_hf_state_dict(hf_dir)
    try:
        config, vocab, real_vocab, vocab_size = _config_from_hf(hf, config_path, make_vocab_size_divisible_by)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as err:  # a field missing or mistyped
        what = f"field {err} is missing" if isinstance(err, KeyError) else " ".join(str(err).split())
        raise CheckpointError(f"{config_path}: not a LLaMA config we can read ({what})") from None
    return _import_weights(hf_dir, hf_state, config, vocab, real_vocab, vocab_size, output, dtype=dtype, seed=seed,
                           tokenizer=tokenizer)


def _config_from_hf(hf: dict[str, Any], config_path: Path, make_vocab_size_divisible_by: int):
    """(ModelConfig, vocab layout, real vocabulary, padded vocabulary) of a Hugging Face config.json."""
    hf_vocab = hf["vocab_size"]
    ours = hf.get("chrysalis")
    if ours:
        vocab = {k: int(ours[k]) for k in ("base_vocab_size", "image_start_id", "image_end_id")}
        # Exports write the real rows only; older ones wrote the padded matrix (then real_vocab_size says where
        # the padding starts, or every row counts as real).
        real_vocab = int(ours.get("real_vocab_size", hf_vocab))
        if not vocab["image_end_id"] < real_vocab <= hf_vocab:
            raise CheckpointError(f"{config_path}: chrysalis.real_vocab_size {real_vocab} must be in "
                                  f"({vocab['image_end_id']}, vocab_size {hf_vocab}]")
    else:
        vocab = {"base_vocab_size": hf_vocab, "image_start_id": hf_vocab, "image_end_id": hf_vocab + 1}
        real_vocab = hf_vocab + 2
    vocab_size = pad_vocab_size(real_vocab, make_vocab_size_divisible_by)
    config = model_config_from_hf(hf, hf_vocab)
    if ours:
        config = config.replace(visual_loss_coef=float(ours.get("visual_loss_coef", 1.0)))
    return config, vocab, real_vocab, vocab_size


def _import_weights(hf_dir: Path, hf_state: dict[str, torch.Tensor], config: ModelConfig, vocab: dict[str, int],
                    real_vocab: int, vocab_size: int, output, *, dtype, seed: int, tokenizer):
    from engine.model import VPiTModel

    state: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in hf_state.items():
        mapped = hf_to_chrysalis_name(name)
        if mapped is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # older exports store RoPE frequencies; we recompute them
            unknown.append(name)
        else:
            state[mapped] = tensor
    if unknown:
        raise CheckpointError(f"{hf_dir}: unexpected tensors {', '.join(sorted(unknown)[:5])}")
    if config.tie_embeddings:
        state.pop("output.weight", None)

    embed = hf_state.get("model.embed_tokens.weight")  # missing: named by check_state_dict below
    model_dtype = dtype or (embed.dtype if embed is not None else torch.float32)
    with torch.device("meta"):
        model = VPiTModel(config)
    model.to_empty(device="cpu")
    model.init_weights(seed=seed)  # the projector and head start random; every LLaMA tensor is overwritten below
    model.to(model_dtype)
    llama_expected = {k: v for k, v in model.state_dict().items()
                      if not k.startswith(("projector.", "visual_head."))}
    if config.tie_embeddings:
        llama_expected.pop("output.weight", None)
    check_state_dict(llama_expected, state, str(hf_dir))
    model.load_state_dict(state, strict=False)
    heads = hf_dir / VPIT_HEADS_FILE
    if heads.is_file():
        head_state = load_tensors(heads)
        head_expected = {k: v for k, v in model.state_dict().items() if k.startswith(("projector.", "visual_head."))}
        check_state_dict(head_expected, head_state, str(heads))
        model.load_state_dict(head_state, strict=False)
    model.resize_token_embeddings(real_vocab, vocab_size)
    if output is not None:
        save_model_checkpoint(model, output, vocab=vocab, tokenizer=tokenizer,
                              extra={"source": {"hf_dir": str(hf_dir.resolve())}})
    return model, vocab


def _load_for_export(load: str | Path) -> tuple[torch.nn.Module, dict[str, int], Path]:
    """(model, vocabulary ids, tokenizer directory) of a model-only checkpoint, or of a training checkpoint (a
    --save folder or one iter_*, saved under any parallel layout), chosen as training's --load chooses."""
    from engine.training import checkpoint as ckpt

    load = Path(load)
    if (load / ckpt.RECORD).is_file() or ckpt.holds_training_checkpoints(load):
        from engine.training.export import load_for_generation, record_vocab

        model, _, record = load_for_generation(load)
        return model, record_vocab(record), Path(record["path"]) / "tokenizer"
    model, ckpt_config = load_model_checkpoint(load)
    return model, ckpt_config["vocab"], load / "tokenizer"


def chrysalis_to_hf(load: str | Path, output: str | Path, *, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Exports a Chrysalis checkpoint (model-only, or a training checkpoint) to a Hugging Face LLaMA directory
    (+ vpit_heads.safetensors)."""
    model, vocab, tokenizer_dir = _load_for_export(load)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    llama: dict[str, torch.Tensor] = {}
    heads: dict[str, torch.Tensor] = {}
    real = model.config.num_real_tokens
    for name, tensor in model.state_dict().items():
        if name.startswith(("projector.", "visual_head.")):
            heads[name] = tensor
            continue
        if name == "output.weight" and model.config.tie_embeddings:
            continue
        if name in ("tok_embeddings.weight", "output.weight"):
            tensor = tensor[:real].contiguous()  # the real rows only: padding is an artefact of the layout
        hf_name = chrysalis_to_hf_name(name)
        if hf_name is None:
            raise CheckpointError(f"no Hugging Face name for tensor {name!r}")
        llama[hf_name] = tensor
    write_hf_state_dict(llama, out, max_shard_bytes)
    save_tensors_atomic(heads, out / VPIT_HEADS_FILE)
    hf = hf_config_from_model(model.config, vocab)
    hf["torch_dtype"] = str(next(iter(llama.values())).dtype).removeprefix("torch.")
    atomic_write_text(out / "config.json", json.dumps(hf, indent=2, sort_keys=True) + "\n")
    if tokenizer_dir.is_dir():
        from engine.tokenizer import load_saved_tokenizer

        load_saved_tokenizer(tokenizer_dir).save(out / "chrysalis_tokenizer")
    return out


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _refuse_output(output: str | Path, source: str | Path, source_flag: str) -> None:
    """An --output that is the source, or holds a checkpoint of the other kind, would be overwritten in place:
    `chrysalis-to-hf --load M --output M` replaced M's config.json and weights; `hf-to-chrysalis --output` into a
    training --save folder made its next --load a weights-only restart."""
    from engine.training.export import _refuse_training_folder

    out = Path(output)
    if out.resolve() == Path(source).resolve():
        raise CheckpointError(f"--output {out} is the {source_flag} directory: converting in place would overwrite "
                              "it; choose another folder")
    try:
        _refuse_training_folder(out, "--output")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    config = out / "config.json"
    if config.is_file():
        try:
            kind = json.loads(config.read_bytes().decode("utf-8")).get("format")
        except (ValueError, RecursionError, AttributeError):
            kind = None
        if kind == "chrysalis-model" if source_flag == "--load" else kind != "chrysalis-model":
            raise CheckpointError(f"--output {out} holds a checkpoint of the other format ({config}): writing there "
                                  "would leave it half overwritten; choose another folder")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "hf-to-chrysalis" and args.output is not None:
            _refuse_output(args.output, args.hf_dir, "--hf-dir")
        elif args.command == "chrysalis-to-hf":
            _refuse_output(args.output, args.load, "--load")
        if args.command == "hf-to-chrysalis":
            tokenizer = None
            if args.tokenizer_type:
                from engine.tokenizer import build_tokenizer

                tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
            model, vocab = hf_to_chrysalis(args.hf_dir, args.output,
                                           make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                                           dtype=_DTYPES.get(args.dtype), seed=args.seed, tokenizer=tokenizer)
            if tokenizer is not None and tokenizer.base_vocab_size != vocab["base_vocab_size"]:
                print(f"warning: tokenizer has {tokenizer.base_vocab_size} base tokens, the model "
                      f"{vocab['base_vocab_size']}", file=sys.stderr)
            print(f"wrote {args.output}: vocab {model.config.num_real_tokens} tokens padded to "
                  f"{model.config.vocab_size} rows (image tokens {vocab['image_start_id']}, "
                  f"{vocab['image_end_id']}), {sum(p.numel() for p in model.parameters()):,} parameters")
        else:
            out = chrysalis_to_hf(args.load, args.output, max_shard_bytes=args.max_shard_size)
            print(f"wrote {out}")
    except (CheckpointError, FileNotFoundError) as err:  # FileNotFoundError: --load X holds no checkpoint
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
