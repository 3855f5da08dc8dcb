"""Train a tiny autoencoder (diffusers `AutoencoderKL` layout) on the images of a preprocess build.

    python -m engine.visualizer.autoencoder --data-path OUT --image-root IMAGES [--input records.jsonl ...] \\
        --resolution 32 --train-iters 300 --save VAE

The tiny visualizer's autoencoder is random unless trained, and a random frozen autoencoder turns every latent into
noise: its pictures cannot resemble anything. Stable Diffusion ships a trained one; for the CPU demo this trains
the same architecture, at a tiny size, on the bundled images (reconstruction L1 + MSE and a small KL term, as in
Stable Diffusion's autoencoder minus its perceptual and adversarial terms), then sets `scaling_factor` to 1 / the
standard deviation of the latents, as Stable Diffusion's was chosen, so the diffusion model sees unit-variance
latents. The result is an ordinary diffusers directory (`config.json`, `diffusion_pytorch_model.safetensors`) that
`python -m engine.visualizer.train --vae` builds on. A few hundred steps memorise a dozen images; it is not a
general-purpose autoencoder.

Every step draws its batch from (seed, iteration); the run is deterministic for a given seed and thread count.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(kw_only=True)
class AutoencoderTrainingConfig:
    data_path: str
    image_root: str
    save: str
    inputs: list[str] | None = None
    resolution: int = 32
    levels: int = 2
    micro_batch_size: int = 8
    train_iters: int = 300
    lr: float = 2e-3
    kl_weight: float = 1e-6
    log_interval: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.levels not in (2, 3):
            raise ValueError(f"--levels must be 2 or 3, got {self.levels}")
        factor = 2 ** (self.levels - 1)
        if self.resolution < 4 * factor or self.resolution % factor:
            raise ValueError(f"--resolution must be a multiple of {factor} and >= {4 * factor} with --levels "
                             f"{self.levels}, got {self.resolution}")
        if self.micro_batch_size < 1 or self.train_iters < 1:
            raise ValueError("--micro-batch-size and --train-iters must be >= 1")


def tiny_autoencoder(resolution: int, seed: int = 0, levels: int = 2):
    """The tiny visualizer's autoencoder config: 4 latent channels, `levels` levels of 32/64(/64) channels, so
    2x (levels=2) or 4x (levels=3) smaller latents than pixels (Stable Diffusion's VAE: 4 levels, 8x)."""
    import torch
    from diffusers import AutoencoderKL

    channels = (32, 64, 64)[:levels]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=channels,
                             down_block_types=("DownEncoderBlock2D",) * levels,
                             up_block_types=("UpDecoderBlock2D",) * levels,
                             latent_channels=4, norm_num_groups=8, sample_size=resolution)


def load_autoencoder(directory: str | Path):
    """An `AutoencoderKL` from a local diffusers directory (never downloaded)."""
    from diffusers import AutoencoderKL

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"--vae {directory}: not an autoencoder directory ({directory / 'config.json'} is "
                                "missing); train one with python -m engine.visualizer.autoencoder")
    return AutoencoderKL.from_pretrained(directory, local_files_only=True, low_cpu_mem_usage=False)


def build_pixels(config: AutoencoderTrainingConfig):
    """[N, 3, R, R] in [-1, 1]: every image of the build found under the image root, decoded once."""
    import torch

    from engine.visualizer.data import ImageEmbeddingPairs

    data = ImageEmbeddingPairs(config.data_path, config.image_root, config.resolution, config.inputs)
    return torch.stack([data[i][0] for i in range(len(data))])


def train_autoencoder(config: AutoencoderTrainingConfig, log=print) -> list[float]:
    """Trains, sets the scaling factor, saves; returns the per-step reconstruction losses."""
    import torch
    import torch.nn.functional as F

    from engine.visualizer.train import _batch_indices

    pixels = build_pixels(config)
    log(f"autoencoder: {len(pixels)} images from {config.data_path} at {config.resolution} px")
    vae = tiny_autoencoder(config.resolution, config.seed, config.levels).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.train_iters, eta_min=config.lr / 10)
    losses = []
    tic = time.perf_counter()
    for iteration in range(config.train_iters):
        batch = pixels[_batch_indices(len(pixels), config.micro_batch_size, iteration, config.seed)]
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + iteration + 1)
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(latents).sample
        reconstruction = F.l1_loss(recon, batch) + F.mse_loss(recon, batch)
        loss = reconstruction + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(reconstruction.item())
        done = iteration + 1
        if done % config.log_interval == 0 or done == config.train_iters:
            elapsed = time.perf_counter() - tic
            log(f"autoencoder iteration {done:>5}/{config.train_iters} | reconstruction loss (L1 + MSE) "
                f"{losses[-1]:.4f} | {elapsed / min(config.log_interval, done):.2f} s/step")
            tic = time.perf_counter()
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean
        recon = vae.decode(latents).sample.clamp(-1, 1)
        psnr = psnr_db((recon + 1) / 2, (pixels + 1) / 2)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    save = Path(config.save)
    vae.save_pretrained(save, safe_serialization=True)
    log(f"autoencoder: reconstruction PSNR {psnr.mean():.1f} dB (min {psnr.min():.1f}) over the {len(pixels)} images; "
        f"scaling_factor {vae.config.scaling_factor:.4f}; saved to {save.resolve()}")
    return losses


def psnr_db(a, b):
    """Per-image PSNR in dB of [N, 3, H, W] tensors in [0, 1]."""
    import torch

    mse = ((a - b) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.visualizer.autoencoder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, metavar="OUT", help="a preprocess build")
    p.add_argument("--image-root", required=True, metavar="DIR", help="the build's --image-root")
    p.add_argument("--input", action="append", default=None, metavar="FILE",
                   help="the build's input records (default: the paths in its manifest)")
    p.add_argument("--save", required=True, metavar="VAE", help="output directory (diffusers layout)")
    p.add_argument("--resolution", type=int, default=32, help="image side in pixels (default: %(default)s)")
    p.add_argument("--levels", type=int, default=2, choices=(2, 3),
                   help="encoder levels: latents 2x (2) or 4x (3) smaller than the image (default: %(default)s)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--train-iters", type=int, default=300, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW, cosine-decayed to lr/10 (default: %(default)s)")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="(default: %(default)s)")
    p.add_argument("--log-interval", type=int, default=50, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    from engine.cli_help import show_defaults

    return show_defaults(p)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = AutoencoderTrainingConfig(
            data_path=args.data_path, image_root=args.image_root, inputs=args.input, save=args.save,
            resolution=args.resolution, levels=args.levels, micro_batch_size=args.micro_batch_size,
            train_iters=args.train_iters,
            lr=args.lr, kl_weight=args.kl_weight, log_interval=args.log_interval, seed=args.seed)
        train_autoencoder(config)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
