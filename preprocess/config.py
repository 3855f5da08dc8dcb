"""`BuildConfig`: everything `python -m preprocess build` needs (the CLI flags map one to one, see cli.py), and
the errors a build reports as a one-line message with an exit status."""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import TOKENS_PER_IMAGE
from engine.data.image_decode import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from engine.vision_encoder import DEFAULT_FEATURE_LAYER

# Exit statuses of `build` (docs/preprocess.md).
EXIT_CONFIG = 2  # bad flags, inputs or output directory; --strict stop; nothing useful was written
EXIT_INTERRUPTED = 3  # a worker died (killed, out of memory): finished shards are kept, finish with --resume
# What a build stores per image: SigLIP rows always (VPiT, and MetaQuery's prompt images); `vae-latents` adds the
# VAE latent of every image (MetaQuery's targets, engine/data/latents.py).
TARGETS = ("siglip", "vae-latents")


class BuildError(RuntimeError):
    """A problem with the build as a whole (arguments, output directory); exit status 2."""

    exit_status = EXIT_CONFIG


class StrictRejectError(BuildError):
    """Under --strict, the first bad record stops the build."""


class BuildInterrupted(BuildError):
    """The build stopped part way (a worker process died); the output directory is resumable."""

    exit_status = EXIT_INTERRUPTED


@dataclass(kw_only=True)
class BuildConfig:
    """Everything `build` needs; the CLI flags map one to one (see preprocess/cli.py for their help)."""

    inputs: list[str]
    output: str
    tokenizer_type: str
    tokenizer_model: str
    chat_template: str = "llama3"
    vision_encoder: str | None = None
    vision_feature_layer: int = DEFAULT_FEATURE_LAYER
    vision_post_layernorm: bool = False
    image_root: str | None = None
    embeddings_dir: str | None = None
    seq_length: int = 4096
    overlong: str = "truncate"
    samples_per_shard: int = 10000
    encode_batch_size: int = 32
    image_decoder: str = "auto"
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    device: str | None = None
    workers: int = 1
    resume: bool = False
    strict: bool = False
    progress: bool = True
    # `--targets vae-latents`: also store every image's VAE latent (preprocess/vae_latents.py); `vae_info` is
    # `describe_vae`'s entry, filled in by run_build on rank 0 before any shard is built.
    targets: str = "siglip"
    vae: str | None = None
    vae_image_size: int = 512
    vae_info: dict | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.inputs:
            problems.append("at least one --input is required")
        if self.seq_length < TOKENS_PER_IMAGE + 8:
            problems.append(f"--seq-length {self.seq_length} is too short to hold one image block")
        if self.overlong not in ("truncate", "drop"):
            problems.append("--overlong must be truncate or drop")
        if self.samples_per_shard < 1 or self.encode_batch_size < 1 or self.workers < 1:
            problems.append("--samples-per-shard, --encode-batch-size and --workers must be >= 1")
        if self.max_image_pixels < 1:
            problems.append("--max-image-pixels must be >= 1")
        if self.max_image_bytes < 1:
            problems.append("--max-image-bytes must be >= 1")
        if self.targets not in TARGETS:
            problems.append(f"--targets must be one of {', '.join(TARGETS)}, got {self.targets!r}")
        if self.targets == "vae-latents" and not self.vae:
            problems.append("--targets vae-latents needs --vae (a local diffusers AutoencoderKL/DC directory, or a "
                            "pipeline directory with vae/)")
        if self.vae and self.targets != "vae-latents":
            problems.append("--vae is only used with --targets vae-latents")
        if self.targets == "vae-latents" and self.embeddings_dir is not None:
            problems.append("--targets vae-latents needs the images themselves: it cannot be combined with "
                            "--embeddings-dir")
        if self.vision_encoder is None and self.embeddings_dir is None:
            problems.append("give --vision-encoder (a local SigLIP directory or tiny-random) or --embeddings-dir")
        if problems:
            raise BuildError("; ".join(problems))

    def output_settings(self) -> dict:
        """Settings that change the output bytes (compared on --resume, recorded in the manifest)."""
        return {"seq_length": self.seq_length, "chat_template": self.chat_template, "overlong": self.overlong,
                "samples_per_shard": self.samples_per_shard, "encode_batch_size": self.encode_batch_size,
                "embeddings_dir": self.embeddings_dir is not None, "max_image_pixels": self.max_image_pixels,
                "max_image_bytes": self.max_image_bytes,
                **({"targets": self.targets, "vae": (self.vae_info or {}).get("fingerprint"),
                    "vae_image_size": self.vae_image_size} if self.targets != "siglip" else {})}
