"""The visualizer: a latent diffusion model (diffusers) conditioned on VPiT's 64 x 1152 SigLIP tokens.

As in MetaMorph, a Stable-Diffusion-style `UNet2DConditionModel` + `AutoencoderKL` is conditioned through its
cross-attention on the visual tokens, mapped to the UNet's cross-attention width by a small projector
(LayerNorm -> Linear -> GELU -> Linear). Classifier-free guidance needs an unconditional input: a learned
`null_condition` (64 x width) that training substitutes for the projected tokens with probability `cfg_prob`.

Starting weights: a local Stable Diffusion 1.5 directory (`unet/`, `vae/`, `scheduler/`, loaded with
`from_pretrained`, never downloaded), or `tiny_visualizer_components()` (random, for tests and the demo).

Saved layout (`Visualizer.save`):

    VIZ/visualizer.json        {"format": "chrysalis-visualizer", "format_version": 1, "resolution", ...}
    VIZ/unet/, VIZ/vae/        diffusers `save_pretrained` (safetensors)
    VIZ/scheduler/             the noise scheduler's config (DDPM for training; rendering uses DDIM with it)
    VIZ/condition.safetensors  the projector and the null condition
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import TOKENS_PER_IMAGE, VISION_DIM

FORMAT = "chrysalis-visualizer"
FORMAT_VERSION = 1


class TokenConditionProjector(nn.Module):
    """SigLIP tokens [B, 64, 1152] -> cross-attention context [B, 64, width] (MetaMorph's MLP with LayerNorm)."""

    def __init__(self, vision_dim: int, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(vision_dim)
        self.fc1 = nn.Linear(vision_dim, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(tokens))))


