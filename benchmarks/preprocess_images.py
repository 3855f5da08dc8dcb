"""Images/s through decode + the SigLIP encoder (+ 8x8 pooling, L2 norm, bf16) + the bf16 store write: each stage
alone (the split), serial, and as a pipeline (decode, encode and write overlapping on three threads).

    python benchmarks/preprocess_images.py                          # CPU: tiny-random, PIL or DALI CPU decode
    python benchmarks/preprocess_images.py --encoder so400m-random --decoder dali --batch-size 256 \\
        --images 4096 --json gpu.json                                 # one GPU: so400m shape, nvJPEG, bf16

Stages: (1) decode + resize of real JPEGs (random crops of scikit-image photos) with the build's decoder (DALI's
mixed nvJPEG decoder on a GPU, its pixels left on the device); (2) the encoder alone on decoded pixels (bf16 on a
GPU, fp32 on CPU; `--compile` wraps the vision tower in torch.compile), after warm-up; (3) the write: rows copied
to pinned host memory and appended to a bf16 embedding part file, as `preprocess build` stores them.
The pipeline runs decode on one thread (its own CUDA stream), encode on another, and the device-to-host copy
(its own stream) + write on a third; its images/s is compared with the serial sum of the stages in --pairs
interleaved pairs (median ratio). On a GPU the FLOPs of the encoder give the achieved TFLOP/s and the bound.
so400m-random has google/siglip-so400m-patch14-384's shape with random weights (same FLOPs; nothing downloaded).
`--end-to-end` also times `python -m preprocess build` on single-image records.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
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


def encoder_flops(encoder) -> float:
    """Forward FLOPs per image of the layers that run (matmuls; 2 per multiply-add)."""
    config = encoder.model.config
    d, ff = config.hidden_size, config.intermediate_size
    n = (config.image_size // config.patch_size) ** 2
    layers = len(encoder.tower.encoder.layers)
    per_token_layer = 2 * (4 * d * d + 2 * d * ff) + 2 * 2 * n * d  # QKV+O, MLP, QK^T and PV
    patch = 2 * (3 * config.patch_size ** 2) * d
    return n * (layers * per_token_layer + patch)


def load() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self):
        self.sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.start

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def batches(items: list, size: int):
    for first in range(0, len(items), size):
        yield items[first:first + size]


def decode_all(encoder, blobs: list[bytes], batch_size: int) -> list[torch.Tensor]:
    out = []
    for chunk in batches(blobs, batch_size):
        decoded = encoder.decode(chunk)
        bad = [d for d in decoded if not isinstance(d, torch.Tensor)]
        if bad:
            raise RuntimeError(f"benchmark image failed to decode: {bad[0]}")
        out.append(torch.stack(decoded))
    return out


class RowWriter:
    """Device rows -> pinned host buffer (own CUDA stream) -> bf16 part file, like EmbeddingPartWriter."""

    def __init__(self, path: Path, device: torch.device, batch_size: int) -> None:
        from engine.data.shards import EmbeddingPartWriter

        self.writer = EmbeddingPartWriter(path)
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.host = torch.empty((batch_size, 64, 1152), dtype=torch.bfloat16,
                                pin_memory=device.type == "cuda")

    def write(self, rows: torch.Tensor, ready=None) -> None:
        if self.stream is None:
            self.writer.append(rows.cpu())
            return
        with torch.cuda.stream(self.stream):
            if ready is not None:
                self.stream.wait_event(ready)
            rows.record_stream(self.stream)  # made on the encoder's stream, read here
            host = self.host[:rows.shape[0]]
            host.copy_(rows, non_blocking=True)
        self.stream.synchronize()
        self.writer.append(host)

    def close(self) -> None:
        self.writer.commit()


def serial(encoder, blobs, batch_size, path: Path) -> tuple[float, dict]:
    """decode -> encode -> write, one batch after the other; returns (seconds, per-stage seconds)."""
    timer = Timer(encoder.device)
    writer = RowWriter(path, encoder.device, batch_size)
    stages = {"decode": 0.0, "encode": 0.0, "write": 0.0}
    with timer:
        for chunk in batches(blobs, batch_size):
            with Timer(encoder.device) as t:
                pixels = torch.stack(encoder.decode(chunk))
            stages["decode"] += t.seconds
            with Timer(encoder.device) as t:
                rows = encoder.encode_pixels(pixels, to_cpu=False)
            stages["encode"] += t.seconds
            with Timer(encoder.device) as t:
                writer.write(rows)
            stages["write"] += t.seconds
        writer.close()
    return timer.seconds, stages


def pipelined(encoder, blobs, batch_size, path: Path) -> float:
    """decode (thread 1, own stream) | encode (thread 2) | copy + write (thread 3), bounded queues."""
    import queue

    from engine.data.background import OrderedWorker

    device = encoder.device
    cuda = device.type == "cuda"
    writer = RowWriter(path, device, batch_size)
    write_stage = OrderedWorker(lambda item: writer.write(*item), depth=2, name="write")
    decoded: queue.Queue = queue.Queue(maxsize=2)
    errors = []

    def decode_loop():
        stream = torch.cuda.Stream(device) if cuda else None
        try:
            for chunk in batches(blobs, batch_size):
                if cuda:
                    with torch.cuda.stream(stream):
                        pixels = torch.stack(encoder.decode(chunk))
                        ready = torch.cuda.Event()
                        ready.record(stream)
                else:
                    pixels, ready = torch.stack(encoder.decode(chunk)), None
                decoded.put((pixels, ready))
        except BaseException as error:  # noqa: BLE001
            errors.append(error)
        decoded.put(None)

    timer = Timer(device)
    with timer:
        thread = threading.Thread(target=decode_loop, name="decode", daemon=True)
        thread.start()
        while (item := decoded.get()) is not None:
            pixels, ready = item
            if ready is not None:
                torch.cuda.current_stream(device).wait_event(ready)
            rows = encoder.encode_pixels(pixels, to_cpu=False)
            done = None
            if cuda:
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(device))
            write_stage.submit((rows, done))
        thread.join()
        write_stage.close()
        writer.close()
    if errors:
        raise errors[0]
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="tiny-random", help="tiny-random, so400m-random or a SigLIP directory")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--decoder", default="auto", choices=["auto", "pil", "dali"])
    parser.add_argument("--pairs", type=int, default=3, help="interleaved (serial, pipelined) pairs")
    parser.add_argument("--compile", action="store_true", help="torch.compile the vision tower")
    parser.add_argument("--end-to-end", action="store_true", help="also time `python -m preprocess build`")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args()

    from engine.vision_encoder import build_vision_encoder

    encoder = build_vision_encoder(args.encoder, device=args.device, decoder=args.decoder,
                                   decode_batch=args.batch_size)
    device = encoder.device
    if args.compile:
        encoder.tower = torch.compile(encoder.tower)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    versions = f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else "")
    try:
        import nvidia.dali

        versions += f", DALI {nvidia.dali.__version__}"
    except ImportError:
        pass
    flops = encoder_flops(encoder)
    print(f"encoder {args.encoder} ({encoder.image_size}px, patch {encoder.patch_size}, "
          f"{len(encoder.tower.encoder.layers)} layers, compute {encoder.dtype}, {flops / 1e9:.1f} GFLOP/image), "
          f"decoder {encoder.decoder.name}; device: {name}; {versions}; load {load()}")
    blobs = make_jpegs(args.images, tuple(args.image_size))
    print(f"{len(blobs)} JPEGs {args.image_size[0]}x{args.image_size[1]}, mean "
          f"{sum(map(len, blobs)) / len(blobs) / 1e3:.1f} KB, batch {args.batch_size}")
    figures: dict = {"encoder": args.encoder, "device": name, "versions": versions, "images": len(blobs),
                     "batch_size": args.batch_size, "gflop_per_image": flops / 1e9, "decoder": encoder.decoder.name,
                     "compile": args.compile, "load_before": load()}
    work = Path(tempfile.mkdtemp(prefix="bench-images-"))

    # Warm-up: DALI pipeline, kernels, allocator, (compile).
    warm = decode_all(encoder, blobs[:args.batch_size], args.batch_size)
    encoder.encode_pixels(warm[0], to_cpu=False)

    # The split: each stage alone.
    timer = Timer(device)
    with timer:
        pixels = decode_all(encoder, blobs, args.batch_size)
    decode_s = timer.seconds
    with timer:
        rows = [encoder.encode_pixels(batch, to_cpu=False) for batch in pixels]
    encode_s = timer.seconds
    writer = RowWriter(work / "split.emb", device, args.batch_size)
    with timer:
        for batch in rows:
            writer.write(batch)
        writer.close()
    write_s = timer.seconds
    assert rows[0].dtype == torch.bfloat16 and rows[0].shape[1:] == (64, 1152)
    count = len(blobs)
    figures["split_images_per_s"] = {"decode": count / decode_s, "encode": count / encode_s, "write": count / write_s}
    print(f"split (images/s, each stage alone): decode {count / decode_s:,.1f} | encode {count / encode_s:,.1f} | "
          f"write {count / write_s:,.1f}")
    if device.type == "cuda":
        achieved = flops * count / encode_s / 1e12
        figures["encode_tflops"] = achieved
        print(f"encoder: {achieved:.0f} TFLOP/s achieved; at 600 TFLOP/s the bound is {600e12 / flops:,.0f} images/s")
    del pixels, rows

    # Serial vs pipelined, interleaved pairs.
    ratios, serial_rates, pipe_rates = [], [], []
    for pair in range(args.pairs):
        load_before = load()
        serial_s, stages = serial(encoder, blobs, args.batch_size, work / "serial.emb")
        pipe_s = pipelined(encoder, blobs, args.batch_size, work / "pipe.emb")
        assert (work / "serial.emb").read_bytes() == (work / "pipe.emb").read_bytes(), "pipeline changed the rows"
        ratios.append(serial_s / pipe_s)
        serial_rates.append(count / serial_s)
        pipe_rates.append(count / pipe_s)
        print(f"  pair {pair + 1}: serial {count / serial_s:,.1f} images/s (decode {stages['decode']:.2f} s, encode "
              f"{stages['encode']:.2f} s, write {stages['write']:.2f} s) | pipelined {count / pipe_s:,.1f} images/s "
              f"| {ratios[-1]:.2f}x  (load {load_before} -> {load()})")
    figures.update(serial_images_per_s=statistics.median(serial_rates),
                   pipelined_images_per_s=statistics.median(pipe_rates),
                   pipeline_speedup=[statistics.median(ratios), min(ratios), max(ratios)])
    print(f"pipelined: {statistics.median(pipe_rates):,.1f} images/s (median), {statistics.median(ratios):.2f}x the "
          f"serial loop (min {min(ratios):.2f}x, max {max(ratios):.2f}x); identical bytes")

    if args.end_to_end:
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
                        "--seq-length", "4096", "--output", str(work / "out"), "--no-progress"]
                       + (["--device", args.device] if args.device else []),
                       env=env, check=True, capture_output=True)
        total = time.perf_counter() - start
        figures["end_to_end_images_per_s"] = count / total
        print(f"end to end (`preprocess build`, 1 worker, process start included): {count / total:,.1f} images/s")
    figures["load_after"] = load()
    print(f"load average at the end: {figures['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
