"""The visualizer: a latent diffusion model (diffusers) conditioned on VPiT's 64 x 1152 SigLIP tokens.

As in MetaMorph (facebookresearch/metamorph, `visualization/train.py` and `inference/adapter.py`), a
Stable-Diffusion-style `UNet2DConditionModel` + `AutoencoderKL` is conditioned through its cross-attention on the
visual tokens, mapped to the UNet's cross-attention width by the reference's adapter (`SigLIPConditioner`:
Linear(1152 -> 2048) -> LayerNorm -> ReLU -> Linear(2048 -> width) -> LayerNorm) and padded with zero rows from 64
to CLIP's 77 context positions. The unconditional input of classifier-free guidance is all zeros (training drops a
sample's condition to zeros with probability `cfg_prob`, 0.8 in the reference's launch script).

Starting weights: a local Stable Diffusion 1.5 directory (`unet/`, `vae/`, `scheduler/`, loaded with
`from_pretrained`, never downloaded), MetaMorph's published visualizer on top of one
(`engine/visualizer/metamorph_layout.py`), or `tiny_visualizer_components()` (random, for tests and the demo;
`vae=` takes an autoencoder trained by `engine.visualizer.autoencoder`).

Saved layout (`Visualizer.save`):

    VIZ/visualizer.json          {"format": "chrysalis-visualizer", "format_version": 2, "resolution",
                                  "conditioner": {input_dim, hidden_dim, output_dim, num_layers, num_tokens, ...}}
    VIZ/unet/, VIZ/vae/          diffusers `save_pretrained` (safetensors)
    VIZ/scheduler/               the noise scheduler's config (DDPM for training; rendering uses DDIM with it)
    VIZ/conditioner.safetensors  the adapter, with the reference's parameter names (layers.i, norms.i)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import TOKENS_PER_IMAGE, VISION_DIM

FORMAT = "chrysalis-visualizer"
FORMAT_VERSION = 2


@dataclass(kw_only=True)
class ConditionerConfig:
    """The reference's `model_config.json` (the fields of its `SimplifiedSigLIPProjector`).

    Args:
        hidden_dim: width of the hidden layers (2048 in MetaMorph's launch script; its code default is 4096).
        output_dim: the UNet's cross-attention width (768 for Stable Diffusion 1.5).
        num_layers: linear layers (2: in -> hidden -> out).
        num_tokens: context positions given to the UNet; the 64 projected tokens are followed by zero rows up to
            this count (77, CLIP's text length, which Stable Diffusion's cross-attention was trained on).
        num_heads: used only by the reference's cross-attention modes; kept so its config round-trips.
        mode: only "mlp" (the published visualizer's); the reference's "xattn"/"transformer" modes are refused.
    """

    input_dim: int = VISION_DIM
    hidden_dim: int = 2048
    output_dim: int = 768
    num_layers: int = 2
    num_tokens: int = 77
    num_heads: int = 8
    mode: str = "mlp"

    def __post_init__(self) -> None:
        if self.mode != "mlp":
            raise ValueError(f"conditioner mode {self.mode!r} is not supported: only the reference's 'mlp' mode "
                             "(its published visualizer's) is implemented")
        for name in ("input_dim", "hidden_dim", "output_dim", "num_layers", "num_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"conditioner {name} must be a positive integer, got {value!r}")

    @classmethod
    def from_dict(cls, values: dict, source: str = "conditioner config") -> ConditionerConfig:
        if not isinstance(values, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(values).__name__}")  # noqa: TRY004
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None


class SigLIPConditioner(nn.Module):
    """SigLIP tokens [B, 64, input_dim] -> cross-attention context [B, 64, output_dim].

    MetaMorph's adapter in its "mlp" mode: Linear -> LayerNorm -> ReLU for every layer but the last, then
    Linear -> LayerNorm. Parameter names (`layers.i`, `norms.i`) are the reference's, so the `model_state_dict` of
    its `adapter_checkpoint.pt` loads unchanged.
    """

    def __init__(self, config: ConditionerConfig):
        super().__init__()
        self.config = config
        dims = [config.input_dim] + [config.hidden_dim] * max(config.num_layers - 1, 1) + [config.output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.norms = nn.ModuleList(nn.LayerNorm(b) for b in dims[1:])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens
        for layer, norm in zip(self.layers[:-1], self.norms[:-1]):
            x = F.relu(norm(layer(x)))
        return self.norms[-1](self.layers[-1](x))


def tiny_visualizer_components(seed: int = 0, resolution: int = 32, vae=None, prediction_type: str = "epsilon"):
    """(unet, vae, scheduler) of a tiny random config: 2-level UNet (32, 64 channels), 2-level VAE (4x smaller
    latents than SD's 8x: a 32 px image has 16 x 16 latents), 1000-step DDPM schedule. Built from config only;
    `vae` replaces the random autoencoder (e.g. one trained by `engine.visualizer.autoencoder`);
    `prediction_type` is the UNet's target (diffusers' names: epsilon as SD 1.5, v_prediction, sample)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from engine.visualizer.autoencoder import tiny_autoencoder

    if vae is None:
        vae = tiny_autoencoder(resolution, seed)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(sample_size=resolution // factor, in_channels=vae.config.latent_channels,
                                    out_channels=vae.config.latent_channels, layers_per_block=1,
                                    block_out_channels=(32, 64),
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, prediction_type=prediction_type,
                              steps_offset=1)
    return unet, vae, scheduler


class Visualizer(nn.Module):
    """UNet + VAE + conditioner; `training_loss` for training, `render` for images.

    Build with `Visualizer.tiny()`, `Visualizer.from_stable_diffusion(path)`, `Visualizer.load(path)` (ours, or
    MetaMorph's published layout with `stable_diffusion=`). The VAE stays frozen (as in the reference); the UNet
    and the conditioner train.
    """

    def __init__(self, unet, vae, scheduler, *, resolution: int, conditioner: ConditionerConfig | None = None,
                 tokens_per_image: int = TOKENS_PER_IMAGE, seed: int = 0):
        super().__init__()
        width = unet.config.cross_attention_dim
        conditioner = conditioner or ConditionerConfig(output_dim=width)
        if conditioner.output_dim != width:
            raise ValueError(f"conditioner output_dim {conditioner.output_dim} != the UNet's cross_attention_dim "
                             f"{width}")
        if conditioner.num_tokens < tokens_per_image:
            raise ValueError(f"conditioner num_tokens {conditioner.num_tokens} < {tokens_per_image} tokens per image")
        self.unet = unet
        self.vae = vae.requires_grad_(False).eval()
        self.scheduler = scheduler
        self.resolution = resolution
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conditioner = SigLIPConditioner(conditioner)
        self.tokens_per_image = tokens_per_image

    @property
    def vision_dim(self) -> int:
        return self.conditioner.config.input_dim

    # ------------------------------------------------------------------------------------------- building
    @classmethod
    def tiny(cls, seed: int = 0, resolution: int = 32, vae=None, conditioner: ConditionerConfig | None = None,
             prediction_type: str = "epsilon") -> Visualizer:
        unet, vae, scheduler = tiny_visualizer_components(seed, resolution, vae=vae, prediction_type=prediction_type)
        conditioner = conditioner or ConditionerConfig(output_dim=unet.config.cross_attention_dim)
        return cls(unet, vae, scheduler, resolution=resolution, conditioner=conditioner, seed=seed)

    @classmethod
    def from_stable_diffusion(cls, path: str | Path, resolution: int = 512, seed: int = 0,
                              conditioner: ConditionerConfig | None = None) -> Visualizer:
        """Starts from a local Stable Diffusion 1.5 directory (diffusers layout); its text encoder is not used."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        path = check_stable_diffusion_dir(path)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True,
                                                    low_cpu_mem_usage=False)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True,
                                            low_cpu_mem_usage=False)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        return cls(unet, vae, scheduler, resolution=resolution, conditioner=conditioner, seed=seed)

    def save(self, directory: str | Path) -> Path:
        """Writes the saved layout (module docstring); `visualizer.json` last, so it marks a complete save."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(directory / "unet", safe_serialization=True)
        self.vae.save_pretrained(directory / "vae", safe_serialization=True)
        self.scheduler.save_pretrained(directory / "scheduler")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.conditioner.state_dict().items()},
                  str(directory / "conditioner.safetensors"))
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "resolution": self.resolution,
                "tokens_per_image": self.tokens_per_image,
                "conditioner": dataclasses.asdict(self.conditioner.config)}
        tmp = directory / "visualizer.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        tmp.replace(directory / "visualizer.json")
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = None,
             stable_diffusion: str | Path | None = None, log=None) -> Visualizer:
        """A visualizer saved by `save`, or MetaMorph's published layout (`adapter_checkpoint.pt`,
        `model_config.json`, `unet_checkpoint.pt`) on top of the local Stable Diffusion 1.5 `stable_diffusion`."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_path = directory / "visualizer.json"
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if not meta_path.is_file():
            from engine.visualizer.metamorph_layout import ADAPTER_FILE, load_metamorph_visualizer

            if (directory / ADAPTER_FILE).is_file():
                return load_metamorph_visualizer(directory, stable_diffusion, log=log).to(device).eval()
            if not directory.is_dir():
                raise FileNotFoundError(f"visualizer {directory}: no such directory")
            raise FileNotFoundError(f"{directory} is not a visualizer: it has neither {meta_path.name} (saved by "
                                    f"engine.visualizer) nor {ADAPTER_FILE} (MetaMorph's published layout)")
        try:
            meta = json.loads(meta_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{meta_path}: not valid JSON ({err})") from None
        except (ValueError, RecursionError) as err:  # valid syntax json refuses: nesting, a huge integer
            raise ValueError(f"{meta_path}: not usable JSON ({type(err).__name__})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: not a {FORMAT} description")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {meta.get('format_version')} is not {FORMAT_VERSION} "
                             "(version 1 had a different conditioner; train the visualizer again)")
        conditioner = ConditionerConfig.from_dict(meta.get("conditioner"), f"{meta_path} 'conditioner'")
        unet = UNet2DConditionModel.from_pretrained(directory / "unet", local_files_only=True,
                                                    low_cpu_mem_usage=False)
        vae = AutoencoderKL.from_pretrained(directory / "vae", local_files_only=True, low_cpu_mem_usage=False)
        scheduler = DDPMScheduler.from_pretrained(directory / "scheduler", local_files_only=True)
        model = cls(unet, vae, scheduler, resolution=meta["resolution"], conditioner=conditioner,
                    tokens_per_image=meta["tokens_per_image"])
        model.conditioner.load_state_dict(load_file(str(directory / "conditioner.safetensors")))
        return model.to(device).eval()

    # ------------------------------------------------------------------------------------------- training
    def condition(self, tokens: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 64, vision_dim] tokens -> [B, num_tokens, width] context: the conditioner's output followed by zero
        rows (the reference pads 64 -> 77); rows where `drop` is True are all zeros (the unconditional input)."""
        weight = self.conditioner.layers[0].weight
        context = self.conditioner(tokens.to(weight.device, weight.dtype))
        pad = self.conditioner.config.num_tokens - context.shape[1]
        if pad > 0:
            context = torch.cat([context, context.new_zeros(context.shape[0], pad, context.shape[2])], dim=1)
        if drop is not None:
            context = torch.where(drop[:, None, None], torch.zeros_like(context), context)
        return context

    def training_loss(self, pixels: torch.Tensor, tokens: torch.Tensor, *, cfg_prob: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """MSE of the UNet's prediction of one batch: of the noise ε for the scheduler's `prediction_type` "epsilon"
        (the reference's, SD 1.5's), of the velocity for "v_prediction", of the clean latents for "sample".

        Args:
            pixels: [B, 3, R, R] in [-1, 1].
            tokens: [B, 64, vision_dim] visual tokens of those images.
            cfg_prob: probability of replacing a sample's condition by the unconditional (zero) input.
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
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        elif kind == "sample":
            target = latents
        else:
            raise ValueError(f"scheduler prediction_type {kind!r} is not supported (epsilon, v_prediction, sample)")
        return F.mse_loss(predicted.float(), target.float())

    # ------------------------------------------------------------------------------------------- rendering
    @torch.no_grad()
    def render(self, tokens: torch.Tensor, *, guidance_scale: float = 3.0, num_inference_steps: int = 50,
               size: int | None = None, seed: int = 0, output_type: str = "pil"):
        """Images from visual tokens, with classifier-free guidance against the zero context (as the reference),
        through diffusers' StableDiffusionPipeline (given the contexts as `prompt_embeds`; no text encoder) with a
        DDIM scheduler.

        Args:
            tokens: [N, 64, vision_dim] (or [64, vision_dim]) visual tokens.
            size: output side in pixels, a multiple of the VAE's downsampling factor (default: the training
                resolution).
            output_type: "pil" (list of PIL images) or "pt" (float tensor [N, 3, size, size] in [0, 1]).
        """
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        if tokens.dim() == 2:
            tokens = tokens[None]
        if tokens.dim() != 3 or tokens.shape[1:] != (self.tokens_per_image, self.vision_dim):
            raise ValueError(f"visual tokens must be [N, {self.tokens_per_image}, {self.vision_dim}], "
                             f"got {list(tokens.shape)}")
        size = size or self.resolution
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if size % factor:
            raise ValueError(f"--render-size {size} must be a multiple of the VAE's downsampling factor {factor}")
        device = self.unet.device
        context = self.condition(tokens.to(device))
        pipeline = StableDiffusionPipeline(
            vae=self.vae, text_encoder=None, tokenizer=None, unet=self.unet,
            scheduler=DDIMScheduler.from_config(self.scheduler.config), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        # Initial latents drawn on CPU, so a seed renders the same on any device.
        latent_shape = (context.shape[0], self.unet.config.in_channels, size // factor, size // factor)
        latents = torch.randn(latent_shape, generator=generator).to(device, self.unet.dtype)
        context = context.to(self.unet.dtype)
        out = pipeline(prompt_embeds=context, negative_prompt_embeds=torch.zeros_like(context),
                       height=size, width=size, num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, latents=latents, generator=generator, output_type=output_type)
        return out.images


def check_stable_diffusion_dir(path: str | Path) -> Path:
    """`path` as a Path when it holds a diffusers Stable Diffusion layout (unet/, vae/, scheduler/)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Stable Diffusion directory {path}: no such directory (weights are read from a "
                                "local path; nothing is downloaded)")
    for sub in ("unet", "vae", "scheduler"):
        if not (path / sub).is_dir():
            raise FileNotFoundError(f"{path} is not a local Stable Diffusion directory: {path / sub} is missing "
                                    "(nothing is downloaded)")
    return path