def tiny_visualizer_components(seed: int = 0, resolution: int = 32):
    """(unet, vae, scheduler) of a tiny random config: 2-level UNet (32, 64 channels), 2-level VAE (4x smaller
    latents than SD's 8x: a 32 px image has 16 x 16 latents), 1000-step DDPM schedule. Built from config only."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            latent_channels=4, norm_num_groups=8, sample_size=resolution)
        unet = UNet2DConditionModel(sample_size=resolution // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(32, 64),
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, prediction_type="epsilon",
                              steps_offset=1)
    return unet, vae, scheduler


class Visualizer(nn.Module):
    """UNet + VAE + token projector; `training_loss` for training, `render` for images.

    Build with `Visualizer.tiny()`, `Visualizer.from_stable_diffusion(path)` or `Visualizer.load(path)`.
    The VAE stays frozen (as in Stable Diffusion fine-tuning); the UNet, projector and null condition train.
    """

    def __init__(self, unet, vae, scheduler, *, resolution: int, vision_dim: int = VISION_DIM,
                 tokens_per_image: int = TOKENS_PER_IMAGE, seed: int = 0):
        super().__init__()
        self.unet = unet
        self.vae = vae.requires_grad_(False).eval()
        self.scheduler = scheduler
        self.resolution = resolution
        width = unet.config.cross_attention_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.projector = TokenConditionProjector(vision_dim, width)
        self.null_condition = nn.Parameter(torch.zeros(tokens_per_image, width))
        self.vision_dim = vision_dim
        self.tokens_per_image = tokens_per_image

    # ------------------------------------------------------------------------------------------- building
    @classmethod
    def tiny(cls, seed: int = 0, resolution: int = 32) -> Visualizer:
        unet, vae, scheduler = tiny_visualizer_components(seed, resolution)
        return cls(unet, vae, scheduler, resolution=resolution, seed=seed)

    @classmethod
    def from_stable_diffusion(cls, path: str | Path, resolution: int = 512, seed: int = 0) -> Visualizer:
        """Starts from a local Stable Diffusion 1.5 directory (diffusers layout); its text encoder is not used."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        path = Path(path)
        for sub in ("unet", "vae", "scheduler"):
            if not (path / sub).is_dir():
                raise FileNotFoundError(f"{path} is not a local Stable Diffusion directory: {path / sub} is missing "
                                        "(nothing is downloaded)")
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True,
                                                    low_cpu_mem_usage=False)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True,
                                            low_cpu_mem_usage=False)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        return cls(unet, vae, scheduler, resolution=resolution, seed=seed)

    def save(self, directory: str | Path) -> Path:
        """Writes the saved layout (module docstring); `visualizer.json` last, so it marks a complete save."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(directory / "unet", safe_serialization=True)
        self.vae.save_pretrained(directory / "vae", safe_serialization=True)
        self.scheduler.save_pretrained(directory / "scheduler")
        state = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        state["null_condition"] = self.null_condition.detach()
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(directory / "condition.safetensors"))
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "resolution": self.resolution,
                "vision_dim": self.vision_dim, "tokens_per_image": self.tokens_per_image}
        (directory / "visualizer.json").write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = None) -> Visualizer:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_path = directory / "visualizer.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory} is not a saved visualizer: {meta_path} is missing")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: not a version-{FORMAT_VERSION} {FORMAT}")
        unet = UNet2DConditionModel.from_pretrained(directory / "unet", local_files_only=True,
                                                    low_cpu_mem_usage=False)
        vae = AutoencoderKL.from_pretrained(directory / "vae", local_files_only=True, low_cpu_mem_usage=False)
        scheduler = DDPMScheduler.from_pretrained(directory / "scheduler", local_files_only=True)
        model = cls(unet, vae, scheduler, resolution=meta["resolution"], vision_dim=meta["vision_dim"],
                    tokens_per_image=meta["tokens_per_image"])
        state = load_file(str(directory / "condition.safetensors"))
        model.projector.load_state_dict({k.removeprefix("projector."): v for k, v in state.items()
                                         if k.startswith("projector.")})
        with torch.no_grad():
            model.null_condition.copy_(state["null_condition"])
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return model.to(device).eval()

    # ------------------------------------------------------------------------------------------- training
    def condition(self, tokens: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 64, vision_dim] tokens -> [B, 64, width] context; rows where `drop` is True get the null condition."""
        context = self.projector(tokens.to(self.null_condition.dtype))
        if drop is not None:
            context = torch.where(drop[:, None, None], self.null_condition.expand_as(context), context)
        return context

    def training_loss(self, pixels: torch.Tensor, tokens: torch.Tensor, *, cfg_prob: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """ε-prediction MSE of one batch.

        Args:
            pixels: [B, 3, R, R] in [-1, 1].
            tokens: [B, 64, vision_dim] visual tokens of those images.
            cfg_prob: probability of replacing a sample's condition by the null condition.
            generator: CPU generator for the latent sample, noise, timesteps and dropout (reproducible steps).
        """
        b = pixels.shape[0]
        device = pixels.device
        with torch.no_grad():
            posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
            eps = torch.randn(posterior.mean.shape, generator=generator).to(device, posterior.mean.dtype)
            latents = (posterior.mean + posterior.std * eps) * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        drop = (torch.rand(b, generator=generator) < cfg_prob).to(device)
        predicted = self.unet(noisy, timesteps, encoder_hidden_states=self.condition(tokens.to(device), drop)).sample
        return F.mse_loss(predicted.float(), noise.float())

    # ------------------------------------------------------------------------------------------- rendering
    @torch.no_grad()
    def render(self, tokens: torch.Tensor, *, guidance_scale: float = 3.0, num_inference_steps: int = 50,
               size: int | None = None, seed: int = 0, output_type: str = "pil"):
        """Images from visual tokens, with classifier-free guidance, through diffusers' StableDiffusionPipeline
        (given the contexts as `prompt_embeds`; no text encoder) with a DDIM scheduler.

        Args:
            tokens: [N, 64, vision_dim] (or [64, vision_dim]) visual tokens.
            size: output side in pixels, a multiple of the VAE's downsampling factor (default: the training
                resolution).
            output_type: "pil" (list of PIL images) or "pt" (float tensor [N, 3, size, size] in [0, 1]).
        """
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        if tokens.dim() == 2:
            tokens = tokens[None]
        size = size or self.resolution
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if size % factor:
            raise ValueError(f"--render-size {size} must be a multiple of the VAE's downsampling factor {factor}")
        device = self.null_condition.device
        context = self.condition(tokens.to(device))
        uncond = self.null_condition.expand_as(context)
        pipeline = StableDiffusionPipeline(
            vae=self.vae, text_encoder=None, tokenizer=None, unet=self.unet,
            scheduler=DDIMScheduler.from_config(self.scheduler.config), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        # Initial latents drawn on CPU, so a seed renders the same on any device.
        latent_shape = (context.shape[0], self.unet.config.in_channels, size // factor, size // factor)
        latents = torch.randn(latent_shape, generator=generator).to(device, self.unet.dtype)
        out = pipeline(prompt_embeds=context.to(self.unet.dtype), negative_prompt_embeds=uncond.to(self.unet.dtype),
                       height=size, width=size, num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, latents=latents, generator=generator, output_type=output_type)
        return out.images
