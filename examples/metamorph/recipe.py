"""The MetaMorph recipe as Chrysalis launch flags: data blends, the learning-rate batch-scaling rule, and one-epoch
iteration counts.

    # --data-path blend with the paper's data-family weights (one preprocess build per family under ROOT)
    python examples/metamorph/recipe.py blend --root /data/metamorph --by family
    # LR for another global batch: base LR x sqrt(batch / base batch) (MetaMorph README, from Cambrian-1)
    python examples/metamorph/recipe.py lr --stage 2 --global-batch-size 768          # -> 4.9003e-05
    # every flag of a stage: the recipe file, the blend, the scaled LR and one epoch of iterations
    python examples/metamorph/recipe.py command --stage 2 --root /data/metamorph --by family \
        --global-batch-size 1536 -- --load /ckpt/stage1 --save /ckpt/stage2

Where each number comes from: README.md in this directory. Only the standard library is used, so this runs
anywhere (a login node without torch).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@dataclass(frozen=True)
class Dataset:
    family: str
    name: str
    samples_k: float  # thousands of samples, MetaMorph data figure


# facebookresearch/metamorph README, "Training Data Breakdown" (images/metamorph_data.png): samples per dataset.
DATASETS = (
    Dataset("imageqa", "cambrian7m", 7067.0),
    Dataset("videoqa", "videostar", 1055.0),
    Dataset("videoqa", "sharevideo", 540.0),
    Dataset("generation", "metaclip", 5000.0),
    Dataset("pure_video", "howto100m", 1193.0),
    Dataset("pure_video", "ssv2", 220.0),
    Dataset("visual_thinking", "visualcot", 361.0),
    Dataset("visual_thinking", "vstar", 148.0),
    Dataset("image_to_image", "instructpix2pix", 313.0),
    Dataset("image_to_image", "aurora", 169.0),
)
# The same figure's family shares (percent of all samples), as printed there.
FAMILY_PERCENT = {"imageqa": 44.0, "generation": 31.1, "videoqa": 9.9, "pure_video": 8.8, "visual_thinking": 3.2,
                  "image_to_image": 3.0}

# MetaMorph README "Hyperparameters" (LLaMA-3.1 8B): global batch and learning rate of each stage.
BASE = {1: {"global_batch_size": 448, "lr": 3.74e-5}, 2: {"global_batch_size": 1536, "lr": 6.93e-5}}
RECIPES = {1: HERE / "stage1.yaml", 2: HERE / "stage2.yaml"}


def scaled_lr(base_lr: float, base_batch: int, batch: int) -> float:
    """MetaMorph's rule for another global batch (from Cambrian-1): lr = base_lr * sqrt(batch / base_batch)."""
    if base_batch <= 0 or batch <= 0:
        raise ValueError("batch sizes must be positive")
    return base_lr * math.sqrt(batch / base_batch)


def paper_weights(by: str) -> dict[str, float]:
    """Blend weights (fractions summing to 1) per dataset ("family/name") or per family."""
    if by == "dataset":
        total = sum(d.samples_k for d in DATASETS)
        return {f"{d.family}/{d.name}": d.samples_k / total for d in DATASETS}
    if by == "family":
        total = sum(FAMILY_PERCENT.values())
        return {family: pct / total for family, pct in FAMILY_PERCENT.items()}
    raise ValueError(f"--by must be dataset or family, got {by!r}")


def _manifest(build: Path) -> dict:
    path = build / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{build}: not a preprocess build (no manifest.json)")
    return json.loads(path.read_text())


def build_sequences(build: Path) -> int:
    return int(_manifest(build)["counts"]["sequences"])


def blend(root: Path | None, by: str = "family", weights: str = "paper", mapping: dict[str, str] | None = None,
          allow_missing: bool = False) -> list[tuple[float, Path]]:
    """(weight, build directory) pairs for --data-path.

    Args:
        root: builds live at ROOT/<family> (by family) or ROOT/<family>/<dataset> (by dataset).
        weights: `paper` (the figure's sample shares) or `sequences` (each build's packed-sequence count: exactly one
            pass over every build per epoch, the reference's single epoch over the concatenated data).
        mapping: explicit directories for some keys ({"imageqa": "/data/x"}), overriding ROOT.
        allow_missing: drop keys without a build and renormalise (the dropped weight is reported); otherwise a
            missing build is an error naming it.
    """
    shares = paper_weights(by)
    mapping = dict(mapping or {})
    unknown = sorted(set(mapping) - set(shares))
    if unknown:
        raise ValueError(f"unknown {by} name(s) {', '.join(unknown)}; known: {', '.join(shares)}")
    pairs, missing = [], []
    for key, share in shares.items():
        path = Path(mapping[key]) if key in mapping else (root / key if root is not None else None)
        if path is None or not (path / "manifest.json").is_file():
            missing.append(f"{key} ({path})" if path else key)
            continue
        pairs.append((share if weights == "paper" else float(build_sequences(path)), path))
    if weights not in ("paper", "sequences"):
        raise ValueError(f"--weights must be paper or sequences, got {weights!r}")
    if missing and not allow_missing:
        raise ValueError("no preprocess build for " + ", ".join(missing) + " (build it, map it with --map, or pass "
                         "--allow-missing to renormalise over the rest)")
    if not pairs:
        raise ValueError("no build found for any data family")
    if missing:
        dropped = sum(shares[m.split(" ")[0]] for m in missing)
        print(f"note: no build for {', '.join(missing)}: dropped {100 * dropped:.1f}% of the paper's mixture and "
              "renormalised the rest", file=sys.stderr)
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]


