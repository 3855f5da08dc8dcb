"""Images/s through decode + the SigLIP encoder (+ 8x8 pooling, L2 norm, bf16), stage by stage and end to end.

    python benchmarks/preprocess_images.py                                   # CPU, tiny-random
    python benchmarks/preprocess_images.py --encoder so400m-random --batch-size 256 --images 4096   # on a GPU

Stages: (1) decode + resize with the build's decoder (DALI when installed, else PIL; one process);
(2) the encoder alone on already-decoded pixels (bf16 on GPU, fp32 on CPU), after a warm-up batch;
(3) with --end-to-end, `python -m preprocess build` on a JSONL of single-image VQA records (everything: reading,
hashing, decoding, encoding, packing, writing, checksums; process start included).
The so400m-random encoder has google/siglip-so400m-patch14-384's shape with random weights (nothing downloaded).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_jpegs(count: int, size: tuple[int, int]) -> list[bytes]:
    """Distinct JPEGs: random crops of scikit-image photos (noise images when scikit-image is missing)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    try:
        import skimage.data

        photos = [Image.fromarray(getattr(skimage.data, n)()).convert("RGB").resize((size[0] * 2, size[1] * 2))
                  for n in ("astronaut", "coffee", "chelsea", "rocket")]
    except ImportError:
        photos = [Image.fromarray(rng.integers(0, 255, (size[1] * 2, size[0] * 2, 3), dtype=np.uint8))]
    blobs = []
    for index in range(count):
        photo = photos[index % len(photos)]
        x, y = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
        buffer = io.BytesIO()
        photo.crop((x, y, x + size[0], y + size[1])).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="tiny-random", help="tiny-random, so400m-random or a SigLIP directory")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, nargs=2, default=(320, 240), metavar=("W", "H"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--decoder", default="auto", choices=["auto", "pil", "dali"])
    parser.add_argument("--end-to-end", action="store_true", help="also time `python -m preprocess build`")
    args = parser.parse_args()

    from engine.vision_encoder import build_vision_encoder

    encoder = build_vision_encoder(args.encoder, device=args.device, decoder=args.decoder)
    device = encoder.device
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores, " \
        f"{torch.get_num_threads()} torch threads"
    print(f"encoder {args.encoder} ({encoder.image_size}px, patch {encoder.patch_size}, compute {encoder.dtype}), "
          f"decoder {encoder.decoder.name}, device: {name}")
    blobs = make_jpegs(args.images, tuple(args.image_size))
    print(f"{len(blobs)} JPEGs {args.image_size[0]}x{args.image_size[1]}, mean {sum(map(len, blobs)) / len(blobs) / 1e3:.1f} KB")

    start = time.perf_counter()
    decoded = []
    for first in range(0, len(blobs), args.batch_size):
        decoded += encoder.decode(blobs[first:first + args.batch_size])
    decode_s = time.perf_counter() - start
    print(f"decode + resize: {len(blobs) / decode_s:,.1f} images/s (one process)")

    pixels = torch.stack(decoded)
    encoder.encode_pixels(pixels[:args.batch_size])  # warm-up (kernels, allocator)
    synchronize(device)
    start = time.perf_counter()
    for first in range(0, len(pixels), args.batch_size):
        rows = encoder.encode_pixels(pixels[first:first + args.batch_size])
    synchronize(device)
    encode_s = time.perf_counter() - start
    assert rows.dtype == torch.bfloat16 and rows.shape[1:] == (64, 1152)
    print(f"encode (SigLIP + 8x8 pool + L2 + bf16), batch {args.batch_size}: {len(pixels) / encode_s:,.1f} images/s")
    print(f"decode + encode, serial: {len(blobs) / (decode_s + encode_s):,.1f} images/s")

    if args.end_to_end:
        work = Path(tempfile.mkdtemp(prefix="bench-images-"))
        (work / "images").mkdir()
        with open(work / "records.jsonl", "w") as handle:
            for index, blob in enumerate(blobs):
                (work / "images" / f"{index:06d}.jpg").write_bytes(blob)
                handle.write(json.dumps({"id": str(index), "image": f"{index:06d}.jpg", "conversations": [
                    {"from": "human", "value": "<image>\nWhat is in the picture?"},
                    {"from": "gpt", "value": "A photo."}]}) + "\n")
        from engine.tokenizer.tiny import build_tiny_tiktoken

        tokenizer = build_tiny_tiktoken(["What is in the picture? A photo."], work / "tokenizer", num_merges=50)
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "preprocess", "build", "--input", str(work / "records.jsonl"),
                        "--image-root", str(work / "images"), "--tokenizer-type", "tiktoken",
                        "--tokenizer-model", str(tokenizer), "--vision-encoder", args.encoder,
                        "--image-decoder", args.decoder, "--encode-batch-size", str(args.batch_size),
                        "--seq-length", "4096", "--output", str(work / "out"), "--no-progress"],
                       env=env, check=True, capture_output=True)
        total = time.perf_counter() - start
        print(f"end to end (`preprocess build`, 1 worker, process start included): {len(blobs) / total:,.1f} images/s")


if __name__ == "__main__":
    main()
