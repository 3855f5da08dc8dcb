"""Train the visualizer on a preprocess build: ε-prediction MSE, AdamW, classifier-free-guidance dropout.

    python -m engine.visualizer.train --data-path OUT --image-root IMAGES [--input records.jsonl ...] \\
        [--pretrained SD15_DIR | --tiny [--vae AUTOENCODER]] --train-iters 1000 --micro-batch-size 8 --lr 1e-4 \\
        [--cfg-prob 0.8] --save VIZ [--save-interval 500]

Images are paired with their stored embeddings by sha256 (see engine/visualizer/data.py). Without
`--pretrained` a tiny random visualizer is trained (tests, demo), on the autoencoder of `--vae` when given (one
trained by `python -m engine.visualizer.autoencoder`; the tiny random one renders noise). `--save` is a complete
visualizer (`Visualizer.load` reads it) plus `training_state.pt` (optimizer, iteration); running again with the
same `--save` resumes from it. Every step draws its batch order, noise and dropout from (seed, iteration), so a
resumed run takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.visualizer.model import Visualizer

TRAINING_STATE = "training_state.pt"


@dataclass(kw_only=True)
class VisualizerTrainingConfig:
    data_path: str
    image_root: str
    save: str
    inputs: list[str] | None = None
    pretrained: str | None = None
    vae: str | None = None  # a trained autoencoder directory for the tiny config
    resolution: int | None = None  # default: 32 tiny (the --vae's sample_size), 512 from Stable Diffusion
    condition_hidden_dim: int = 2048
    condition_layers: int = 2
    condition_tokens: int = 77
    prediction_type: str = "epsilon"  # tiny config only; Stable Diffusion's scheduler config decides
    micro_batch_size: int = 8
    train_iters: int = 1000
    lr: float = 1e-4
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None
    weight_decay: float = 1e-2
    cfg_prob: float = 0.8
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
        decay = self.lr_decay_iters
        if self.lr_warmup_iters < 0 or (decay is not None and decay <= self.lr_warmup_iters):
            raise ValueError("need --lr-warmup-iters >= 0 and --lr-decay-iters > --lr-warmup-iters")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"--prediction-type must be epsilon, v_prediction or sample, got {self.prediction_type}")
        if self.pretrained and self.prediction_type != "epsilon":
            raise ValueError("--prediction-type goes with the tiny config; Stable Diffusion's scheduler config "
                             "decides it for --pretrained")
        if self.vae and self.pretrained:
            raise ValueError("--vae goes with the tiny config; --pretrained brings Stable Diffusion's own VAE")


def _batch_indices(n: int, batch: int, iteration: int, seed: int) -> list[int]:
    """The samples of step `iteration`: consecutive slices of per-epoch permutations seeded by (seed, epoch)."""
    import torch

    out = []
    position = iteration * batch
    while len(out) < batch:
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = min(batch - len(out), n - offset)
        out.extend(order[offset:offset + take].tolist())
        position += take
    return out


def lr_factor(iteration: int, warmup: int, decay: int | None) -> float:
    """The reference's schedule (visualization/train.py, `lr_lambda`): logarithmic warm-up to the peak over `warmup`
    steps, then linear decay to 0 at `decay` (constant after the warm-up when `decay` is None)."""
    if iteration < warmup:
        return math.log(iteration + 1) / math.log(warmup + 1)
    if decay is None:
        return 1.0
    return max(0.0, 1.0 - (iteration - warmup) / (decay - warmup))


def _conditioner_config(config: VisualizerTrainingConfig, width: int):
    from engine.visualizer.model import ConditionerConfig

    return ConditionerConfig(hidden_dim=config.condition_hidden_dim, output_dim=width,
                             num_layers=config.condition_layers, num_tokens=config.condition_tokens)


def build_visualizer(config: VisualizerTrainingConfig, log=print):
    """A fresh visualizer: from `--pretrained` Stable Diffusion, or the tiny config (on `--vae` when given)."""
    from engine.visualizer.model import Visualizer

    if config.pretrained:
        from diffusers import UNet2DConditionModel

        from engine.visualizer.model import check_stable_diffusion_dir

        check_stable_diffusion_dir(config.pretrained)  # else diffusers takes the path for a Hub id and says so
        log(f"loading Stable Diffusion from {config.pretrained}")

        width = UNet2DConditionModel.load_config(config.pretrained, subfolder="unet",
                                                 local_files_only=True)["cross_attention_dim"]
        return Visualizer.from_stable_diffusion(config.pretrained, resolution=config.resolution or 512,
                                                seed=config.seed, conditioner=_conditioner_config(config, width))
    vae = None
    if config.vae:
        from engine.visualizer.autoencoder import load_autoencoder

        vae = load_autoencoder(config.vae)
        log(f"building the tiny visualizer on the autoencoder {config.vae}")
    else:
        log("building the tiny visualizer (random, frozen autoencoder: its pictures are noise; see --vae)")
    resolution = config.resolution or (vae.config.sample_size if vae is not None else 32)
    from engine.visualizer.model import tiny_visualizer_components

    unet, vae, scheduler = tiny_visualizer_components(config.seed, resolution, vae=vae,
                                                      prediction_type=config.prediction_type)
    return Visualizer(unet, vae, scheduler, resolution=resolution,
                      conditioner=_conditioner_config(config, unet.config.cross_attention_dim), seed=config.seed)


def train_visualizer(config: VisualizerTrainingConfig, log=print) -> list[float]:
    """Runs training; returns the loss of every step run (this invocation)."""
    import torch

    from engine.visualizer.data import ImageEmbeddingPairs
    from engine.visualizer.model import Visualizer

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {config.device}: no CUDA device is available here (torch {torch.__version__}); "
                         "leave --device out or use --device cpu")
    save = Path(config.save)
    start = 0
    state = None
    if (save / "visualizer.json").is_file() and (save / TRAINING_STATE).is_file():
        visualizer = Visualizer.load(save, device=device)
        state = torch.load(save / TRAINING_STATE, map_location="cpu", weights_only=True)
        start = int(state["iteration"])
        log(f"resuming from {save} at iteration {start}")
    else:
        visualizer = build_visualizer(config, log).to(device)
    visualizer.train()
    visualizer.vae.eval()
    data = ImageEmbeddingPairs(config.data_path, config.image_root, visualizer.resolution, config.inputs)
    log(f"{len(data)} image/embedding pairs from {config.data_path}, {visualizer.resolution} px")
    params = [p for p in visualizer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])

    losses = []
    target = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[visualizer.scheduler.config.prediction_type]
    tic = time.perf_counter()
    for iteration in range(start, config.train_iters):
        items = [data[i] for i in _batch_indices(len(data), config.micro_batch_size, iteration, config.seed)]
        pixels = torch.stack([p for p, _ in items]).to(device)
        tokens = torch.stack([t for _, t in items]).to(device)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + iteration + 1)
        loss = visualizer.training_loss(pixels, tokens, cfg_prob=config.cfg_prob, generator=generator)
        for group in optimizer.param_groups:  # a function of the iteration: resuming needs no scheduler state
            group["lr"] = config.lr * lr_factor(iteration, config.lr_warmup_iters, config.lr_decay_iters)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        done = iteration + 1
        if done % config.log_interval == 0 or done == config.train_iters:
            recent = losses[-config.log_interval:]
            elapsed = time.perf_counter() - tic
            log(f"visualizer iteration {done:>6}/{config.train_iters} | diffusion loss ({target} MSE) "
                f"{losses[-1]:.4f} | mean of last {len(recent)} {sum(recent) / len(recent):.4f} | "
                f"{elapsed / len(recent):.2f} s/step")
            tic = time.perf_counter()
        if (config.save_interval and done % config.save_interval == 0) or done == config.train_iters:
            save_training_checkpoint(visualizer, optimizer, done, config, save)
    if losses:
        log(f"saved the visualizer to {save.resolve()}")
    return losses


def save_training_checkpoint(visualizer: Visualizer, optimizer, iteration: int, config, save: Path) -> None:
    """The visualizer, then the training state; the state file is replaced atomically, last."""
    import torch

    visualizer.save(save)
    tmp = save / (TRAINING_STATE + ".tmp")
    torch.save({"iteration": iteration, "optimizer": optimizer.state_dict(), "config": asdict(config)}, tmp)
    tmp.replace(save / TRAINING_STATE)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.visualizer.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data-path", required=True, metavar="OUT", help="a preprocess build")
    data.add_argument("--image-root", required=True, metavar="DIR", help="the build's --image-root")
    data.add_argument("--input", action="append", default=None, metavar="FILE",
                      help="the build's input records (default: the paths in its manifest)")
    model = p.add_argument_group("model")
    start = model.add_mutually_exclusive_group()
    start.add_argument("--pretrained", metavar="SD15_DIR", help="local Stable Diffusion 1.5 directory (diffusers)")
    start.add_argument("--tiny", action="store_true", help="tiny random config (the default without --pretrained)")
    model.add_argument("--vae", default=None, metavar="DIR",
                       help="with the tiny config: an autoencoder trained by engine.visualizer.autoencoder "
                            "(default: random, which renders noise)")
    model.add_argument("--resolution", type=int, default=None,
                       help="training image side (default: 512 with --pretrained, the --vae's size, else 32)")
    model.add_argument("--prediction-type", choices=("epsilon", "v_prediction", "sample"), default="epsilon",
                       help="the tiny UNet's target (default: %(default)s, SD 1.5's and the reference's)")
    model.add_argument("--condition-hidden-dim", type=int, default=2048,
                       help="conditioner hidden width (default: %(default)s, the reference's launch script)")
    model.add_argument("--condition-layers", type=int, default=2, help="conditioner linear layers (default: "
                                                                       "%(default)s)")
    model.add_argument("--condition-tokens", type=int, default=77,
                       help="context positions: 64 tokens + zero rows (default: %(default)s, CLIP's length)")
    train = p.add_argument_group("training")
    train.add_argument("--micro-batch-size", type=int, default=8, help="(default: %(default)s)")
    train.add_argument("--train-iters", type=int, default=1000, help="(default: %(default)s)")
    train.add_argument("--lr", type=float, default=1e-4,
                       help="AdamW learning rate (default: %(default)s; the reference fine-tunes SD 1.5 at 1e-5)")
    train.add_argument("--lr-warmup-iters", type=int, default=0,
                       help="logarithmic warm-up to --lr, as the reference (default: %(default)s; the reference: "
                            "4000)")
    train.add_argument("--lr-decay-iters", type=int, default=None,
                       help="linear decay to 0 at this iteration, as the reference (default: none, constant; the "
                            "reference: 16000)")
    train.add_argument("--weight-decay", type=float, default=1e-2, help="(default: %(default)s)")
    train.add_argument("--cfg-prob", type=float, default=0.8,
                       help="probability of replacing a sample's condition by zeros, the unconditional input "
                            "(default: %(default)s, the reference's)")
    train.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    train.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    out = p.add_argument_group("checkpoints and logging")
    out.add_argument("--save", required=True, metavar="VIZ", help="output directory; resumes from it when it "
                                                                  "holds a training state")
    out.add_argument("--save-interval", type=int, default=None, help="(default: only at the end)")
    out.add_argument("--log-interval", type=int, default=10, help="(default: %(default)s)")
    from engine.cli_help import show_defaults

    return show_defaults(p)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = VisualizerTrainingConfig(
            data_path=args.data_path, image_root=args.image_root, inputs=args.input, save=args.save,
            pretrained=args.pretrained, vae=args.vae, resolution=args.resolution,
            condition_hidden_dim=args.condition_hidden_dim, condition_layers=args.condition_layers,
            condition_tokens=args.condition_tokens, prediction_type=args.prediction_type,
            micro_batch_size=args.micro_batch_size,
            train_iters=args.train_iters, lr=args.lr, lr_warmup_iters=args.lr_warmup_iters,
            lr_decay_iters=args.lr_decay_iters, weight_decay=args.weight_decay, cfg_prob=args.cfg_prob,
            save_interval=args.save_interval, log_interval=args.log_interval, seed=args.seed, device=args.device)
        train_visualizer(config)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
