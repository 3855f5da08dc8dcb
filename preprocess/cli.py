"""Command line: `python -m preprocess {build,inspect,verify}` (see docs/preprocess.md)."""

from __future__ import annotations

import argparse
import sys

from engine.data.image_decode import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS


def _tokenizer_type(name: str) -> str:
    """Megatron-LM's --tokenizer-type names -> ours (a Megatron preprocess_data.py command line carries over)."""
    from engine.training.megatron_flags import TOKENIZER_TYPES

    return TOKENIZER_TYPES.get(name, name)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m preprocess",
                                     description="Pack multimodal conversations into Megatron-format shards.")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="records -> packed shards + image embeddings")
    build.add_argument("--input", action="append", required=True, metavar="FILE",
                       help="JSONL or JSON-array file of LLaVA-style records (repeatable; order matters)")
    build.add_argument("--image-root", metavar="DIR", help="images (and WebDataset tars, `x.tar::member`) are "
                       "relative to this directory; paths resolving outside it are refused")
    build.add_argument("--tokenizer-type", required=True, type=_tokenizer_type,
                       choices=["sentencepiece", "tiktoken", "huggingface"],
                       help="Megatron-LM's names work too: SentencePieceTokenizer, Llama2Tokenizer, "
                       "GPTSentencePieceTokenizer (= sentencepiece), TikTokenizer (= tiktoken), HuggingFaceTokenizer "
                       "(= huggingface)")
    build.add_argument("--tokenizer-model", required=True, metavar="PATH")
    build.add_argument("--chat-template", default="llama3", choices=["llama3", "plain"])
    build.add_argument("--vision-encoder", metavar="PATH|tiny-random",
                       help="local Hugging Face SigLIP directory, tiny-random or so400m-random (nothing is downloaded)")
    build.add_argument("--vision-feature-layer", type=int, default=-1, metavar="K",
                       help="index into SigLIP's hidden_states (0 = patch embeddings, -1 = last encoder layer, "
                       "before post_layernorm: MetaMorph's mm_vision_select_layer; default: %(default)s)")
    build.add_argument("--vision-post-layernorm", action="store_true",
                       help="apply SigLIP's post_layernorm to those features (with layer -1: last_hidden_state, "
                       "the pre-2026 Chrysalis behaviour); default: off, as MetaMorph")
    build.add_argument("--embeddings-dir", metavar="DIR", help="precomputed per-image embeddings (.npy or "
                       ".safetensors, [64,1152] or [729,1152]) used instead of decoding and encoding pixels")
    build.add_argument("--seq-length", type=int, default=4096)
    build.add_argument("--overlong", choices=["truncate", "drop"], default="truncate",
                       help="what to do with a conversation longer than --seq-length (default: truncate)")
    build.add_argument("--samples-per-shard", type=int, default=10000,
                       help="records per shard: the unit of parallel work, of packing and of resume")
    build.add_argument("--encode-batch-size", type=int, default=32, help="images per encoder batch")
    build.add_argument("--image-decoder", choices=["auto", "pil", "dali"], default="auto",
                       help="auto: NVIDIA DALI when installed (nvJPEG on the encoder's GPU, else CPU), else PIL")
    build.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                       help="reject (image_too_large) images whose decoded size exceeds N pixels, before decoding "
                       "them (default: %(default)s)")
    build.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES, metavar="N",
                       help="reject (image_too_large) image files (and tar members, embedding files) over N bytes "
                       "before reading them (default: %(default)s, 256 MiB)")
    build.add_argument("--targets", choices=["siglip", "vae-latents"], default="siglip",
                       help="siglip: SigLIP rows per image (VPiT); vae-latents: also every image's VAE latent "
                       "(MetaQuery's targets, no VAE encoder in training; needs --vae). Default: %(default)s")
    build.add_argument("--vae", metavar="DIR", help="local diffusers AutoencoderKL/AutoencoderDC directory, or a "
                       "pipeline directory with vae/ (Stable Diffusion 1.5, Sana), for --targets vae-latents")
    build.add_argument("--vae-image-size", type=int, default=512, metavar="S",
                       help="latents of the S x S center crop after resizing the shorter side to S (MetaQuery's "
                       "target_image_size; default: %(default)s)")
    build.add_argument("--device", help="encoder device (default: cuda if available, else cpu)")
    build.add_argument("--workers", type=int, default=1, help="local worker processes (per MPI rank)")
    build.add_argument("--output", required=True, metavar="OUT")
    build.add_argument("--resume", action="store_true", help="finish an interrupted build in OUT")
    build.add_argument("--strict", action="store_true", help="stop at the first bad record (exit status 2)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")

    inspect = commands.add_parser("inspect", help="statistics; one packed sequence decoded")
    inspect.add_argument("output", metavar="OUT")
    inspect.add_argument("--sequence", type=int, metavar="K", help="decode packed sequence K")

    verify = commands.add_parser("verify", help="checksums, index consistency, finite embeddings; exit status 1 "
                                 "on any fault")
    verify.add_argument("output", metavar="OUT")
    from engine.cli_help import show_defaults

    return show_defaults(parser)


def _build(args) -> int:
    from preprocess.build import run_build
    from preprocess.config import EXIT_CONFIG, BuildConfig, BuildError

    try:
        config = BuildConfig(
            inputs=args.input, output=args.output, tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model, chat_template=args.chat_template,
            vision_encoder=args.vision_encoder, vision_feature_layer=args.vision_feature_layer,
            vision_post_layernorm=args.vision_post_layernorm, image_root=args.image_root,
            embeddings_dir=args.embeddings_dir, seq_length=args.seq_length, overlong=args.overlong,
            samples_per_shard=args.samples_per_shard, encode_batch_size=args.encode_batch_size,
            image_decoder=args.image_decoder, max_image_pixels=args.max_image_pixels,
            max_image_bytes=args.max_image_bytes, device=args.device,
            targets=args.targets, vae=args.vae, vae_image_size=args.vae_image_size,
            workers=args.workers, resume=args.resume, strict=args.strict, progress=not args.no_progress)
        run_build(config)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_status
    except FileNotFoundError as error:  # an --input that does not exist (named in the message)
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as error:  # the disk: full, read-only, permissions (named with the file)
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error} (the build can be finished with --resume once fixed)",
              file=sys.stderr)
        return EXIT_CONFIG
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "build":
        return _build(args)
    if args.command == "inspect":
        from engine.data.manifest import ManifestError
        from preprocess.inspection import inspect_build

        try:
            inspect_build(args.output, args.sequence)
        except (ManifestError, IndexError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    from preprocess.verify import verify_build

    faults, warnings = verify_build(args.output)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for fault in faults:
        print(f"FAULT: {fault}", file=sys.stderr)
    if faults:
        print(f"verify: {len(faults)} fault(s) in {args.output}", file=sys.stderr)
        return 1
    print(f"verify: {args.output} OK")
    return 0
