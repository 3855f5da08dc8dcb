"""SigLIP features from MetaMorph's layer: `hidden_states[-1]` (before post_layernorm) by default, checked against
a reference written here with transformers alone, on a tiny random SigLIP whose post_layernorm is far from the
identity (so the two layers really differ)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "preprocess"))
import preprocess_factory as factory  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGES = ["photos/astronaut.jpg", "photos/coffee.jpg", "photos/chelsea_crop.png", "photos/rocket_gray.png"]


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """A 2-layer SigLIP (1152 wide, 56 px / patch 14: a 4 x 4 grid) saved as a local checkpoint."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=1152, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=56, patch_size=14, vision_use_head=False)
    torch.manual_seed(0)
    model = SiglipVisionModel(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a learned per-channel scale and shift, as in the real so400m weights
        model.post_layernorm.weight.copy_(1 + 0.5 * torch.randn(1152, generator=generator))
        model.post_layernorm.bias.copy_(0.3 * torch.randn(1152, generator=generator))
    path = tmp_path_factory.mktemp("siglip") / "tiny-siglip"
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("layer")
    factory.write_images(root / "images")
    records = [{"id": f"r{i}", "image": name, "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A picture."}]}
        for i, name in enumerate(IMAGES)]
    inputs = factory.write_jsonl(root / "records.jsonl", records)
    tokenizer = factory.make_tokenizer(root / "tokenizer", records)
    return root, inputs, tokenizer


def _build(data, siglip_dir, name, *extra):
    root, inputs, tokenizer = data
    out = root / name
    args = factory.build_args(inputs, out, tokenizer, root / "images", "--image-decoder", "pil", *extra)
    args[args.index("tiny-random")] = str(siglip_dir)
    assert factory.run_cli(args) == 0
    return out


def _stored(out: Path) -> torch.Tensor:
    """Rows in the order of IMAGES (every image is distinct, first seen in record order)."""
    from engine.data.shards import ShardReader

    reader = ShardReader(out)
    assert reader.num_embeddings == len(IMAGES)
    return reader.embeddings(np.arange(len(IMAGES))).float()


def _reference(data, siglip_dir, layer: int, post_layernorm: bool) -> torch.Tensor:
    """Independent of engine/: PIL decode + bicubic resize, SigLIP with output_hidden_states, fp32 pooling."""
    from PIL import Image
    from transformers import SiglipVisionModel

    root = data[0]
    model = SiglipVisionModel.from_pretrained(siglip_dir).eval()
    size = model.config.image_size
    pixels = []
    for name in IMAGES:
        image = Image.open(root / "images" / name).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        pixels.append((array - 0.5) / 0.5)
    with torch.no_grad():
        output = model(pixel_values=torch.stack(pixels), output_hidden_states=True)
        features = output.last_hidden_state if post_layernorm else output.hidden_states[layer]
    batch, tokens, dim = features.shape
    grid = int(tokens ** 0.5)
    maps = features.float().transpose(1, 2).reshape(batch, dim, grid, grid)
    pooled = F.interpolate(maps, size=(8, 8), mode="bilinear", align_corners=False)
    return F.normalize(pooled.reshape(batch, dim, 64).transpose(1, 2), dim=-1)


def _within_bf16(stored: torch.Tensor, reference: torch.Tensor) -> bool:
    # bf16 keeps 8 significant bits: rounding moves a value by at most 2**-9 of itself; allow 2**-8 for
    # fp32 summation-order differences between the two SigLIP call paths.
    return bool(((stored - reference).abs() <= 2 ** -8 * reference.abs() + 1e-7).all())


def test_default_is_last_layer_before_post_layernorm(data, siglip_dir):
    out = _build(data, siglip_dir, "default")
    stored = _stored(out)
    before = _reference(data, siglip_dir, -1, post_layernorm=False)
    after = _reference(data, siglip_dir, -1, post_layernorm=True)
    assert _within_bf16(stored, before)
    # The post-layernorm features really differ here (cosine far from 1), so the check above can fail.
    assert F.cosine_similarity(before, after, dim=-1).mean() < 0.95
    assert not _within_bf16(stored, after)
    encoder = json.loads((out / "manifest.json").read_text())["vision_encoder"]
    assert encoder["feature_layer"] == -1 and encoder["post_layernorm"] is False


def test_post_layernorm_option_and_other_layers(data, siglip_dir):
    default = json.loads((_build(data, siglip_dir, "default2") / "manifest.json").read_text())["vision_encoder"]
    out = _build(data, siglip_dir, "post-ln", "--vision-post-layernorm")
    assert _within_bf16(_stored(out), _reference(data, siglip_dir, -1, post_layernorm=True))
    post = json.loads((out / "manifest.json").read_text())["vision_encoder"]
    out = _build(data, siglip_dir, "layer1", "--vision-feature-layer", "1")
    assert _within_bf16(_stored(out), _reference(data, siglip_dir, 1, post_layernorm=False))
    layer1 = json.loads((out / "manifest.json").read_text())["vision_encoder"]
    assert post["post_layernorm"] is True and layer1["feature_layer"] == 1
    # The fingerprint covers the layer choice: builds of different features never mix in training.
    assert len({default["fingerprint"], post["fingerprint"], layer1["fingerprint"]}) == 3


def test_feature_layer_out_of_range_is_a_configuration_error(data, siglip_dir, capsys):
    root, inputs, tokenizer = data
    args = factory.build_args(inputs, root / "bad-layer", tokenizer, root / "images", "--vision-feature-layer", "5")
    args[args.index("tiny-random")] = str(siglip_dir)
    assert factory.run_cli(args) == 2
    err = capsys.readouterr().err
    assert "--vision-feature-layer 5" in err and "2 layers" in err
    assert not (root / "bad-layer").exists()


def test_fingerprint_from_files_matches_the_built_encoder_and_follows_the_weights(siglip_dir, tmp_path):
    import shutil

    from engine.vision_encoder import build_vision_encoder, describe_vision_encoder

    described = describe_vision_encoder(str(siglip_dir), device="cpu", decoder="pil")
    built = build_vision_encoder(str(siglip_dir), device="cpu", decoder="pil")
    assert built.info() == described
    copy = tmp_path / "tiny-siglip"
    shutil.copytree(siglip_dir, copy)
    assert describe_vision_encoder(str(copy), device="cpu", decoder="pil").fingerprint == described.fingerprint
    weights = copy / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(blob))
    assert describe_vision_encoder(str(copy), device="cpu", decoder="pil").fingerprint != described.fingerprint
