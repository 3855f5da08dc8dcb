"""Megatron-LM's flag names on `pretrain_gpt_vision.py`, and how `--help` renders the training flags.

A Megatron-LM launch script should carry over. Every Megatron flag we know falls in one of four kinds:

- **the same flag** (`--tensor-model-parallel-size`, `--split`, `--bf16`, ...): in `engine.training.config._FLAGS`;
- **an alias** (`--use-torch-fsdp2` = `--data-parallel-sharding fsdp`): shown in `--help` under "Megatron-LM
  names", and in YAML too; `ALIASES`;
- **accepted**, because what it asks for is what Chrysalis always does (`--use-mcore-models`, `--swiglu`,
  `--overlap-grad-reduce`, `--normalization RMSNorm`, ...): `ACCEPTED`; a value we do not do is an error;
- **not supported**: a one-line error that says so and names our nearest equivalent (`UNSUPPORTED`), never a bare
  "unrecognized arguments". An unknown flag gets the closest names we have.

Values are translated too: `--attention-backend fused` (Megatron's name for Transformer Engine's fused attention)
is `te`, `--tokenizer-type TikTokenizer` is `tiktoken` (checked against the tokenizer the shards were built with).
The table in docs/training.md lists all of this.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from pathlib import Path
from typing import Any

# Megatron flag -> (our flag, value it sets, note). Each is a real option (shown in --help); after parsing it is
# applied to our flag by `apply_megatron_flags` (an explicit conflicting value of our flag is an error).
ALIASES: dict[str, tuple[str, Any, str]] = {
    "--use-torch-fsdp2": ("--data-parallel-sharding", "fsdp", "PyTorch FSDP2 (fully_shard)"),
    "--use-megatron-fsdp": ("--data-parallel-sharding", "fsdp", "fully sharded data parallelism, by PyTorch FSDP2"),
    "--recompute-activations": ("--recompute-granularity", "selective", "selective recomputation"),
    "--use-flash-attn": ("--attention-backend", "flash", "flash-attn kernels"),
}
# Megatron flag -> (our flag, value it sets when our flag is not given, note): `--use-rope-scaling` turns on
# Llama-3.1 RoPE scaling with Megatron's default `--rope-scaling-factor 8`, or with the factor given.
DEFAULTING_ALIASES: dict[str, tuple[str, Any, str]] = {
    "--use-rope-scaling": ("--rope-scaling-factor", 8.0,
                           "Llama-3.1 RoPE scaling (factor 8 unless --rope-scaling-factor is given)"),
}

# Megatron values of our flags -> our values (applied to the command line before parsing).
VALUE_ALIASES: dict[str, dict[str, str]] = {
    "--attention-backend": {"fused": "te", "unfused": "sdpa", "local": "sdpa"},
}
# Megatron's --tokenizer-type names -> the tokenizer types of `preprocess build`.
TOKENIZER_TYPES = {"SentencePieceTokenizer": "sentencepiece", "GPTSentencePieceTokenizer": "sentencepiece",
                   "Llama2Tokenizer": "sentencepiece", "TikTokenizer": "tiktoken",
                   "HuggingFaceTokenizer": "huggingface"}

# Megatron flag -> (values we accept, or None for a flag without a value; what Chrysalis does). Accepted flags are
# options in a --help group of their own; a value outside the tuple is an error quoting the note.
ACCEPTED: dict[str, tuple[tuple[str, ...] | None, str]] = {
    "--use-mcore-models": (None, "there is one model implementation"),
    "--swiglu": (None, "the MLP is always SwiGLU (LLaMA)"),
    "--disable-bias-linear": (None, "linear layers never have biases (LLaMA)"),
    "--group-query-attention": (None, "grouped-query attention follows from --num-query-groups"),
    "--use-rotary-position-embeddings": (None, "positions are always RoPE"),
    "--position-embedding-type": (("rope",), "positions are always RoPE"),
    "--normalization": (("RMSNorm",), "normalisation is always RMSNorm"),
    "--attention-dropout": (("0", "0.0"), "there is no dropout (LLaMA pretraining)"),
    "--hidden-dropout": (("0", "0.0"), "there is no dropout (LLaMA pretraining)"),
    "--optimizer": (("adam",), "the optimizer is AdamW (decoupled weight decay, as Megatron's adam)"),
    "--overlap-grad-reduce": (None, "DDP and FSDP2 overlap gradient reduction with the backward pass"),
    "--overlap-param-gather": (None, "FSDP2 prefetches parameter all-gathers"),
    "--ckpt-format": (("torch_dist",), "checkpoints are torch.distributed.checkpoint (Megatron's torch_dist)"),
    "--auto-detect-ckpt-format": (None, "there is one checkpoint format"),
    "--distributed-backend": (("nccl", "gloo"), "NCCL on GPUs, gloo on CPU, chosen by device"),
    "--recompute-method": (("block",), ("--recompute-num-layers N recomputes the first N blocks (Megatron's "
                                        "block method); uniform is not implemented")),
    "--tokenizer-model": (("*",), "the tokenizer is the copy stored with the shards by `preprocess build`"),
    "--reset-position-ids": (None, "positions restart at every packed document"),
    "--reset-attention-mask": (None, "attention never crosses packed documents"),
    "--eod-mask-loss": (None, "loss masks come from the preprocess build (responses only)"),
    "--no-masked-softmax-fusion": (None, "fusion is chosen by the attention backend"),
    "--no-bias-gelu-fusion": (None, "there are no biases"),
    "--no-bias-swiglu-fusion": (None, "there are no biases"),
    "--no-bias-dropout-fusion": (None, "there is no bias or dropout"),
    "--no-rope-fusion": (None, "RoPE is applied by torch ops"),
    "--no-position-embedding": (None, "there is no learned absolute position embedding: positions are RoPE"),
    "--rotary-percent": (("1.0", "1"), "RoPE rotates the whole head dimension"),
    "--attention-softmax-in-fp32": (None, "the attention kernels keep the softmax in fp32"),
    "--kv-channels": (("*",), "the head dimension is --hidden-size / --num-attention-heads (checked against it)"),
    "--calculate-per-token-loss": (None, ("losses are always averaged per token over the global batch (targets "
                                          "counted over every micro-batch and data-parallel rank)")),
    "--log-timers-to-tensorboard": (None, "step and data-wait times are always logged (TensorBoard gets every field)"),
    "--log-memory-to-tensorboard": (None, "peak memory is always logged (TensorBoard gets every field)"),
    "--no-gradient-accumulation-fusion": (None, "gradients accumulate in torch"),
    "--no-persist-layer-norm": (None, "normalisation is torch's RMSNorm"),
    "--no-async-tensor-model-parallel-allreduce": (None, "DTensor schedules TP communication"),
    "--use-cpu-initialization": (None, "the model is built on the meta device, then initialised"),
    "--log-throughput": (None, "throughput is always logged"),
    "--log-validation-ppl-to-tensorboard": (None, "validation perplexity is always logged"),
    "--tokenizer-type": (("*",), "checked against the tokenizer the shards were built with"),
}

# Megatron flag -> what to use instead (the error says the flag is not supported and quotes this).
UNSUPPORTED: dict[str, str] = {
    "--train-samples": "--train-iters (samples / --global-batch-size)",
    "--lr-warmup-samples": "--lr-warmup-iters",
    "--lr-decay-samples": "--lr-decay-iters",
    "--lr-warmup-init": "--lr-warmup-iters (warm-up starts at 0)",
    "--checkpoint-activations": "--recompute-granularity full --recompute-num-layers -1",
    "--context-parallel-size": "--sequence-parallel (shards activations along the sequence within TP)",
    "--expert-model-parallel-size": "nothing: mixture-of-experts models are not supported",
    "--num-experts": "nothing: mixture-of-experts models are not supported",
    "--transformer-impl": "--attention-backend te and --fp8-backend te (Transformer Engine per component)",
    "--vocab-file": "the tokenizer stored with the shards (python -m preprocess build --tokenizer-model)",
    "--merge-file": "the tokenizer stored with the shards (python -m preprocess build --tokenizer-model)",
    "--train-data-path": "--data-path with --split (one blend, cut into train/valid/test ranges of every build)",
    "--valid-data-path": "--data-path with --split (one blend, cut into train/valid/test ranges of every build)",
    "--test-data-path": "--data-path with --split (one blend, cut into train/valid/test ranges of every build)",
    "--data-cache-path": "nothing: shards are read in place, no index cache is built",
    "--mmap-bin-files": "nothing: shards are always memory-mapped",
    "--no-mmap-bin-files": "nothing: shards are always memory-mapped",
    "--dataloader-type": "nothing: the sampler is fixed (seeded, resumable)",
    "--no-load-optim": "--finetune (model weights only, iteration 0)",
    "--no-load-rng": "--finetune (model weights only, iteration 0)",
    "--no-save-optim": "nothing: checkpoints always hold the optimizer state",
    "--no-save-rng": "nothing: checkpoints always hold the RNG states",
    "--use-checkpoint-args": "nothing: the model flags are compared with the checkpoint's config on load",
    "--exit-duration-in-mins": "--exit-interval, or SIGTERM with --exit-signal-handler (saves, exits 0)",
    "--rampup-batch-size": "nothing: the global batch size is constant",
    "--decoder-first-pipeline-num-layers": "--pipeline-layer-split (layers of every stage)",
    "--decoder-last-pipeline-num-layers": "--pipeline-layer-split (layers of every stage)",
    "--pipeline-model-parallel-layout": "--pipeline-layer-split (layers of every stage)",
    "--data-parallel-sharding-strategy": "--data-parallel-sharding fsdp",
    "--fp8-param-gather": "--fp8-format (FP8 GEMMs; parameters are gathered in the training dtype)",
    "--start-weight-decay": "--weight-decay (constant)",
    "--end-weight-decay": "--weight-decay (constant)",
    "--weight-decay-incr-style": "--weight-decay (constant)",
    "--tensorboard-log-interval": "--log-interval (TensorBoard gets every logged step)",
    "--micro-batch-size-per-gpu": "--micro-batch-size",
    "--cross-entropy-loss-fusion": "--fused-linear-cross-entropy (LM head + cross-entropy in one Triton kernel)",
    "--apply-layernorm-1p": "nothing: RMSNorm weights are used as stored (LLaMA)",
    "--decoupled-lr": "nothing: one learning rate for every parameter",
    "--decoupled-min-lr": "nothing: one learning rate for every parameter",
    "--fp8-amax-history-len": "--fp8-recipe delayed --fp8-backend te (Transformer Engine's delayed-scaling defaults)",
    "--fp8-amax-compute-algo": "--fp8-recipe delayed --fp8-backend te (Transformer Engine's delayed-scaling defaults)",
    "--manual-gc": "nothing: Python's garbage collector runs as usual",
    "--empty-unused-memory-level": "nothing: the CUDA caching allocator is left alone",
    "--log-params-norm": "nothing yet: the gradient norm is logged (grad_norm)",
    "--profile": "nothing yet: wrap pretrain_gpt_vision.main in torch.profiler",
}

USAGE = ("torchrun --nproc-per-node N pretrain_gpt_vision.py --data-path DIR --model-preset NAME "
         "--micro-batch-size N --train-iters N [flags below]")
ALIAS_GROUP = "Megatron-LM names (aliases of the flags above)"
ACCEPTED_GROUP = "Megatron-LM flags accepted because Chrysalis always does this (other values are refused)"

# --help groups, as Megatron's: by config section, then by field of TrainingConfig itself.
SECTION_GROUPS = {"data": "data and dataloader", "optimizer": "learning rate and optimizer",
                  "checkpoint": "checkpointing", "logging": "logging and validation"}
_DISTRIBUTED = {"tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage",
                "sequence_parallel", "pipeline_layer_split", "data_parallel_sharding", "use_distributed_optimizer",
                "distributed_timeout_minutes"}
_PRECISION = {"bf16", "fp16", "accumulate_allreduce_grads_in_fp32"}
GROUP_ORDER = ["training", "data and dataloader", "learning rate and optimizer", "checkpointing",
               "logging and validation", "distributed", "mixed precision", "memory and speed"]

# Metavars for flags whose argument is not well named by the flag itself.
METAVARS: dict[str, Any] = {"--data-path": ("[W1] DIR1", "W2 DIR2"), "--load": "DIR", "--save": "DIR",
                            "--load-hf": "HF_DIR", "--log-jsonl": "FILE", "--tensorboard-dir": "DIR",
                            "--pipeline-layer-split": "N", "--split": "TRAIN,VALID,TEST"}


def help_group(section: str, name: str) -> str:
    """The --help group of a `_FLAGS` entry; unknown fields of TrainingConfig land in "training"."""
    if section in SECTION_GROUPS:
        return SECTION_GROUPS[section]
    if name in _DISTRIBUTED:
        return "distributed"
    if name in _PRECISION or name.startswith("fp8"):
        return "mixed precision"
    if name.startswith("recompute") or name in ("compile",) or "fused" in name:
        return "memory and speed"
    return "training"


def metavar(flag: str) -> Any:
    """Readable metavar: the flag's own name (`--micro-batch-size` -> MICRO_BATCH_SIZE), as Megatron shows them."""
    return METAVARS.get(flag, flag.lstrip("-").upper().replace("-", "_"))


