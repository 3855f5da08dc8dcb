"""The diffusion decoder of MetaQuery: a local diffusers directory, its denoising loss and its sampler.

`--decoder DIR` is a diffusers pipeline directory; what it holds chooses the decoder (nothing is downloaded):

  * `DIR/unet/` with a `UNet2DConditionModel` (Stable Diffusion 1.5 layout): DDPM noise schedule from
    `DIR/scheduler/`, loss = MSE to the noise (epsilon; `v_prediction` configs regress the velocity, as in the
    reference; `sample` configs the clean latents, which the reference refuses), timesteps uniform over the
    training steps (the reference's `loss_type: diff`).
  * `DIR/transformer/` with a `SanaTransformer2DModel`: flow matching (`loss_type: flow`): sigma from a
    `FlowMatchEulerDiscreteScheduler` built from `DIR/scheduler/` (uniform weighting), x_sigma = (1 - sigma) x +
    sigma * noise, target = noise - x.

`DIR/vae/` decodes rendered latents (its fingerprint must be the one the build's latents were made with).
Sampling follows the reference's `sample_images`: `DPMSolverMultistepScheduler` from `DIR/scheduler/` (a
`FlowMatchEulerDiscreteScheduler` config is used as is, with sigmas linspace(1, 1/n, n)).

Reference: facebookresearch/metaquery `models/metaquery.py` (`MetaQuery.forward`, `sample_images`,
`decode_latents`) and `models/model.py` (`MLLMInContext.forward`).
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DECODER_KINDS = {"unet": "UNet2DConditionModel", "sana": "SanaTransformer2DModel"}
SUBFOLDER = {"unet": "unet", "sana": "transformer"}
LOSS_TYPE = {"unet": "diff", "sana": "flow"}
# The reference's defaults per decoder (configs/llavaov0p5_sd.yaml, configs/llavaov0p5_sana.yaml).
DEFAULT_NUM_QUERIES = {"unet": 77, "sana": 256}
INPUT_SCALE = {"unet": 1.0, "sana": math.sqrt(5.5)}


def _read_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON config ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")  # noqa: TRY004 (bad input, not a bug)
    return data


@dataclass(frozen=True)
class DecoderInfo:
    """What `--decoder DIR` holds.

    Args:
        kind: "unet" or "sana".
        conditioning_width: D, what the connector maps to (`caption_channels`, `encoder_hid_dim` or
            `cross_attention_dim`, in the reference's order).
        latent_channels / sample_size: the decoder's input latents [C, sample_size, sample_size].
    """

    root: Path
    kind: str
    model_dir: Path
    scheduler_config: dict
    vae_dir: Path | None
    conditioning_width: int
    latent_channels: int
    sample_size: int

    @property
    def loss_type(self) -> str:
        return LOSS_TYPE[self.kind]


def inspect_decoder(path: str | Path) -> DecoderInfo:
    """Reads `--decoder DIR` (configs only).

    Raises:
        ValueError: naming what is missing (no unet/ or transformer/, no scheduler/, an unsupported class).
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"--decoder {path}: not a directory (a local diffusers pipeline directory with unet/ or "
                         "transformer/, scheduler/ and vae/; nothing is downloaded)")
    found = [kind for kind, sub in SUBFOLDER.items() if (root / sub / "config.json").is_file()]
    if not found:
        raise ValueError(f"--decoder {path}: neither unet/config.json (Stable Diffusion 1.5 layout) nor "
                         "transformer/config.json (Sana) is there")
    if len(found) > 1:
        raise ValueError(f"--decoder {path}: holds both unet/ and transformer/; keep the one to train with")
    kind = found[0]
    model_dir = root / SUBFOLDER[kind]
    config = _read_config(model_dir / "config.json")
    if config.get("_class_name") != DECODER_KINDS[kind]:
        raise ValueError(f"--decoder {path}: {model_dir / 'config.json'} is a {config.get('_class_name')!r}, "
                         f"expected {DECODER_KINDS[kind]}")
    scheduler_path = root / "scheduler" / "scheduler_config.json"
    if not scheduler_path.is_file():
        raise ValueError(f"--decoder {path}: {scheduler_path} is missing (the noise schedule)")
    width = config.get("caption_channels") or config.get("encoder_hid_dim") or config.get("cross_attention_dim")
    if isinstance(width, (list, tuple)):
        width = width[0]
    vae_dir = root / "vae" if (root / "vae" / "config.json").is_file() else None
    return DecoderInfo(root=root, kind=kind, model_dir=model_dir, scheduler_config=_read_config(scheduler_path),
                       vae_dir=vae_dir, conditioning_width=int(width), latent_channels=int(config["in_channels"]),
                       sample_size=int(config.get("sample_size") or 0))


def load_decoder_model(info: DecoderInfo, dtype: torch.dtype = torch.float32) -> nn.Module:
    import diffusers

    cls = getattr(diffusers, DECODER_KINDS[info.kind])
    return cls.from_pretrained(info.model_dir, local_files_only=True, low_cpu_mem_usage=False, torch_dtype=dtype)


def load_vae(info: DecoderInfo, dtype: torch.dtype = torch.float32):
    import diffusers

    if info.vae_dir is None:
        raise ValueError(f"--decoder {info.root}: vae/config.json is missing: rendering needs the autoencoder")
    cls = getattr(diffusers, _read_config(info.vae_dir / "config.json").get("_class_name", "AutoencoderKL"))
    return cls.from_pretrained(info.vae_dir, local_files_only=True, low_cpu_mem_usage=False, torch_dtype=dtype)