def data_path_args(pairs: list[tuple[float, Path]]) -> list[str]:
    return [x for w, p in pairs for x in (f"{w:.6f}", str(p))]


def epoch_iterations(pairs: list[tuple[float, Path]], global_batch_size: int, train_fraction: float = 1.0) -> int:
    """Optimizer steps of one epoch: every packed sequence of the blend once, ceil(sequences / global batch)."""
    sequences = sum(build_sequences(p) for _, p in pairs) * train_fraction
    return max(1, math.ceil(sequences / global_batch_size))


def read_recipe(path: Path) -> dict[str, str]:
    """`key: value` lines of a recipe file (the subset of YAML the recipes use: scalars, no nesting)."""
    values = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if ":" not in line:
            raise ValueError(f"{path}:{number}: expected 'key: value'")
        key, value = line.split(":", 1)
        values[key.strip()] = value.strip()
    return values


def stage_command(stage: int, pairs: list[tuple[float, Path]], global_batch_size: int | None = None, *,
                  recipe: Path | None = None, extra: list[str] | None = None,
                  repo_relative: bool = False) -> list[str]:
    """pretrain_gpt_vision.py flags for one stage: the recipe file, then what depends on the data and the batch.

    Args:
        repo_relative: name a recipe inside this repository relative to its root (train.sbatch runs from the
            repository root, which is /opt/chrysalis inside the container), so the flags work on any machine.
    """
    recipe = Path(recipe or RECIPES[stage]).resolve()
    values = read_recipe(recipe)
    batch = global_batch_size or int(values["global-batch-size"])
    base = BASE[stage]
    if recipe in RECIPES.values():
        lr = scaled_lr(base["lr"], base["global_batch_size"], batch)
    else:  # a variant (tiny): its own lr was derived from the base recipe at its own batch
        lr = scaled_lr(float(values["lr"]), int(values["global-batch-size"]), batch)
    split = [float(x) for x in values.get("split", "100,0,0").split(",")]
    iters = epoch_iterations(pairs, batch, split[0] / sum(split))
    shown = recipe
    if repo_relative and recipe.is_relative_to(REPO):
        shown = recipe.relative_to(REPO)
    return ["--config", str(shown), "--data-path", *data_path_args(pairs), "--global-batch-size", str(batch),
            "--lr", f"{lr:.6g}", "--train-iters", str(iters), *(extra or [])]


def _mapping(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--map takes NAME=DIR, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))  # the first sentence
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"blend": "print the --data-path blend", "command": "print every training flag of a stage"}
    for name in ("blend", "command"):
        p = sub.add_parser(name, help=helps[name])
        p.add_argument("--root", type=Path, default=None,
                       help="one preprocess build per data family (or dataset, --by dataset) under ROOT/<name>")
        p.add_argument("--by", choices=["family", "dataset"], default="family",
                       help="builds per data family or per dataset (default: family)")
        p.add_argument("--weights", choices=["paper", "sequences"], default="paper",
                       help="paper: the MetaMorph figure's shares; sequences: each build's packed sequences "
                            "(default: paper)")
        p.add_argument("--map", action="append", default=[], metavar="NAME=DIR",
                       help="a build outside --root (repeatable)")
        p.add_argument("--allow-missing", action="store_true",
                       help="drop families without a build and renormalise the rest (default: an error)")
    lr = sub.add_parser("lr", help="print the learning rate at another global batch")
    for p in (lr, sub.choices["command"]):
        p.add_argument("--stage", type=int, choices=[1, 2], required=True)
        p.add_argument("--global-batch-size", type=int, default=None,
                       help="default: the stage's (448 / 1536); the LR follows sqrt(batch / base batch)")
    sub.choices["command"].add_argument("--recipe", type=Path, default=None, help="default: stage<N>.yaml")
    sub.choices["command"].add_argument("extra", nargs="*", help="more training flags (after --)")
    args = parser.parse_args(argv)
    try:
        if args.command == "lr":
            base = BASE[args.stage]
            batch = args.global_batch_size or base["global_batch_size"]
            print(f"{scaled_lr(base['lr'], base['global_batch_size'], batch):.6g}")
            return 0
        pairs = blend(args.root, args.by, args.weights, _mapping(args.map), args.allow_missing)
        if args.command == "blend":
            print(" ".join(data_path_args(pairs)))
        else:
            print(" ".join(stage_command(args.stage, pairs, args.global_batch_size, recipe=args.recipe,
                                         extra=args.extra, repo_relative=True)))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
