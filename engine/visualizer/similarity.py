"""How much a rendered picture resembles each of a set of images: PSNR and SSIM at the picture's size.

    python -m engine.visualizer.similarity PICTURE --target coffee.jpg --images DIR_OR_FILES... \\
        [--side-by-side compare.png] [--require-closest]

Every image is decoded like the visualizer's training pixels (RGB, bicubic resize of the whole image to the
picture's square size). Prints one line per image, the target marked, and whether the target is the closest by
both measures; `--require-closest` makes that a condition of exit status 0. `--side-by-side` writes the target and
the picture next to each other, enlarged, for viewing a 32 px render.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def psnr(a, b) -> float:
    """PSNR in dB of two [3, H, W] tensors in [0, 1]."""
    import torch

    mse = torch.mean((a.double() - b.double()) ** 2).clamp_min(1e-12)
    return float(10 * torch.log10(1.0 / mse))


def ssim(a, b, window: int = 7) -> float:
    """Mean SSIM (Wang et al. 2004; constants K1=0.01, K2=0.03, data range 1) of two [3, H, W] tensors in [0, 1],
    over a `window` x `window` uniform window (scikit-image's default), averaged over channels."""
    import torch.nn.functional as F

    x, y = a.double()[None], b.double()[None]
    window = min(window, *x.shape[-2:])
    window -= 1 - window % 2  # odd

    def mean(t):
        return F.avg_pool2d(t, window, stride=1)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = mean(x), mean(y)
    # Sample (co)variances, as scikit-image's structural_similarity (N / (N - 1)).
    n = window * window
    correction = n / (n - 1) if n > 1 else 1.0
    vx = (mean(x * x) - mx * mx) * correction
    vy = (mean(y * y) - my * my) * correction
    cov = (mean(x * y) - mx * my) * correction
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def read_bytes(path: str | Path) -> bytes:
    """A file's bytes, or a WebDataset member's (`shard.tar::member`, as preprocess references them)."""
    archive, sep, member = str(path).partition("::")
    if not sep:
        return Path(path).read_bytes()
    import tarfile

    with tarfile.open(archive) as tar:
        handle = tar.extractfile(member)
        if handle is None:
            raise ValueError(f"{path}: not a file in {archive}")
        return handle.read()


def load_image(path: str | Path, size: int):
    """[3, size, size] float in [0, 1], decoded like the visualizer's training pixels."""
    from engine.vision_encoder import decode_image_pil

    return decode_image_pil(read_bytes(path), size)


@dataclass
class Score:
    path: str
    psnr: float
    ssim: float


def score_against(picture: str | Path, images: list[str | Path]) -> list[Score]:
    # `images`: file paths or `shard.tar::member` references (see expand_images).
    """PSNR and SSIM of `picture` against each of `images`, at the picture's size."""
    from PIL import Image

    with Image.open(picture) as im:
        size = im.size[0]
        if im.size[0] != im.size[1]:
            raise ValueError(f"{picture}: expected a square picture, got {im.size[0]}x{im.size[1]}")
    rendered = load_image(picture, size)
    return [Score(str(path), psnr(rendered, ref), ssim(rendered, ref))
            for path, ref in ((p, load_image(p, size)) for p in images)]


def _key(path: str | Path) -> str:
    """A comparable form of a file path or `shard.tar::member` reference."""
    archive, sep, member = str(path).partition("::")
    return str(Path(archive).resolve()) + sep + member


def closest_is_target(scores: list[Score], target: str | Path) -> tuple[bool, bool]:
    """(target has the highest PSNR, target has the highest SSIM)."""
    best_psnr = max(scores, key=lambda s: s.psnr)
    best_ssim = max(scores, key=lambda s: s.ssim)
    return _key(best_psnr.path) == _key(target), _key(best_ssim.path) == _key(target)


def side_by_side(target: str | Path, picture: str | Path, output: str | Path, scale: int = 8) -> Path:
    """target | picture at the picture's size, enlarged `scale` times (nearest neighbour), as a PNG."""
    from PIL import Image

    with Image.open(picture) as im:
        rendered = im.convert("RGB")
    size = rendered.size[0]
    reference = Image.open(target).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (2 * size + 2, size), (255, 255, 255))
    canvas.paste(reference, (0, 0))
    canvas.paste(rendered, (size + 2, 0))
    canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(output)
    return output


def expand_images(items: list[str | Path]) -> list[str]:
    """Image files of `items`: folders are searched recursively, and the image members of WebDataset tars (in a
    folder or named) become `shard.tar::member` references."""
    import tarfile

    out: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file() or "::" in str(item):
            files = [path]
        else:
            raise FileNotFoundError(f"{item}: no such file or directory")
        for file in files:
            if file.suffix.lower() == ".tar" and "::" not in str(file):
                with tarfile.open(file) as tar:
                    out.extend(f"{file}::{m.name}" for m in tar.getmembers()
                               if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES)
            elif file.suffix.lower() in IMAGE_SUFFIXES or "::" in str(file):
                out.append(str(file))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.visualizer.similarity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("picture", help="a rendered PNG (square)")
    p.add_argument("--target", required=True, metavar="IMAGE", help="the image the picture should resemble")
    p.add_argument("--images", nargs="+", required=True, metavar="PATH",
                   help="the images to compare with: files, folders (searched recursively) and WebDataset tars "
                        "(their image members); the target is added if missing")
    p.add_argument("--side-by-side", default=None, metavar="PNG", help="write target | picture, enlarged")
    p.add_argument("--require-closest", action="store_true",
                   help="exit 1 unless the target is the closest image by PSNR and by SSIM")
    from engine.cli_help import show_defaults

    args = show_defaults(p).parse_args(argv)
    try:
        images = expand_images(args.images)
        if _key(args.target) not in {_key(i) for i in images}:
            images.append(args.target)
        scores = score_against(args.picture, images)
    except (ValueError, OSError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    target = _key(args.target)
    width = max(len(s.path) for s in scores)
    print(f"{'image':<{width}}  PSNR (dB)  SSIM")
    for s in sorted(scores, key=lambda s: -s.psnr):
        mark = "  <- target" if _key(s.path) == target else ""
        print(f"{s.path:<{width}}  {s.psnr:9.2f}  {s.ssim:.3f}{mark}")
    by_psnr, by_ssim = closest_is_target(scores, args.target)
    others = [s for s in scores if _key(s.path) != target]
    mine = next(s for s in scores if _key(s.path) == target)
    if others:
        print(f"target margin over the next closest: PSNR {mine.psnr - max(s.psnr for s in others):+.2f} dB, "
              f"SSIM {mine.ssim - max(s.ssim for s in others):+.3f}")
    print(f"closest by PSNR: {'the target' if by_psnr else 'another image'}; "
          f"closest by SSIM: {'the target' if by_ssim else 'another image'}")
    if args.side_by_side:
        written = side_by_side(args.target, args.picture, args.side_by_side)
        print(f"side by side (target | picture): {written.resolve()}")
    if args.require_closest and not (by_psnr and by_ssim):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
