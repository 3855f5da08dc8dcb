"""Generate text and images (as visual tokens) from a VPiT checkpoint. See docs/generation.md.

    python -m engine.generate --load CKPT --prompt "Generate an image of a red fox" [--image in.jpg ...] \\
        --max-new-tokens N [--temperature T --top-p P] [--batch-file prompts.jsonl] [--visualizer VIZ] --output OUT

    torchrun --nproc-per-node 2 -m engine.generate --tensor-model-parallel-size 2 --load CKPT ...

    python -m engine.generate --recipe metaquery --load CKPT --prompt "..." --output OUT   (docs/metaquery.md)

Writes OUT/results.jsonl (one line per prompt, input order), OUT/visual_tokens.safetensors (one [64, 1152] tensor
per generated image, key `sample_{index:05d}.image_{j}`), and with `--visualizer` OUT/images/*.png.
Exit status: 0 on success; 1 on bad input (a flag value, the batch file, the checkpoint, the tokenizer), with one
line `error: ...` naming the flag or file; 2 on unknown flags (argparse). See docs/failure_modes.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from engine.tokenizer import CHAT_TEMPLATES

if TYPE_CHECKING:  # torch and the model are imported after argument parsing: `--help` stays fast
    import torch

    from engine.generation import GenerationResult, PromptInput

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # names of torch dtypes


def generation_parser(prog: str, description: str | None, *, load_help: str,
                      image_help: str) -> argparse.ArgumentParser:
    """The options both recipes' generation start with: the checkpoint, the prompts (`--prompt` with its
    `--image`s and `--system`, or a `--batch-file`; read by `read_inputs`) and `--output`."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, metavar="CKPT", help=load_help)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt (the user turn); `<image>` marks where each --image goes")
    source.add_argument("--batch-file", metavar="JSONL", help='one {"prompt": ..., "images": [...]} per line')
    p.add_argument("--image", action="append", default=[], metavar="PATH", help=image_help)
    p.add_argument("--system", default=None, help="system message for --prompt")
    p.add_argument("--output", required=True, metavar="OUT")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = generation_parser("python -m engine.generate", __doc__,
                          load_help="model-only checkpoint or training --save directory",
                          image_help="an image for --prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="generated positions per sample (visual tokens count; a started image is always finished)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--chat-template", choices=CHAT_TEMPLATES, default=None,
                   help="default: the training data's, else llama3 when the tokenizer has its tokens, else plain")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="saved tokenizer directory (a preprocess build's tokenizer/), if the checkpoint has none")
    p.add_argument("--vision-encoder", default=None, metavar="SPEC",
                   help="override the checkpoint's encoder reference (local SigLIP dir, tiny-random, so400m-random)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="run under torchrun with this many ranks")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute every step (the reference's method)")
    p.add_argument("--no-compile", action="store_true",
                   help="decode eagerly on GPU (default there: the decode step is compiled, CUDA graphs)")
    viz = p.add_argument_group("rendering (with --visualizer)")
    viz.add_argument("--visualizer", default=None, metavar="VIZ", help="a directory saved by engine.visualizer")
    viz.add_argument("--guidance-scale", type=float, default=3.0)
    viz.add_argument("--render-steps", type=int, default=50, help="denoising steps")
    viz.add_argument("--render-size", type=int, default=None, help="image side in pixels (default: the visualizer's)")
    from engine.cli_help import show_defaults

    return show_defaults(p)


def _setup_tensor_parallel(tp: int, device: torch.device):
    """(tp mesh or None, rank). TP only: the world is one tensor-parallel group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp == 1 and world == 1:
        return None, 0
    if world != tp:
        raise ValueError(f"--tensor-model-parallel-size {tp} needs exactly {tp} processes "
                         f"(torchrun --nproc-per-node {tp}); got WORLD_SIZE={world}")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return init_device_mesh(device.type, (tp,), mesh_dim_names=("tp",)), dist.get_rank()


def _check_utf8(path: str) -> None:
    """A batch file that is not UTF-8 is named with the line and column of its first bad byte."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column})") from None


