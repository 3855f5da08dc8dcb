"""The frozen SigLIP vision encoder of VPiT: image bytes -> 64 L2-normalised 1152-d tokens.

Used offline by `preprocess` (every training image is encoded once, never during training) and online by
generation (to encode prompt images the same way the training data was encoded). Both go through
`VisionEncoder.encode_images`, so the two can never drift apart.

Pipeline, matching MetaMorph's SigLIP tower (metamorph/model/multimodal_encoder/siglip_encoder.py):

    bytes --decode, RGB, resize to image_size x image_size (bicubic)--> [3, H, W] in [0, 1]
          --normalise (x - 0.5) / 0.5 (SigLIP's mean = std = 0.5)----> pixel_values
          --SigLIP vision transformer, hidden_states[feature_layer]----> [B, g*g, 1152]  (g = 27 for so400m-384)
            (default -1: the last encoder layer's output, BEFORE post_layernorm, MetaMorph's select layer;
             `post_layernorm=True` applies the tower's final LayerNorm, i.e. `last_hidden_state`)
          --bilinear resize of the g x g grid to 8 x 8 (align_corners=False, fp32)--> [B, 64, 1152]
          --L2 normalise each token (fp32)--> cast to bf16

Only the layers up to `feature_layer` are kept and run. Decoding is `engine.data.image_decode` (PIL, or NVIDIA
DALI on the CPU or, with nvJPEG, on the encoder's GPU).

`describe_vision_encoder` gives what a manifest records (name, shapes, decoder, dtype, layer, fingerprint)
without building the model: the fingerprint hashes the config and the weight files (or, for the seeded random
encoders, their shape, seed and the library versions that make the weights), so a text-only build never
imports transformers.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import TOKENS_PER_IMAGE, VISION_DIM
from engine.data.image_decode import (  # noqa: F401  (re-exported: generation and the visualizer use them)
    DEFAULT_MAX_IMAGE_PIXELS,
    DaliImageDecoder,
    ImageDecodeError,
    PilImageDecoder,
    build_image_decoder,
    decode_image_pil,
    resolve_decoder_name,
)

if TYPE_CHECKING:
    import torch

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
POOLED_GRID = 8  # 8 x 8 = TOKENS_PER_IMAGE
assert POOLED_GRID * POOLED_GRID == TOKENS_PER_IMAGE
DEFAULT_FEATURE_LAYER = -1  # MetaMorph's mm_vision_select_layer: hidden_states[-1], before post_layernorm

# Shapes of the random encoders (no download ever happens). `tiny-random` keeps the real output width
# (1152, what the model's projector expects) but one layer, 4 heads and a 12 x 12 patch grid (168 px,
# patch 14): ~2 GFLOP per image, ~15x cheaper than so400m on CPU, and the 12 -> 8 bilinear pooling is a
# real resize (not the identity an 8 x 8 grid would give).
RANDOM_ENCODER_SHAPES: dict[str, dict] = {
    "tiny-random": dict(hidden_size=VISION_DIM, intermediate_size=512, num_hidden_layers=1,
                        num_attention_heads=4, image_size=168, patch_size=14),
    # google/siglip-so400m-patch14-384's shape, random weights: for throughput benchmarks.
    "so400m-random": dict(hidden_size=VISION_DIM, intermediate_size=4304, num_hidden_layers=27,
                          num_attention_heads=16, image_size=384, patch_size=14),
}
RANDOM_ENCODER_SEED = 1234
# SiglipVisionConfig's defaults, for config.json files that leave a field out.
_SIGLIP_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "image_size": 224, "patch_size": 16}
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def normalize_pixels(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] in [0, 1] -> SigLIP pixel_values ((x - mean) / std)."""
    import torch

    mean = torch.tensor(SIGLIP_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(SIGLIP_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def pool_and_normalize(hidden: torch.Tensor) -> torch.Tensor:
    """SigLIP patch tokens -> VPiT visual tokens.

    Args:
        hidden: [B, g*g, D] patch features on a g x g grid (or [B, 64, D] already pooled).

    Returns:
        [B, 64, D] float32, each token of unit L2 norm. The resize and the norm run in fp32 whatever the
        encoder's dtype, so bf16 storage is the only rounding step.
    """
    import torch.nn.functional as F

    batch, num_patches, dim = hidden.shape
    grid = int(round(num_patches ** 0.5))
    if grid * grid != num_patches:
        raise ValueError(f"expected a square patch grid, got {num_patches} tokens")
    hidden = hidden.float()
    if grid != POOLED_GRID:
        # [B, g*g, D] -> [B, D, g, g] -> bilinear [B, D, 8, 8] -> [B, 64, D]
        maps = hidden.transpose(1, 2).reshape(batch, dim, grid, grid)
        maps = F.interpolate(maps, size=(POOLED_GRID, POOLED_GRID), mode="bilinear", align_corners=False)
        hidden = maps.reshape(batch, dim, TOKENS_PER_IMAGE).transpose(1, 2)
    return F.normalize(hidden, dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Identity without building: config + weight files -> EncoderInfo
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderInfo:
    """What a shard manifest records about the encoder (`feature_layer` indexes `hidden_states`)."""

    name: str
    image_size: int
    patch_size: int
    hidden_size: int
    decoder: str
    compute_dtype: str
    feature_layer: int
    post_layernorm: bool
    fingerprint: str


def _sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def encoder_source(spec: str) -> tuple[dict, dict]:
    """(vision config, weights identity) of an encoder spec, from files only.

    A random encoder's weights are a function of its shape, the seed and the code that draws them (torch's
    RNG and transformers' init), so those versions are its identity. A directory's identity is its
    canonical config.json and the sha256 of every weight file.

    Raises:
        FileNotFoundError: `spec` is neither a random encoder nor a directory with config.json and weights.
    """
    if spec in RANDOM_ENCODER_SHAPES:
        config = dict(RANDOM_ENCODER_SHAPES[spec])
        identity = {"random": spec, "seed": RANDOM_ENCODER_SEED, "torch": _version("torch"),
                    "transformers": _version("transformers")}
        return config, identity
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(
            f"--vision-encoder {spec}: not a directory holding a Hugging Face SigLIP checkpoint (and not one of "
            f"{list(RANDOM_ENCODER_SHAPES)}); nothing is downloaded at run time")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--vision-encoder {spec}: no config.json")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FileNotFoundError(f"--vision-encoder {spec}: config.json is not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise FileNotFoundError(f"--vision-encoder {spec}: config.json is not a JSON object")
    vision = raw.get("vision_config") if isinstance(raw.get("vision_config"), dict) else raw  # SiglipModel dirs
    config = {key: value for key, value in vision.items() if key not in _VOLATILE_CONFIG_KEYS}
    for key, value in _SIGLIP_DEFAULTS.items():
        config.setdefault(key, value)
    weights = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not any(p.name.endswith((".safetensors", ".bin")) for p in weights):
        raise FileNotFoundError(f"--vision-encoder {spec}: no weight files (*.safetensors) in the directory")
    identity = {"files": {p.name: _sha256_file(p) for p in weights}}
    return config, identity


def default_device() -> str:
    """"cuda" when a GPU is usable, else "cpu"; a CPU-only torch build is recognised without importing torch
    (its torch/version.py says `cuda = None`), which keeps text-only builds free of the ~1 s import."""
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.origin:
        version_file = Path(spec.origin).parent / "version.py"
        try:
            if re.search(r"^cuda\s*(:[^=]*)?=\s*None\s*$", version_file.read_text(), re.MULTILINE):
                return "cpu"
        except OSError:
            pass
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_type(device) -> str:
    return str(device).split(":")[0]


def _resolve_layer(feature_layer: int, num_layers: int) -> int:
    """`hidden_states` has num_layers + 1 entries (0 = the patch embeddings); returns the non-negative index."""
    if not -(num_layers + 1) <= feature_layer <= num_layers:
        raise ValueError(f"--vision-feature-layer {feature_layer} is out of range for an encoder with "
                         f"{num_layers} layers (hidden_states has {num_layers + 1} entries: "
                         f"{-(num_layers + 1)}..{num_layers})")
    return feature_layer % (num_layers + 1)


def describe_vision_encoder(spec: str, *, device: str | None = None, dtype: str | None = None,
                            decoder: str = "auto", feature_layer: int = DEFAULT_FEATURE_LAYER,
                            post_layernorm: bool = False) -> EncoderInfo:
    """The EncoderInfo `build_vision_encoder` with the same arguments would report, without building it.

    The fingerprint covers the weights (files or random-init identity), the config, the feature layer and
    post-layernorm choice, the preprocessing constants, the decoder and the compute dtype: everything that
    changes a stored row.
    """
    config, identity = encoder_source(spec)
    if int(config["hidden_size"]) != VISION_DIM:
        raise ValueError(f"vision encoder {spec} has hidden size {config['hidden_size']}; VPiT needs {VISION_DIM}")
    _resolve_layer(feature_layer, int(config["num_hidden_layers"]))
    device = device or default_device()
    compute_dtype = dtype or ("bfloat16" if _device_type(device) == "cuda" else "float32")
    decoder_name = resolve_decoder_name(decoder, _device_type(device))
    meta = {
        "config": config, "weights": identity, "feature_layer": feature_layer, "post_layernorm": post_layernorm,
        "mean": SIGLIP_MEAN, "std": SIGLIP_STD, "resample": "bicubic", "pool": "bilinear-8x8", "norm": "l2",
        "storage": "bfloat16", "decoder": decoder_name, "compute_dtype": compute_dtype,
    }
    fingerprint = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()
    name = spec if spec in RANDOM_ENCODER_SHAPES else Path(spec).name
    return EncoderInfo(name, int(config["image_size"]), int(config["patch_size"]), int(config["hidden_size"]),
                       decoder_name, compute_dtype, feature_layer, post_layernorm, fingerprint)


# ---------------------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------------------
def vision_tower(model):
    """The module holding embeddings / encoder / post_layernorm (SiglipVisionModel in transformers 5, its
    `.vision_model` in 4.x, or a SiglipModel's vision tower)."""
    return getattr(model, "vision_model", model)


class VisionEncoder:
    """A frozen SigLIP vision tower plus VPiT's pooling, with the image decoder that feeds it.

    Build with `build_vision_encoder`. `encode_images(blobs)` is the one call preprocessing and generation
    share; `encode_pixels` is the tensor-level half.

    Args:
        model: a transformers SiglipVisionModel (its layers past `feature_layer` are dropped).
        info: the description `describe_vision_encoder` made from the same spec (its fingerprint is kept).
    """

    def __init__(self, model, info: EncoderInfo, *, device, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                 decode_batch: int = 32) -> None:
        import torch

        self.info_ = info
        self.name = info.name
        self.device = torch.device(device)
        # bf16 on GPU (the 8x8 pooling and the norm still run in fp32); fp32 on CPU, where bf16 is slow.
        self.dtype = getattr(torch, info.compute_dtype)
        tower = vision_tower(model)
        layers = tower.encoder.layers
        self.feature_layer = info.feature_layer
        self.post_layernorm = info.post_layernorm
        keep = _resolve_layer(info.feature_layer, len(layers))
        # hidden_states[k] is the output of the first k layers: the rest never runs (nor is kept in memory).
        tower.encoder.layers = layers[:keep]
        self.tower = tower.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.model = model
        self.image_size = info.image_size
        self.patch_size = info.patch_size
        self.hidden_size = info.hidden_size
        device_index = self.device.index if self.device.index is not None else 0
        self.decoder = build_image_decoder(info.decoder, self.image_size, device_index=device_index,
                                           max_batch=decode_batch, max_pixels=max_pixels)

    def fingerprint(self) -> str:
        return self.info_.fingerprint

    def info(self) -> EncoderInfo:
        return self.info_

    # -- encoding -------------------------------------------------------------------------------------------
    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """SigLIP pixel_values [B, 3, S, S] -> hidden_states[feature_layer] [B, g*g, D] (post-LN if asked)."""
        hidden = self.tower.embeddings(pixel_values)  # [B, g*g, D]
        hidden = self.tower.encoder(inputs_embeds=hidden).last_hidden_state
        if self.post_layernorm:
            hidden = self.tower.post_layernorm(hidden)
        return hidden

    def encode_pixels(self, images: torch.Tensor, *, to_cpu: bool = True) -> torch.Tensor:
        """[B, 3, S, S] float in [0, 1] (any device) -> [B, 64, 1152] bf16 unit-norm tokens (on CPU unless
        `to_cpu=False`)."""
        import torch

        if images.is_cuda:  # made on another stream (the DALI decoder's): keep its memory until we are done
            images.record_stream(torch.cuda.current_stream(images.device))
        with torch.no_grad():
            pixel_values = normalize_pixels(images.to(self.device, torch.float32)).to(self.dtype)
            rows = pool_and_normalize(self.features(pixel_values)).to(torch.bfloat16)
        return rows.cpu() if to_cpu else rows

    def decode(self, blobs: Sequence[bytes]) -> list[torch.Tensor | ImageDecodeError]:
        return self.decoder.decode_batch(blobs)

    def encode_images(self, blobs: Sequence[bytes], batch_size: int = 32) -> torch.Tensor:
        """Encoded image bytes -> [N, 64, 1152] bf16. Raises the first ImageDecodeError met."""
        import torch

        rows = []
        for start in range(0, len(blobs), batch_size):
            decoded = self.decode(blobs[start:start + batch_size])
            for result in decoded:
                if isinstance(result, ImageDecodeError):
                    raise result
            rows.append(self.encode_pixels(torch.stack(decoded)))
        if not rows:
            return torch.empty(0, TOKENS_PER_IMAGE, VISION_DIM, dtype=torch.bfloat16)
        return torch.cat(rows)


def build_random_siglip(shape: str = "tiny-random", seed: int = RANDOM_ENCODER_SEED):
    """A seeded random `SiglipVisionModel` of a named shape (see RANDOM_ENCODER_SHAPES)."""
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    if shape not in RANDOM_ENCODER_SHAPES:
        raise ValueError(f"unknown random encoder {shape!r}; expected one of {list(RANDOM_ENCODER_SHAPES)}")
    config = SiglipVisionConfig(**RANDOM_ENCODER_SHAPES[shape], vision_use_head=False)
    # Seeded, CPU-side init so every process (workers, MPI ranks) builds bit-identical weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiglipVisionModel(config)
    return model


def build_vision_encoder(spec: str, *, device=None, dtype=None, decoder: str = "auto",
                         feature_layer: int = DEFAULT_FEATURE_LAYER, post_layernorm: bool = False,
                         max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, decode_batch: int = 32
                         ) -> VisionEncoder:
    """`spec` is "tiny-random", "so400m-random" or a local Hugging Face SigLIP directory (never downloaded).

    Args:
        device: default "cuda" when available, else "cpu".
        dtype: encoder compute dtype (a torch dtype or its name); default bf16 on GPU, fp32 on CPU.
        decoder: "auto" (DALI if installed, else PIL), "pil" or "dali".
        feature_layer: index into SigLIP's `hidden_states` (-1: the last layer, MetaMorph's choice).
        post_layernorm: apply the tower's post_layernorm to those features (`last_hidden_state` for -1).
    """
    dtype_name = None if dtype is None else str(dtype).replace("torch.", "")
    device = str(device) if device is not None else None
    info = describe_vision_encoder(spec, device=device, dtype=dtype_name, decoder=decoder,
                                   feature_layer=feature_layer, post_layernorm=post_layernorm)
    device = device or default_device()
    if spec in RANDOM_ENCODER_SHAPES:
        model = build_random_siglip(spec)
    else:
        from transformers import SiglipVisionConfig, SiglipVisionModel

        config = SiglipVisionConfig.from_pretrained(spec, local_files_only=True)
        model = SiglipVisionModel.from_pretrained(spec, config=config, local_files_only=True)
    return VisionEncoder(model, info, device=device, max_pixels=max_pixels, decode_batch=decode_batch)
