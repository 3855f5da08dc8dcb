"""`pretrain_gpt_vision.py --recipe metaquery`: the MetaQuery flags on top of the VPiT trainer's.

Every shared concept keeps the VPiT trainer's flag (`--data-path`, `--micro-batch-size`, `--global-batch-size`,
`--lr`, `--save`, `--load`, `--load-hf`, `--tensor-model-parallel-size`, `--data-parallel-sharding`, `--bf16`,
...; `engine.training.config`). The MetaQuery section adds its own (`MetaQueryConfig`), and the optimizer's
defaults become the reference's where the user did not set them (flag or YAML):

    --lr 1e-4  --min-lr 1e-5 (cosine_with_min_lr)  --lr-warmup-iters 5000  --weight-decay 0.1
    --adam-beta1 0.9  --adam-beta2 0.95  --clip-grad 0.5          (train.py's TrainingArguments, configs/*.yaml)
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# flag -> (field, type, help); `bool` flags are store_true.
_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--decoder": ("decoder", str, ("local diffusers directory: unet/ (SD 1.5 layout, DDPM epsilon loss) or "
                                   "transformer/ (Sana, flow matching), with scheduler/ and vae/")),
    "--llm": ("llm", str, ("the frozen LLM: a Chrysalis checkpoint (model-only, or a VPiT training --save dir); "
                           "--load-hf imports a Hugging Face LLaMA instead")),
    "--num-queries": ("num_queries", int, ("learnable queries appended after the prompt (default: the "
                                           "reference's, 77 for a UNet decoder, 256 for Sana)")),
    "--connector-layers": ("connector_layers", int, ("transformer-encoder blocks of the connector (default: 24, "
                                                     "the reference's connector_num_hidden_layers)")),
    "--train-decoder": ("train_decoder", bool, ("train the decoder too (the reference's Sana configs do; its SD "
                                                "configs freeze the UNet)")),
    "--freeze-queries": ("freeze_queries", bool, ("keep the queries at their initial values: no backward through "
                                                  "the LLM at all (only the connector and optionally the decoder "
                                                  "train)")),
    "--cfg-prob": ("cfg_prob", float, ("classifier-free guidance dropout of a text-only prompt (default: 0.1, the "
                                       "reference's text-to-image rate)")),
    "--cfg-instruct-prob": ("cfg_instruct_prob", float, ("with prompt images: text dropped with this probability, "
                                                         "images with this probability, both with half of it "
                                                         "(default: 0.2, the reference's instruction rates)")),
}

# The reference's optimizer and schedule (facebookresearch/metaquery train.py TrainingArguments + configs/*.yaml),
# applied to flags the user did not give.
REFERENCE_OPTIMIZER = {"--lr": "1e-4", "--min-lr": "1e-5", "--lr-warmup-iters": "5000", "--weight-decay": "0.1",
                       "--adam-beta1": "0.9", "--adam-beta2": "0.95", "--adam-eps": "1e-8", "--clip-grad": "0.5",
                       "--lr-decay-style": "cosine"}


@dataclass(kw_only=True)
class MetaQueryConfig:
    """The MetaQuery section of a run (flags in `_FLAGS`).

    Args:
        decoder: the diffusers directory; its contents choose the decoder and the loss.
        llm: a Chrysalis checkpoint of the frozen LLM (None: `--load-hf`, or a random LLM from the model flags,
            for tests and benchmarks only).
        num_queries: None = the reference's default for the decoder kind.
    """

    decoder: str | None = None
    llm: str | None = None
    num_queries: int | None = None
    connector_layers: int = 24
    train_decoder: bool = False
    freeze_queries: bool = False
    cfg_prob: float = 0.1
    cfg_instruct_prob: float = 0.2

    def validate(self) -> None:
        problems = []
        if not self.decoder:
            problems.append("--decoder DIR is required (a local diffusers directory with unet/ or transformer/)")
        if self.num_queries is not None and self.num_queries < 1:
            problems.append(f"--num-queries must be >= 1, got {self.num_queries}")
        if self.connector_layers < 0:
            problems.append(f"--connector-layers must be >= 0, got {self.connector_layers}")
        for name in ("cfg_prob", "cfg_instruct_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= (1.0 if name == "cfg_prob" else 2.0 / 3.0):
                problems.append(f"--{name.replace('_', '-')} {value} is out of range")
        if problems:
            raise ValueError("invalid MetaQuery config:\n  " + "\n  ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_metaquery_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, usage=argparse.SUPPRESS)
    group = parser.add_argument_group("MetaQuery (--recipe metaquery)")
    for flag, (name, typ, help_text) in _FLAGS.items():
        if typ is bool:
            group.add_argument(flag, dest=name, action="store_true", default=None, help=help_text)
        else:
            group.add_argument(flag, dest=name, type=typ, default=None, help=help_text)
    return parser


def _yaml_keys(argv: list[str]) -> set[str]:
    """Flag names set by a `--config run.yaml` (normalised to `--flag-name`)."""
    path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    if path is None or not Path(path).is_file():
        return set()
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    return {"--" + str(k).lstrip("-").replace("_", "-") for k in data} if isinstance(data, dict) else set()


def parse_metaquery_config(argv: list[str]):
    """argv (without `--recipe metaquery`) -> (TrainingConfig, MetaQueryConfig). Raises ValueError."""
    from engine.training.config import parse_training_config

    known, rest = build_metaquery_parser().parse_known_args(argv)
    mq = MetaQueryConfig(**{k: v for k, v in vars(known).items() if v is not None})
    given = {a.split("=", 1)[0] for a in rest if a.startswith("--")} | _yaml_keys(rest)
    defaults = [x for flag, value in REFERENCE_OPTIMIZER.items() if flag not in given for x in (flag, value)]
    shape = {"--model-preset", "--num-layers"} & given
    if not shape and (mq.llm or "--load-hf" in given):
        defaults += ["--model-preset", "tiny"]  # a placeholder: the LLM's shape comes from its checkpoint
    config = parse_training_config(defaults + list(rest))
    mq.validate()
    return config, mq


def metaquery_help() -> str:
    """The MetaQuery flags, then the optimizer defaults that replace the VPiT ones printed below them."""
    defaults = " ".join(f"{flag} {value}" for flag, value in REFERENCE_OPTIMIZER.items())
    return (build_metaquery_parser().format_help().strip("\n")
            + "\n\nOptimizer defaults of this recipe (the reference's), which replace the VPiT defaults shown\n"
            + f"below wherever neither a flag nor the YAML sets them:\n  {defaults}\n")