def validate_args(args: argparse.Namespace) -> None:
    """Flag values that argparse's types accept but generation cannot use (nan, inf, out of range)."""
    checks = [
        (math.isfinite(args.temperature) and args.temperature >= 0,
         f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}"),
        (math.isfinite(args.top_p) and 0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        (args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"),
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.tensor_model_parallel_size >= 1,
         f"--tensor-model-parallel-size must be >= 1, got {args.tensor_model_parallel_size}"),
        (math.isfinite(args.guidance_scale), f"--guidance-scale must be finite, got {args.guidance_scale}"),
        (args.render_steps >= 1, f"--render-steps must be >= 1, got {args.render_steps}"),
        (args.render_size is None or args.render_size >= 8, f"--render-size must be >= 8, got {args.render_size}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    check_output_dir(args.output)


def resolve_device(value: str | None) -> torch.device:
    """`--device` (default: cuda when available, else cpu); an unknown name, or cuda on a machine without a GPU, is
    a ValueError naming the flag (an AssertionError traceback from torch before)."""
    import torch

    try:
        device = torch.device(value or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise ValueError(f"--device {value}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {value}: no CUDA device is available here (torch {torch.__version__}); "
                         "leave --device out or use --device cpu")
    return device


def check_output_dir(output: str) -> None:
    """--output is a directory; a file there is refused before any work (it failed after generation)."""
    if Path(output).exists() and not Path(output).is_dir():
        raise ValueError(f"--output {output} is a file: --output is the directory that results.jsonl and images/ "
                         "go into")
    images = Path(output) / "images"
    if images.is_symlink() or (images.exists() and not images.is_dir()):
        raise ValueError(f"--output {output}: {images} is a symbolic link or not a directory: refusing to write "
                         "through it")


def read_inputs(args) -> list[PromptInput]:
    """The prompts of a `generation_parser` command line: the batch file's (UTF-8 checked, with its line and
    column named), or the one `--prompt` with its `--image`s and `--system`."""
    from engine.generation import PromptInput, read_batch_file

    if args.batch_file:
        if args.image or args.system:
            raise ValueError("--image and --system go with --prompt; put images in the batch file's 'images'")
        _check_utf8(args.batch_file)
        return read_batch_file(args.batch_file)
    return [PromptInput(args.prompt, list(args.image), args.system)]


def run(args: argparse.Namespace) -> int:
    validate_args(args)
    import torch

    from engine.generation import (
        SamplingConfig,
        VPiTGenerator,
        build_prompt_encoder,
        default_chat_template,
        encode_images,
        encode_prompt,
        load_checkpoint_for_generation,
    )
    from engine.tokenizer import stop_token_ids

    device = resolve_device(args.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else (torch.bfloat16 if device.type == "cuda"
                                                                     else torch.float32)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    inputs = read_inputs(args)
    mesh, rank = _setup_tensor_parallel(args.tensor_model_parallel_size, device)
    visualizer = _load_visualizer(args, device) if args.visualizer and rank == 0 else None  # its errors come first

    if rank == 0:
        print(f"loading {args.load} on {device} ...", flush=True)
    loaded = load_checkpoint_for_generation(args.load, device=device, dtype=dtype, tokenizer_dir=args.tokenizer)
    model, tokenizer = loaded.model, loaded.tokenizer
    if mesh is not None:
        from engine.parallel.config import tensor_parallel_refusal
        from engine.parallel.tensor_parallel import apply_tensor_parallel

        # the FFN width too: an uneven one died in DTensor at the first forward
        refusal = tensor_parallel_refusal(model.config, args.tensor_model_parallel_size, "the model's")
        if refusal:
            raise ValueError(refusal)
        apply_tensor_parallel(model, mesh, sequence_parallel=False)
    template = args.chat_template or default_chat_template(loaded)
    tpi = model.config.tokens_per_image

    encoder = None
    if any(item.images for item in inputs):
        encoder = build_prompt_encoder(loaded.vision_encoder, args.vision_encoder, device)
    prompts = []
    for index, item in enumerate(inputs):
        image_tokens = encode_images(item.images, encoder) if item.images else None
        prompts.append(encode_prompt(item, tokenizer, template, seed=index, image_tokens=image_tokens,
                                     tokens_per_image=tpi))

    generator = VPiTGenerator(model, image_start_id=tokenizer.image_start_id, image_end_id=tokenizer.image_end_id,
                              stop_ids=stop_token_ids(tokenizer, template), valid_vocab_size=tokenizer.vocab_size,
                              pad_id=tokenizer.pad_id, use_kv_cache=not args.no_kv_cache,
                              compile=False if args.no_compile else None)
    # Similar lengths together (less padding); per-sample seeds make the grouping invisible in the results.
    if rank == 0:
        print(f"generating {len(prompts)} answer(s), up to {args.max_new_tokens} new positions each ...", flush=True)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].tokens))
    results: list[GenerationResult | None] = [None] * len(prompts)
    for start in range(0, len(order), args.batch_size):
        chunk = order[start:start + args.batch_size]
        for i, result in zip(chunk, generator.generate([prompts[i] for i in chunk], sampling)):
            results[i] = result
    if rank == 0:
        write_outputs(Path(args.output), inputs, results, tokenizer, args, visualizer=visualizer)
        print_outputs(Path(args.output))
    return 0


def print_outputs(out: Path) -> None:
    """Where each answer and picture went, one line per prompt."""
    out = out.resolve()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    print(f"wrote {len(rows)} answer(s) to {out / 'results.jsonl'} (one JSON line per prompt, input order)")
    for row in rows:
        text = row["text"] if len(row["text"]) <= 100 else row["text"][:97] + "..."
        print(f"  [{row['index']}] {json.dumps(text, ensure_ascii=False)}")
        for name in row["rendered"]:
            print(f"      picture: {out / name}")
    images = sum(len(row["visual_tokens"]) for row in rows)
    print(f"visual tokens of {images} generated image(s): {out / 'visual_tokens.safetensors'}")


def _load_visualizer(args, device):
    """The --visualizer, loaded and checked against --render-size before any decoding (a wrong directory or size
    was reported only after generation had run)."""
    from engine.visualizer import Visualizer

    print(f"loading the visualizer {args.visualizer} ...", flush=True)
    visualizer = Visualizer.load(args.visualizer, device=device)
    factor = 2 ** (len(visualizer.vae.config.block_out_channels) - 1)
    if args.render_size is not None and args.render_size % factor:
        raise ValueError(f"--render-size {args.render_size} must be a multiple of the VAE's downsampling factor "
                         f"{factor}")
    return visualizer


def write_outputs(out: Path, inputs: list[PromptInput], results: list[GenerationResult], tokenizer, args,
                  visualizer=None) -> None:
    """results.jsonl, visual_tokens.safetensors and, with --visualizer, PNGs under images/ (`visualizer`: the
    loaded --visualizer, else it is loaded here)."""
    import torch
    from safetensors.torch import save

    from engine.data.atomic import real_subdir, write_file_inside, write_png_inside

    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"sample_{i:05d}.image_{j}": image.contiguous()
               for i, result in enumerate(results) for j, image in enumerate(result.images)}
    rendered: dict[str, str] = {}
    if args.visualizer and tensors:
        from engine.visualizer import Visualizer

        print(f"rendering {len(tensors)} picture(s) with {args.visualizer} ...", flush=True)
        visualizer = visualizer or Visualizer.load(args.visualizer, device=args.device)
        real_subdir(out, "images")
        keys = list(tensors)
        images = visualizer.render(torch.stack([tensors[k] for k in keys]), guidance_scale=args.guidance_scale,
                                   num_inference_steps=args.render_steps, size=args.render_size, seed=args.seed)
        for key, image in zip(keys, images):
            name = f"images/{key}.png"
            write_png_inside(image, out / name)
            rendered[key] = name
    # Every file goes through a new temporary file and a rename: a symlink planted at a result's name is
    # replaced, never followed, so nothing outside --output is written.
    write_file_inside(out / "visual_tokens.safetensors", save(
        tensors, metadata={"format": "chrysalis-visual-tokens", "row_shape": "[64, 1152]", "norm": "l2"}))
    lines = []
    for i, (item, result) in enumerate(zip(inputs, results)):
        keys = [f"sample_{i:05d}.image_{j}" for j in range(len(result.images))]
        lines.append(json.dumps({
            "index": i, "prompt": item.prompt, "images": item.images,
            "text": tokenizer.decode(result.token_ids), "token_ids": result.token_ids,
            "visual_tokens": keys, "rendered": [rendered[k] for k in keys if k in rendered],
            "finish_reason": result.finish_reason, "new_tokens": result.new_positions,
        }, ensure_ascii=False) + "\n")
    write_file_inside(out / "results.jsonl", "".join(lines).encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    argv, recipe = list(sys.argv[1:] if argv is None else argv), "vpit"
    for i, arg in enumerate(argv):  # --recipe vpit (default) | metaquery
        if arg == "--recipe" and i + 1 < len(argv):
            recipe, argv = argv[i + 1], argv[:i] + argv[i + 2:]
            break
        if arg.startswith("--recipe="):
            recipe, argv = arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
            break
    if recipe == "metaquery":  # rendered through the diffusion decoder (engine/metaquery/generate.py)
        from engine.metaquery.generate import main as metaquery_main

        return metaquery_main(argv)
    if recipe != "vpit":
        print(f"error: --recipe {recipe!r}: choose vpit (default) or metaquery", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as err:  # CheckpointError and TokenizerFormatError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # As pretrain_gpt_vision.py: interpreter shutdown after a gloo group can hang in its threads (torch 2.13 CPU).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
