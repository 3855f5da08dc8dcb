"""Render visual tokens (e.g. `engine.generate`'s visual_tokens.safetensors) to PNGs.

    python -m engine.visualizer.render --visualizer VIZ --tokens OUT/visual_tokens.safetensors --output PNG_DIR \\
        [--guidance-scale 3.0] [--steps 50] [--size 512] [--seed 0]

    # MetaMorph's published visualizer (adapter_checkpoint.pt, model_config.json, unet_checkpoint.pt) on a local
    # Stable Diffusion 1.5 directory:
    python -m engine.visualizer.render --visualizer METAMORPH_VIZ --stable-diffusion SD15_DIR --tokens ... \\
        --output PNG_DIR --guidance-scale 7.5 --size 512

One PNG per tensor, named after its key. A tensor may be [64, 1152] or [N, 64, 1152] (then `KEY_i.png`). Keys are
turned into safe file names (letters, digits, `.`, `_`, `-`; anything else becomes `_`, leading dots are dropped),
so every file is written inside --output, whatever the tokens file says.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
MAX_NAME = 200


def safe_file_stem(key: str) -> str:
    """A file name stem for a tensor key that cannot leave its folder: no separators, no leading dot (so no `..`,
    no hidden files), bounded length; `_` for a key with nothing left."""
    stem = _UNSAFE.sub("_", key).lstrip(".")[:MAX_NAME]
    return stem or "_"


def output_paths(keys: list[str], output: Path) -> dict[str, Path]:
    """key -> output / `safe_file_stem(key)`.png, made unique with `-2`, `-3`, ... when two keys collide after
    sanitising; every path is checked to be directly inside `output`."""
    root = output.resolve()
    taken: set[str] = set()
    paths = {}
    for key in keys:
        stem = safe_file_stem(key)
        name, n = f"{stem}.png", 1
        while name.lower() in taken:  # lower(): also distinct on case-insensitive file systems
            n += 1
            name = f"{stem}-{n}.png"
        taken.add(name.lower())
        path = root / name
        if path.parent != root:  # cannot happen with safe_file_stem; kept as the guarantee's last line
            raise ValueError(f"tensor key {key!r} would be written outside {output}")
        paths[key] = path
    return paths


def read_tokens(tokens_path: str | Path):
    """(names, rows): one [64, D] tensor per image, named by key (`KEY_i` for the rows of an [N, 64, D] tensor)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(tokens_path).is_file():
        raise FileNotFoundError(f"--tokens {tokens_path}: no such file")
    try:
        tensors = load_file(str(tokens_path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"--tokens {tokens_path}: not a readable safetensors file ({err})") from None
    names, rows = [], []
    for key in sorted(tensors):
        t = tensors[key]
        if t.is_floating_point() and not bool(t.isfinite().all()):  # would render noise (NaN cast to uint8)
            raise ValueError(f"--tokens {tokens_path}: tensor {key!r} holds NaN or Inf")
        if t.dim() == 2:
            names.append(key)
            rows.append(t)
        elif t.dim() == 3:
            names.extend(f"{key}_{i}" for i in range(t.shape[0]))
            rows.extend(t)
        else:
            raise ValueError(f"--tokens {tokens_path}: tensor {key!r} has shape {list(t.shape)}; expected "
                             "[64, D] or [N, 64, D]")
    return names, rows


def render_file(visualizer, tokens_path: str | Path, output: str | Path, *, guidance_scale: float,
                steps: int, size: int | None, seed: int) -> dict[str, Path]:
    """Renders every tensor of `tokens_path`; returns key -> written PNG (all inside `output`)."""
    import torch

    from engine.data.atomic import write_png_inside

    names, rows = read_tokens(tokens_path)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = output_paths(names, output)
    if not rows:
        return {}
    images = visualizer.render(torch.stack(rows).float(), guidance_scale=guidance_scale, num_inference_steps=steps,
                               size=size, seed=seed)
    for name, image in zip(names, images):
        write_png_inside(image, paths[name])  # a symlink planted there is replaced, never followed
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.visualizer.render", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--visualizer", required=True, metavar="VIZ",
                   help="a directory saved by engine.visualizer.train, or MetaMorph's published visualizer files")
    p.add_argument("--stable-diffusion", default=None, metavar="SD15_DIR",
                   help="local Stable Diffusion 1.5 directory (diffusers layout); needed with MetaMorph's files")
    p.add_argument("--tokens", required=True, metavar="SAFETENSORS")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--guidance-scale", type=float, default=3.0,
                   help="classifier-free guidance against the zero context (default: %(default)s; the reference "
                        "renders at 6.0-12.5 with SD 1.5)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default: %(default)s)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the visualizer's; 512 for "
                                                          "MetaMorph's)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    from engine.cli_help import show_defaults

    return show_defaults(p)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from engine.visualizer.model import Visualizer

    try:
        visualizer = Visualizer.load(args.visualizer, device=args.device, stable_diffusion=args.stable_diffusion,
                                     log=print)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # diffusers: unreadable or truncated weights (its message names the file)
        print(f"error: --visualizer {args.visualizer}: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    try:
        written = render_file(visualizer, args.tokens, args.output, guidance_scale=args.guidance_scale,
                              steps=args.steps, size=args.size, seed=args.seed)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # --output: a file, read-only, a directory where a PNG goes, a full disk
        name = err.filename2 or err.filename  # a rename names its target second
        where = f"{name}: " if name else f"--output {args.output}: "
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    for key, path in written.items():
        print(f"{key if key.isprintable() else repr(key)} -> {path}")
    print(f"wrote {len(written)} image(s) to {Path(args.output).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
