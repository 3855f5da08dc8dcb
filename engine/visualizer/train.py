"""Train the visualizer on a preprocess build: ε-prediction MSE, AdamW, classifier-free-guidance dropout.

    python -m engine.visualizer.train --data-path OUT --image-root IMAGES [--input records.jsonl ...] \\
        [--pretrained SD15_DIR | --tiny] --train-iters 1000 --micro-batch-size 8 --lr 1e-4 --cfg-prob 0.1 \\
        --save VIZ [--save-interval 500]

Images are paired with their stored embeddings by sha256 (see engine/visualizer/data.py). Without
`--pretrained` a tiny random visualizer is trained (tests, demo). `--save` is a complete visualizer
(`Visualizer.load` reads it) plus `training_state.pt` (optimizer, iteration); running again with the same
`--save` resumes from it. Every step draws its batch order, noise and dropout from (seed, iteration), so a resumed
run takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.visualizer.model import Visualizer

TRAINING_STATE = "training_state.pt"


@dataclass(kw_only=True)
class VisualizerTrainingConfig:
    data_path: str
    image_root: str
    save: str
    inputs: list[str] | None = None
    pretrained: str | None = None
    resolution: int | None = None  # default: 32 tiny, 512 from Stable Diffusion
    micro_batch_size: int = 8
    train_iters: int = 1000
    lr: float = 1e-4
    weight_decay: float = 1e-2
    cfg_prob: float = 0.1
    save_interval: int | None = None
    log_interval: int = 10
    seed: int = 0
    num_workers: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.cfg_prob <= 1:
            raise ValueError(f"--cfg-prob must be in [0, 1], got {self.cfg_prob}")
        if self.micro_batch_size < 1 or self.train_iters < 0:
            raise ValueError("--micro-batch-size must be >= 1 and --train-iters >= 0")


def _batch_indices(n: int, batch: int, iteration: int, seed: int) -> list[int]:
    """The samples of step `iteration`: consecutive slices of per-epoch permutations seeded by (seed, epoch)."""
    out = []
    position = iteration * batch
    while len(out) < batch:
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = min(batch - len(out), n - offset)
        out.extend(order[offset:offset + take].tolist())
        position += take
    return out


def train_visualizer(config: VisualizerTrainingConfig, log=print) -> list[float]:
    """Runs training; returns the loss of every step run (this invocation)."""
    from engine.visualizer.data import ImageEmbeddingPairs

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    save = Path(config.save)
    start = 0
    state = None
    if (save / "visualizer.json").is_file() and (save / TRAINING_STATE).is_file():
        visualizer = Visualizer.load(save, device=device)
        state = torch.load(save / TRAINING_STATE, map_location="cpu", weights_only=True)
        start = int(state["iteration"])
        log(f"resuming from {save} at iteration {start}")
    elif config.pretrained:
        visualizer = Visualizer.from_stable_diffusion(config.pretrained, resolution=config.resolution or 512,
                                                      seed=config.seed).to(device)
    else:
        visualizer = Visualizer.tiny(seed=config.seed, resolution=config.resolution or 32).to(device)
    visualizer.train()
    visualizer.vae.eval()
    data = ImageEmbeddingPairs(config.data_path, config.image_root, visualizer.resolution, config.inputs)
    log(f"{len(data)} image/embedding pairs from {config.data_path}")
    params = [p for p in visualizer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])

    losses = []
    for iteration in range(start, config.train_iters):
        items = [data[i] for i in _batch_indices(len(data), config.micro_batch_size, iteration, config.seed)]
        pixels = torch.stack([p for p, _ in items]).to(device)
        tokens = torch.stack([t for _, t in items]).to(device)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + iteration + 1)
        loss = visualizer.training_loss(pixels, tokens, cfg_prob=config.cfg_prob, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        done = iteration + 1
        if done % config.log_interval == 0 or done == config.train_iters:
            log(json.dumps({"iteration": done, "loss": round(losses[-1], 6)}))
        if (config.save_interval and done % config.save_interval == 0) or done == config.train_iters:
            save_training_checkpoint(visualizer, optimizer, done, config, save)
    return losses


def save_training_checkpoint(visualizer: Visualizer, optimizer, iteration: int, config, save: Path) -> None:
    """The visualizer, then the training state; the state file is replaced atomically, last."""
    visualizer.save(save)
    tmp = save / (TRAINING_STATE + ".tmp")
    torch.save({"iteration": iteration, "optimizer": optimizer.state_dict(), "config": asdict(config)}, tmp)
    tmp.replace(save / TRAINING_STATE)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.visualizer.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, metavar="OUT", help="a preprocess build")
    p.add_argument("--image-root", required=True, metavar="DIR", help="the build's --image-root")
    p.add_argument("--input", action="append", default=None, metavar="FILE",
                   help="the build's input records (default: the paths in its manifest)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--pretrained", metavar="SD15_DIR", help="local Stable Diffusion 1.5 directory (diffusers)")
    start.add_argument("--tiny", action="store_true", help="tiny random config (the default without --pretrained)")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--train-iters", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--cfg-prob", type=float, default=0.1,
                   help="probability of replacing a sample's condition by the null condition (MetaMorph: 0.8 "
                        "when starting from a text-conditioned Stable Diffusion 1.5)")
    p.add_argument("--save", required=True, metavar="VIZ")
    p.add_argument("--save-interval", type=int, default=None)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = VisualizerTrainingConfig(
            data_path=args.data_path, image_root=args.image_root, inputs=args.input, save=args.save,
            pretrained=args.pretrained, resolution=args.resolution, micro_batch_size=args.micro_batch_size,
            train_iters=args.train_iters, lr=args.lr, weight_decay=args.weight_decay, cfg_prob=args.cfg_prob,
            save_interval=args.save_interval, log_interval=args.log_interval, seed=args.seed, device=args.device)
        train_visualizer(config)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
