"""Render visual tokens (e.g. `engine.generate`'s visual_tokens.safetensors) to PNGs.

    python -m engine.visualizer.render --visualizer VIZ --tokens OUT/visual_tokens.safetensors --output PNG_DIR \\
        [--guidance-scale 3.0] [--steps 50] [--size 512] [--seed 0]

One PNG per tensor, named after its key. A tensor may be [64, 1152] or [N, 64, 1152] (then `KEY_i.png`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from engine.visualizer.model import Visualizer


def render_file(visualizer: Visualizer, tokens_path: str | Path, output: str | Path, *, guidance_scale: float,
                steps: int, size: int | None, seed: int) -> list[Path]:
    from safetensors.torch import load_file

    tensors = load_file(str(tokens_path))
    names, rows = [], []
    for key in sorted(tensors):
        t = tensors[key]
        if t.dim() == 2:
            names.append(key)
            rows.append(t)
        else:
            names.extend(f"{key}_{i}" for i in range(t.shape[0]))
            rows.extend(t)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if not rows:
        return []
    images = visualizer.render(torch.stack(rows).float(), guidance_scale=guidance_scale, num_inference_steps=steps,
                               size=size, seed=seed)
    written = []
    for name, image in zip(names, images):
        path = output / f"{name}.png"
        image.save(path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.visualizer.render", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--visualizer", required=True, metavar="VIZ")
    p.add_argument("--tokens", required=True, metavar="SAFETENSORS")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    try:
        visualizer = Visualizer.load(args.visualizer, device=args.device)
        written = render_file(visualizer, args.tokens, args.output, guidance_scale=args.guidance_scale,
                              steps=args.steps, size=args.size, seed=args.seed)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} image(s) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
