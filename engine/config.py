"""Typed model configuration, presets and their validation.

Flag names follow Megatron-LM (`--num-layers`, `--hidden-size`, ...) so launch scripts carry over; see
`add_model_args` / `model_config_from_args`.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

# VPiT constants: SigLIP so400m-patch14-384's width, and 8x8 pooled tokens per image.
VISION_DIM = 1152
TOKENS_PER_IMAGE = 64

# ModelConfig fields that fix the weights' shapes or meaning: weights load only into a model with the same values
# (checkpoints, --load-hf). The others (seq_length, attention backend, loss coefficient, fused losses) are run choices.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                       "num_query_groups", "rotary_base", "rope_scaling", "norm_epsilon", "tie_embeddings",
                       "vision_dim", "tokens_per_image")

AttentionBackend = Literal["auto", "sdpa", "flex", "flash", "te", "triton", "triton-fp8"]
ATTENTION_BACKEND_CHOICES = ("auto", "sdpa", "flex", "flash", "te", "triton", "triton-fp8")


@dataclass(kw_only=True)
class RopeScaling:
    """Llama-3.1 style RoPE frequency scaling (`rope_type: llama3` in Hugging Face configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(kw_only=True)
class ModelConfig:
    """Everything that fixes the VPiT LLaMA's shapes and numerics.

    Args:
        vocab_size: rows of the embedding and LM head, including `<image_start>`/`<image_end>` and any padding.
        real_vocab_size: how many of those rows are real tokens (ids a tokenizer can produce); rows
            `[real_vocab_size, vocab_size)` are padding (Megatron's `--make-vocab-size-divisible-by` x TP). Padded
            rows are initialised to zero, their logits are -inf (never in the softmax, never generated), so the
            math does not depend on the padding. None: every row is real.
        num_query_groups: KV heads for grouped-query attention (== num_attention_heads for MHA).
        ffn_hidden_size: SwiGLU inner width.
        rope_scaling: Llama-3.1 frequency scaling, or None for plain RoPE.
        tie_embeddings: share the token embedding with the LM head.
        attention_backend: `auto` (the fastest available on the device; `sdpa` on CPU), `sdpa` (portable
            reference), `flex` (FlexAttention, document block mask), `flash`, `te`, `triton`, `triton-fp8`
            (see engine.model.attention_backends).
        visual_loss_coef: weight of the (1 - cosine) visual-token loss.
        fused_linear_cross_entropy: compute the LM head and its cross-entropy in row chunks without the [N, V]
            logits (Triton, `chrysalis_kernels.linear_cross_entropy`; CUDA, or CPU under TRITON_INTERPRET=1).
        fused_visual_head_loss: continuous-token head + cosine loss with its activations recomputed in the
            backward (Triton, `chrysalis_kernels.visual_head_loss`); not with a tensor-parallel head.
    """

    vocab_size: int = 32000
    real_vocab_size: int | None = None
    hidden_size: int = 4096
    ffn_hidden_size: int = 11008
    num_layers: int = 32
    num_attention_heads: int = 32
    num_query_groups: int | None = None
    seq_length: int = 4096
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = False
    init_method_std: float = 0.02
    vision_dim: int = VISION_DIM
    tokens_per_image: int = TOKENS_PER_IMAGE
    attention_backend: AttentionBackend = "auto"
    visual_loss_coef: float = 1.0
    fused_linear_cross_entropy: bool = False
    fused_visual_head_loss: bool = False

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_real_tokens(self) -> int:
        """Rows of the vocabulary that are real tokens (`real_vocab_size`, or `vocab_size` when unpadded)."""
        return self.vocab_size if self.real_vocab_size is None else self.real_vocab_size

    @property
    def vocab_padding(self) -> int:
        """Padded rows at the end of the vocabulary (0 when unpadded)."""
        return self.vocab_size - self.num_real_tokens

    def validate(self) -> None:
        """Raises ValueError naming the flag to change."""
        problems = []
        for name in ("num_attention_heads", "num_query_groups"):  # divisors below: a 0 must not divide
            if getattr(self, name) <= 0:
                raise ValueError(f"invalid model config: --{name.replace('_', '-')} must be positive, "
                                 f"got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            problems.append(
                f"--hidden-size {self.hidden_size} must be divisible by --num-attention-heads {self.num_attention_heads}"
            )
        elif self.head_dim % 2:
            problems.append(f"head dim {self.head_dim} must be even for RoPE: change --hidden-size or --num-attention-heads")
        if self.num_attention_heads % self.num_query_groups:
            problems.append(
                f"--num-attention-heads {self.num_attention_heads} must be divisible by "
                f"--num-query-groups {self.num_query_groups}"
            )
        for name in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "seq_length"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.real_vocab_size is not None and not 0 < self.real_vocab_size <= self.vocab_size:
            problems.append(f"real vocabulary {self.real_vocab_size} must be in [1, --vocab-size {self.vocab_size}] "
                            "(the padded size)")
        if self.seq_length > self.max_position_embeddings:
            problems.append(
                f"--seq-length {self.seq_length} exceeds --max-position-embeddings {self.max_position_embeddings}"
            )
        if self.attention_backend not in ATTENTION_BACKEND_CHOICES:
            problems.append(f"--attention-backend must be one of {', '.join(ATTENTION_BACKEND_CHOICES)}, "
                            f"got {self.attention_backend!r}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))  # one error: line

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict[str, Any]] = {
    # Tests and the demo: a few seconds per step on one CPU core.
    "tiny": dict(vocab_size=512, hidden_size=64, ffn_hidden_size=176, num_layers=4, num_attention_heads=4,
                 num_query_groups=2, seq_length=512, max_position_embeddings=2048, rotary_base=10000.0,
                 norm_epsilon=1e-5),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, ffn_hidden_size=8192, num_layers=16,
                        num_attention_heads=32, num_query_groups=8, seq_length=4096, max_position_embeddings=131072,
                        rotary_base=500000.0, rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                                original_max_position_embeddings=8192),
                        norm_epsilon=1e-5, tie_embeddings=True),
    "llama3.1-8b": dict(vocab_size=128256, hidden_size=4096, ffn_hidden_size=14336, num_layers=32,
                        num_attention_heads=32, num_query_groups=8, seq_length=4096, max_position_embeddings=131072,
                        rotary_base=500000.0, rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                                original_max_position_embeddings=8192),
                        norm_epsilon=1e-5),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, ffn_hidden_size=11008, num_layers=32,
                      num_attention_heads=32, num_query_groups=32, seq_length=4096, max_position_embeddings=4096,
                      rotary_base=10000.0, norm_epsilon=1e-5),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Builds a preset config, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown --model-preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# Megatron flag -> ModelConfig field.