def help_with_default(help_text: str, kind: Any, default: Any) -> str:
    """`help_text` plus the dataclass default (the parser's own defaults are None: unset flags fall through to the
    YAML file, then to the dataclass)."""
    text = help_text.rstrip()
    if "default" in text.lower():
        return text
    if kind is bool:
        note = "on by default" if default else "off by default"
    elif kind == "store_false":
        note = "off by default" if default else "on by default"
    elif default is None or default == []:
        return text
    else:
        note = f"default: {default}"
    return f"{text} ({note})" if text else f"({note})"


def add_megatron_flags(parser: argparse.ArgumentParser) -> None:
    """The alias and accepted-flag options (their own --help groups)."""
    known = {s for action in parser._actions for s in action.option_strings}
    aliases = parser.add_argument_group(
        ALIAS_GROUP, "Megatron values are translated too: --attention-backend fused = te, unfused/local = sdpa; "
        "--tokenizer-type SentencePieceTokenizer/Llama2Tokenizer/GPTSentencePieceTokenizer = sentencepiece, "
        "TikTokenizer = tiktoken, HuggingFaceTokenizer = huggingface. Megatron flags we do not support are refused "
        "with our nearest equivalent (docs/training.md has the table).")
    for flag, (target, value, note) in {**ALIASES, **DEFAULTING_ALIASES}.items():
        if flag in known:
            continue
        if target not in known:  # an alias of a flag that does not exist (yet) is not offered
            continue
        aliases.add_argument(flag, dest=_alias_dest(flag), action="store_true", default=None,
                             help=f"= {target} {value} ({note})")
    accepted = parser.add_argument_group(ACCEPTED_GROUP)
    for flag, (values, note) in ACCEPTED.items():
        if flag in known:
            continue
        if values is None:
            accepted.add_argument(flag, dest=_accepted_dest(flag), action="store_true", default=None, help=note)
        else:
            shown = flag.lstrip("-").upper().replace("-", "_") if values == ("*",) else "{" + ",".join(values) + "}"
            accepted.add_argument(flag, dest=_accepted_dest(flag), default=None, metavar=shown, help=note)


