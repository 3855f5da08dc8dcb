"""NVIDIA DALI decoding against the PIL reference: the embeddings agree within the documented tolerance
(docs/data_format.md), bad images are found and named the same way, and the GPU (nvJPEG) path keeps pixels on
the encoder's device. CI installs DALI (the `dali` extra) and also runs every preprocess test with
`--decoder dali`."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "preprocess"))
import preprocess_factory as factory  # noqa: E402

from engine.data.image_decode import dali_available  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed: pip install -e .[dali]")]

# Documented tolerance (docs/data_format.md, measured with tiny-random): every token >= 0.998 cosine, the mean
# >= 0.9999. Measured: worst token 0.9990 on 400 x 300 / 640 x 480 photos, 0.9986 on the tiny 48 x 40 fixtures
# upscaled 3.5x, where PIL's fixed-point and DALI's float bicubic differ most per pixel (up to 9 of 255 levels).
MIN_COSINE_PHOTO = 0.998
MIN_COSINE_TINY = 0.998
MIN_MEAN_COSINE = 0.9999


def _photos() -> list[bytes]:
    blobs = []
    for index, name in enumerate(factory.IMAGE_NAMES):
        size = (400, 300) if index % 2 else (640, 480)
        image = factory._photo(name, size)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG" if index % 3 else "PNG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def test_dali_and_pil_embeddings_agree_on_photos():
    from engine.vision_encoder import build_vision_encoder

    blobs = _photos()
    pil = build_vision_encoder("tiny-random", device="cpu", decoder="pil").encode_images(blobs)
    dali_encoder = build_vision_encoder("tiny-random", device="cpu", decoder="dali")
    assert dali_encoder.decoder.name == "dali-cpu"
    dali = dali_encoder.encode_images(blobs)
    cosine = F.cosine_similarity(pil.float(), dali.float(), dim=-1)  # [images, 64]
    assert cosine.min() >= MIN_COSINE_PHOTO and cosine.mean() >= MIN_MEAN_COSINE, cosine.min(dim=1).values
    assert not torch.equal(pil, dali)  # two decoders really ran


def test_dali_and_pil_builds_agree_and_record_their_decoder(tmp_path):
    from engine.data.shards import ShardReader

    factory.write_images(tmp_path / "images")
    inputs = factory.write_jsonl(tmp_path / "families.jsonl", factory.FAMILY_RECORDS)
    tokenizer = factory.make_tokenizer(tmp_path / "tokenizer")
    readers, encoders = [], []
    for decoder in ("pil", "dali"):
        out = tmp_path / decoder
        args = factory.build_args(inputs, out, tokenizer, tmp_path / "images", "--image-decoder", decoder)
        assert factory.run_cli(args) == 0
        readers.append(ShardReader(out))
        encoders.append(json.loads((out / "manifest.json").read_text())["vision_encoder"])
    assert [e["decoder"] for e in encoders] == ["pil", "dali-cpu"]
    assert encoders[0]["fingerprint"] != encoders[1]["fingerprint"]  # training never mixes the two
    rows = torch.arange(readers[0].num_embeddings)
    assert readers[1].num_embeddings == len(rows)
    cosine = F.cosine_similarity(readers[0].embeddings(rows).float(), readers[1].embeddings(rows).float(), dim=-1)
    assert cosine.min() >= MIN_COSINE_TINY and cosine.mean() >= MIN_MEAN_COSINE


def test_a_bad_image_in_a_dali_batch_is_named_like_pil_and_spares_the_others():
    from engine.data.image_decode import DaliImageDecoder, ImageDecodeError, PilImageDecoder

    good = _photos()[:3]
    jpeg = factory.jpeg_bytes("camera")
    bad = [b"", b"not an image at all", jpeg[: len(jpeg) // 2]]
    batch = [good[0], bad[0], good[1], bad[1], bad[2], good[2]]
    dali = DaliImageDecoder(168, device_id=None, max_batch=8)
    results = dali.decode_batch(batch)
    reference = PilImageDecoder(168).decode_batch(batch)
    alone = [dali.decode_batch([blob])[0] for blob in good]
    for result, expected in zip(results, reference):
        assert isinstance(result, ImageDecodeError) == isinstance(expected, ImageDecodeError)
        if isinstance(result, ImageDecodeError):
            assert (result.reason, str(result)) == (expected.reason, str(expected))
    assert [r.reason for r in results if isinstance(r, ImageDecodeError)] == \
        ["image_empty", "image_not_decodable", "image_truncated"]
    for result, single in zip([results[0], results[2], results[5]], alone):
        assert torch.equal(result, single)  # the bad neighbours changed nothing


def test_formats_dali_cannot_decode_are_decoded_by_pil_and_counted(tmp_path):
    """DALI has no GIF (still or animated) or TGA decoder: those records were rejected with DALI and kept with PIL,
    so `--image-decoder auto` lost data on a machine with DALI installed. Now PIL decodes them (its first frame),
    the manifest counts them, and both decoders keep the same records and the same pixels for those images."""
    import numpy as np
    from PIL import Image

    from engine.data.image_decode import DaliImageDecoder, PilImageDecoder

    root = tmp_path / "images"
    root.mkdir()
    frames = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8))
              for i in range(3)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[1].save(root / "still.gif")
    frames[2].save(root / "pic.tga")
    frames[0].save(root / "pic.png")
    blobs = [(root / name).read_bytes() for name in ("anim.gif", "pic.png", "pic.tga", "still.gif")]
    dali = DaliImageDecoder(64, device_id=None)
    decoded, reference = dali.decode_batch(blobs), PilImageDecoder(64).decode_batch(blobs)
    assert all(isinstance(pixels, torch.Tensor) for pixels in decoded) and dali.pil_fallbacks == 3
    for index in (0, 2, 3):  # the three PIL decoded: PIL's pixels exactly
        assert torch.equal(decoded[index], reference[index])

    qa = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "Noise."}]
    records = [{"id": name, "image": name, "conversations": qa}
               for name in ("anim.gif", "pic.png", "pic.tga", "still.gif")]
    inputs = factory.write_jsonl(tmp_path / "formats.jsonl", records)
    tokenizer = factory.make_tokenizer(tmp_path / "tokenizer")
    manifests = {}
    for decoder in ("pil", "dali"):
        out = tmp_path / decoder
        assert factory.run_cli(factory.build_args(inputs, out, tokenizer, root, "--image-decoder", decoder)) == 0
        manifests[decoder] = json.loads((out / "manifest.json").read_text())
    for decoder, fallbacks in (("pil", 0), ("dali", 3)):
        manifest = manifests[decoder]
        assert manifest["skipped"] == {} and manifest["counts"]["samples_written"] == 4, decoder
        assert manifest["pil_fallback_images"] == fallbacks, decoder


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG mixed decoder)")
def test_gpu_decode_stays_on_the_encoder_device():
    from engine.vision_encoder import build_vision_encoder

    blobs = _photos()
    encoder = build_vision_encoder("tiny-random", device="cuda", decoder="dali")
    assert encoder.decoder.name == "dali-gpu"
    pixels = encoder.decode(blobs)
    assert all(p.device.type == "cuda" for p in pixels)
    rows = encoder.encode_pixels(torch.stack(pixels), to_cpu=False)
    assert rows.device.type == "cuda" and rows.dtype == torch.bfloat16
    cpu = build_vision_encoder("tiny-random", device="cpu", decoder="dali").encode_images(blobs)
    cosine = F.cosine_similarity(rows.float().cpu(), cpu.float(), dim=-1)
    assert cosine.mean() >= 0.999  # nvJPEG + GPU resize + bf16 compute vs CPU fp32