_MODEL_FLAGS = {
    "--num-layers": ("num_layers", int),
    "--hidden-size": ("hidden_size", int),
    "--ffn-hidden-size": ("ffn_hidden_size", int),
    "--num-attention-heads": ("num_attention_heads", int),
    "--num-query-groups": ("num_query_groups", int),
    "--seq-length": ("seq_length", int),
    "--max-position-embeddings": ("max_position_embeddings", int),
    "--rotary-base": ("rotary_base", float),
    "--vocab-size": ("vocab_size", int),
    "--norm-epsilon": ("norm_epsilon", float),
    "--init-method-std": ("init_method_std", float),
    "--visual-loss-coef": ("visual_loss_coef", float),
}


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds `--model-preset` and Megatron's model-shape flags; explicit flags override the preset."""
    group = parser.add_argument_group("model")
    group.add_argument("--model-preset", choices=sorted(PRESETS), default=None)
    for flag, (dest, typ) in _MODEL_FLAGS.items():
        group.add_argument(flag, dest=dest, type=typ, default=None)
    group.add_argument("--untie-embeddings-and-output-weights", dest="untie_embeddings", action="store_true",
                       default=None)
    group.add_argument("--tie-embeddings", dest="tie_embeddings", action="store_true", default=None)
    group.add_argument("--attention-backend", choices=list(ATTENTION_BACKEND_CHOICES), default=None,
                       help="attention kernel for packed documents (auto: the fastest available; an unavailable "
                            "backend named explicitly is an error at start)")
    group.add_argument("--rope-scaling-factor", type=float, default=None,
                       help="enable Llama-3.1 RoPE scaling with this factor")
    return parser


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    fields: dict[str, Any] = dict(PRESETS[args.model_preset]) if args.model_preset else {}
    for dest, _ in _MODEL_FLAGS.values():
        value = getattr(args, dest, None)
        if value is not None:
            fields[dest] = value
    if getattr(args, "untie_embeddings", None):
        fields["tie_embeddings"] = False
    if getattr(args, "tie_embeddings", None):
        fields["tie_embeddings"] = True
    if getattr(args, "attention_backend", None):
        fields["attention_backend"] = args.attention_backend
    if getattr(args, "rope_scaling_factor", None):
        fields["rope_scaling"] = dict(fields.get("rope_scaling") or {}, factor=args.rope_scaling_factor)
    if not args.model_preset and "num_layers" not in fields:
        raise ValueError("give --model-preset or the model-shape flags (--num-layers, --hidden-size, ...)")
    return ModelConfig(**fields)