def _alias_dest(flag: str) -> str:
    return "megatron_alias__" + flag.lstrip("-").replace("-", "_")


def _accepted_dest(flag: str) -> str:
    return "megatron_accepted__" + flag.lstrip("-").replace("-", "_")


def translate_values(argv: list[str]) -> list[str]:
    """Megatron values of our flags -> ours (`--attention-backend fused` -> `te`), in both `--f v` and `--f=v`."""
    out = list(argv)
    for i, token in enumerate(out):
        flag, eq, value = token.partition("=")
        if flag in VALUE_ALIASES:
            if eq:
                out[i] = f"{flag}={VALUE_ALIASES[flag].get(value, value)}"
            elif i + 1 < len(out):
                out[i + 1] = VALUE_ALIASES[flag].get(out[i + 1], out[i + 1])
    return out


def explain_unknown(extras: list[str], parser: argparse.ArgumentParser) -> str:
    """One line per unknown flag: not supported + our nearest equivalent, or the closest names we have."""
    ours = sorted({s for action in parser._actions for s in action.option_strings if s.startswith("--")})
    lines = []
    for token in extras:
        if not token.startswith("-"):
            continue  # the value of an unknown flag
        flag = token.partition("=")[0]
        if flag in UNSUPPORTED:
            lines.append(f"{flag} (Megatron-LM) is not supported; nearest equivalent: {UNSUPPORTED[flag]}")
        else:
            close = difflib.get_close_matches(flag, ours, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else "; see --help for the flags"
            lines.append(f"{flag} is neither a Chrysalis flag nor a Megatron-LM flag we know{hint}")
    stray = [t for t in extras if not t.startswith("-")]
    if not lines and stray:
        lines.append(f"unexpected argument(s) {' '.join(stray)} (every setting is a --flag)")
    return "\n  ".join(lines)


class MegatronCompatibleParser(argparse.ArgumentParser):
    """argparse, plus Megatron values translated before parsing and unknown flags explained after."""

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(translate_values(sys.argv[1:] if args is None else list(args)), namespace)

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(explain_unknown(extras, self))
        return parsed


def apply_megatron_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """After parsing: aliases set our flags, accepted flags are checked. Returns notes (one per accepted flag used).

    Raises:
        ValueError: an alias contradicting an explicit value of our flag, or an accepted flag with another value.
    """
    dest_of = {option: action.dest for action in parser._actions for option in action.option_strings}
    notes = []
    for flag, (target, value, _) in ALIASES.items():
        if not getattr(args, _alias_dest(flag), None) or target not in dest_of:
            continue
        dest = dest_of[target]
        current = getattr(args, dest, None)
        if current is not None and current != value:
            raise ValueError(f"{flag} means {target} {value}, but {target} {current} was also given")
        setattr(args, dest, value)
    for flag, (target, value, _) in DEFAULTING_ALIASES.items():
        if getattr(args, _alias_dest(flag), None) and target in dest_of \
                and getattr(args, dest_of[target], None) is None:
            setattr(args, dest_of[target], value)
    for flag, (values, note) in ACCEPTED.items():
        given = getattr(args, _accepted_dest(flag), None)
        if given is None:
            continue
        if values not in (None, ("*",)) and str(given) not in values:
            raise ValueError(f"{flag} {given}: not supported ({note}); accepted: {', '.join(values)}")
        notes.append(f"note: {flag} accepted: {note}")
    tokenizer = getattr(args, _accepted_dest("--tokenizer-type"), None)
    if tokenizer is not None:
        _check_tokenizer_type(tokenizer, getattr(args, dest_of.get("--data-path", ""), None) or [])
    return notes


def _check_tokenizer_type(given: str, data_path: list[str]) -> None:
    """`--tokenizer-type` (Megatron's or our name) must be the type every build of `--data-path` was made with."""
    ours = TOKENIZER_TYPES.get(given, given)
    if ours not in ("sentencepiece", "tiktoken", "huggingface"):
        raise ValueError(f"--tokenizer-type {given}: not supported; the shards' tokenizer is one of sentencepiece "
                         "(SentencePieceTokenizer, Llama2Tokenizer), tiktoken (TikTokenizer), huggingface "
                         "(HuggingFaceTokenizer), chosen by python -m preprocess build")
    for item in data_path:
        manifest = Path(item) / "manifest.json"
        if not manifest.is_file():
            continue  # a weight, or a missing build (the trainer names it)
        try:
            built = json.loads(manifest.read_text()).get("tokenizer", {}).get("type")
        except (OSError, ValueError, AttributeError):
            continue
        if built and built != ours:
            raise ValueError(f"--tokenizer-type {given} (= {ours}) but {item} was built with a {built} tokenizer; "
                             "the shards' tokenizer is the one used")


def print_notes(notes: list[str]) -> None:
    if notes and os.environ.get("RANK", "0") == "0":
        for note in notes:
            print(note, file=sys.stderr)
