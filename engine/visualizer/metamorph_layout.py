"""MetaMorph's published visualizer layout, read without running code.

The reference (facebookresearch/metamorph, `inference/load_visualization.py`) publishes its visualizer as

    adapter_checkpoint.pt   torch.save of {"model_state_dict": the adapter's state dict, "optimizer_state_dict",
                            "scheduler_state_dict", "global_step", "model_config"}
    model_config.json       the adapter's constructor arguments (input_dim, hidden_dim, output_dim, num_tokens,
                            num_layers, num_heads, mode)
    unet_checkpoint.pt      torch.save of {"model_state_dict": the fine-tuned SD 1.5 UNet's state dict, ...}

and loads it on top of a Stable Diffusion 1.5 pipeline (VAE, scheduler, UNet config). The reference reads the `.pt`
files with plain `torch.load` (unrestricted pickle); here they are read with `torch.load(weights_only=True)` only
(tensors and plain containers; anything else is refused before it can run) and memory-mapped, so the optimizer
states stored beside the weights are not read into memory. `unet_checkpoint.pt` is optional: without it the Stable
Diffusion UNet is used unchanged (the reference trains the adapter alone unless `--unfreeze_unet`).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from engine.visualizer.model import ConditionerConfig, Visualizer, check_stable_diffusion_dir

ADAPTER_FILE = "adapter_checkpoint.pt"
CONFIG_FILE = "model_config.json"
UNET_FILE = "unet_checkpoint.pt"


def read_weights_only(path: Path) -> dict[str, torch.Tensor]:
    """The `model_state_dict` of a reference checkpoint, read with `weights_only=True` (a `module.` prefix left by
    DDP is removed)."""
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # legacy (non-zip) serialization cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: refused, it holds more than tensors and plain containers, and nothing read from "
                         f"a checkpoint may run code (torch.load weights_only=True: {first})") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path}: not a readable torch checkpoint ({err})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model_state_dict"), dict):
        raise ValueError(  # noqa: TRY004 (bad input, not a bug)
            f"{path}: expected a dict with a 'model_state_dict' entry (MetaMorph's layout)")
    state = checkpoint["model_state_dict"]
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: 'model_state_dict' entry {bad[0]!r} is not a named tensor")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    missing, unexpected = module.state_dict().keys() - state.keys(), state.keys() - module.state_dict().keys()
    if missing or unexpected:
        raise ValueError(f"{path}: does not match the model built from its config: missing "
                         f"{sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                         f"{sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}")
    for key, value in module.state_dict().items():
        if value.shape != state[key].shape:
            raise ValueError(f"{path}: {key} has shape {list(state[key].shape)}, the model expects "
                             f"{list(value.shape)}")
    module.load_state_dict(state, strict=True)


def load_metamorph_visualizer(directory: str | Path, stable_diffusion: str | Path | None, *,
                              resolution: int = 512, log=None) -> Visualizer:
    """A `Visualizer` from MetaMorph's published files in `directory` and a local Stable Diffusion 1.5 directory."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    directory = Path(directory)
    if stable_diffusion is None:
        raise ValueError(f"{directory} holds MetaMorph's published visualizer ({ADAPTER_FILE}); it renders on top of "
                         "Stable Diffusion 1.5: pass a local SD 1.5 directory with --stable-diffusion")
    sd = check_stable_diffusion_dir(stable_diffusion)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing (MetaMorph's layout has it beside {ADAPTER_FILE})")
    try:
        values = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from None
    config = ConditionerConfig.from_dict(values, str(config_path))

    unet_path = directory / UNET_FILE
    if unet_path.is_file():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sd, subfolder="unet",
                                                                                 local_files_only=True))
        _load_strict(unet, read_weights_only(unet_path), unet_path)
    else:
        if log:
            log(f"{directory} has no {UNET_FILE}: using {sd}/unet unchanged")
        unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet", local_files_only=True,
                                                    low_cpu_mem_usage=False)
    vae = AutoencoderKL.from_pretrained(sd, subfolder="vae", local_files_only=True, low_cpu_mem_usage=False)
    scheduler = DDPMScheduler.from_pretrained(sd, subfolder="scheduler", local_files_only=True)
    visualizer = Visualizer(unet, vae, scheduler, resolution=resolution, conditioner=config)
    adapter_path = directory / ADAPTER_FILE
    _load_strict(visualizer.conditioner, read_weights_only(adapter_path), adapter_path)
    return visualizer