def _scheduler_from(cls, config: dict):
    """`cls` from a scheduler config of possibly another class, keeping only the keys `cls` takes (the reference
    loads DDPM/FlowMatch schedulers from Stable Diffusion's PNDM and Sana's DPM-Solver configs this way)."""
    known = set(inspect.signature(cls.__init__).parameters)
    return cls.from_config({k: v for k, v in config.items() if k in known})


class NoiseSchedule:
    """The training side of the decoder: noise level of each sample from a uniform u in [0, 1), the noisy input
    and the regression target. Everything random comes in as tensors (u, noise), drawn per sample by the data
    pipeline, so a step is a deterministic function of its batch."""

    def __init__(self, info: DecoderInfo):
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        self.kind = info.kind
        if info.kind == "unet":
            self.scheduler = _scheduler_from(DDPMScheduler, info.scheduler_config)
            self.prediction_type = self.scheduler.config.prediction_type
            if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
                raise ValueError(f"--decoder {info.root}: prediction_type {self.prediction_type!r} is not supported "
                                 "(epsilon or v_prediction as the reference, or sample)")
        else:
            self.scheduler = _scheduler_from(FlowMatchEulerDiscreteScheduler, info.scheduler_config)
            self.prediction_type = "flow"
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)

    def noisy_inputs(self, latents: torch.Tensor, noise: torch.Tensor, u: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps [B], target) for clean `latents` [B, C, h, w] (fp32)."""
        index = (u * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1)
        if self.kind == "unet":
            timesteps = index.to(latents.device)
            noisy = self.scheduler.add_noise(latents, noise, timesteps)
            if self.prediction_type == "epsilon":
                target = noise
            elif self.prediction_type == "v_prediction":
                target = self.scheduler.get_velocity(latents, noise, timesteps)
            else:  # "sample": the clean latents (x0), not in the reference; diffusers' samplers support it
                target = latents
            return noisy, timesteps, target
        timesteps = self.scheduler.timesteps[index.cpu()].to(latents.device)
        sigmas = self.scheduler.sigmas[index.cpu()].to(latents.device, latents.dtype).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        return noisy, timesteps, noise - latents


def decoder_forward(kind: str, model: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                    cond: torch.Tensor) -> torch.Tensor:
    """The decoder's prediction for noisy `latents` [B, C, h, w] conditioned on `cond` [B, N, D] (as the
    reference's `MLLMInContext.forward`: every query position is attended, no mask)."""
    if kind == "unet":
        return model(sample=latents, timestep=timesteps, encoder_hidden_states=cond).sample
    return model(hidden_states=latents, timestep=timesteps, encoder_hidden_states=cond).sample


def sampling_scheduler(info: DecoderInfo, steps: int):
    """The reference's sampler: DPM-Solver++ multistep from the directory's scheduler config, or its
    FlowMatchEuler scheduler with sigmas linspace(1, 1/n, n) when that is what the directory holds."""
    import numpy as np
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    if info.scheduler_config.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        scheduler = _scheduler_from(FlowMatchEulerDiscreteScheduler, info.scheduler_config)
        scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps))
        return scheduler
    scheduler = _scheduler_from(DPMSolverMultistepScheduler, info.scheduler_config)
    scheduler.set_timesteps(steps)
    return scheduler


def write_tiny_decoder(directory: str | Path, kind: str, vae, *, sample_size: int, conditioning_width: int = 32,
                       seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A tiny random decoder directory (tests, benchmarks, the CPU demo): `unet/` (2-level UNet, SD 1.5's DDPM
    schedule) or `transformer/` (2-layer Sana with Sana's flow DPM-Solver config), plus `vae/` = `vae` (e.g. the
    tiny autoencoder of `engine.visualizer.autoencoder`) and `scheduler/`."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, SanaTransformer2DModel, UNet2DConditionModel

    directory = Path(directory)
    channels = vae.config.latent_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "unet":
            model = UNet2DConditionModel(sample_size=sample_size, in_channels=channels, out_channels=channels,
                                         layers_per_block=1, block_out_channels=(32, 64),
                                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                         cross_attention_dim=conditioning_width, attention_head_dim=8,
                                         norm_num_groups=8)
            scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                      beta_end=0.012, clip_sample=False, prediction_type=prediction_type,
                                      steps_offset=1)
        elif kind == "sana":
            model = SanaTransformer2DModel(in_channels=channels, out_channels=channels, num_attention_heads=2,
                                           attention_head_dim=16, num_layers=2, num_cross_attention_heads=2,
                                           cross_attention_head_dim=16, cross_attention_dim=32,
                                           caption_channels=conditioning_width, sample_size=sample_size,
                                           patch_size=1)
            scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                                    use_flow_sigmas=True, flow_shift=3.0)
        else:
            raise ValueError(f"unknown decoder kind {kind!r}; expected one of {list(DECODER_KINDS)}")
    model.save_pretrained(directory / SUBFOLDER[kind], safe_serialization=True)
    scheduler.save_pretrained(directory / "scheduler")
    vae.save_pretrained(directory / "vae", safe_serialization=True)
    return directory
