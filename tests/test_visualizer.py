"""The diffusers visualizer on a tiny random config: training on a preprocess build lowers the loss, resume is exact,
rendering gives the requested size, a saved visualizer renders identically, a local Stable-Diffusion-layout
directory loads, and images are paired with their stored embeddings by sha256."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from distributed_launch import REPO

from engine.visualizer import Visualizer, tiny_visualizer_components
from engine.visualizer.data import ImageEmbeddingPairs, find_image_rows
from engine.visualizer.train import VisualizerTrainingConfig, train_visualizer

SAMPLE = REPO / "examples" / "data" / "sample"
IMAGES = ["astronaut.jpg", "coffee.jpg", "rocket.jpg"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """A preprocess build of three captioning records (tiny-random encoder); returns (build dir, records file)."""
    root = tmp_path_factory.mktemp("viz")
    records = root / "records.jsonl"
    records.write_text("".join(json.dumps({"id": str(i), "image": name, "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": f"Picture {i}."}]}) + "\n"
        for i, name in enumerate(IMAGES)))
    out = root / "build"
    done = subprocess.run([sys.executable, "-m", "preprocess", "build", "--input", str(records), "--image-root",
                           str(SAMPLE / "images"), "--tokenizer-type", "tiktoken", "--tokenizer-model",
                           str(REPO / "examples/data/tokenizer/tokenizer.model"), "--vision-encoder", "tiny-random",
                           "--seq-length", "256", "--output", str(out), "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, records


def config(build, save, **kw) -> VisualizerTrainingConfig:
    out, records = build
    return VisualizerTrainingConfig(data_path=str(out), image_root=str(SAMPLE / "images"), inputs=[str(records)],
                                    save=str(save), micro_batch_size=2, lr=2e-3, log_interval=1000, **kw)


def fixed_loss(visualizer: Visualizer, data: ImageEmbeddingPairs) -> float:
    """Loss on all pairs with fixed noise, timesteps and no condition dropout."""
    pixels = torch.stack([data[i][0] for i in range(len(data))])
    tokens = torch.stack([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        return visualizer.training_loss(pixels, tokens, cfg_prob=0.0,
                                        generator=torch.Generator().manual_seed(123)).item()


def test_images_are_paired_with_their_embeddings_by_sha256(build):
    from engine.vision_encoder import build_vision_encoder
    from preprocess.shards import ShardReader

    out, records = build
    pairs = find_image_rows(out, SAMPLE / "images", [str(records)])
    assert sorted(ref for ref, _ in pairs) == sorted(IMAGES)
    encoder = build_vision_encoder("tiny-random", device="cpu", decoder="pil")
    reader = ShardReader(out)
    stored = reader.embeddings(list(range(reader.num_embeddings))).float()  # [rows, 64, 1152]
    for reference, row in pairs:
        # Re-encoded alone (preprocess batched them): equal up to bf16 rounding, and no other row is as close.
        encoded = encoder.encode_images([(SAMPLE / "images" / reference).read_bytes()])[0].float()
        distances = (stored - encoded).norm(dim=(1, 2))
        assert int(distances.argmin()) == row and distances[row] < 0.05
    with pytest.raises(ValueError, match="--image-root"):
        find_image_rows(out, SAMPLE / "images" / "video", [str(records)])


def test_a_few_training_steps_lower_the_loss_and_resume_is_exact(build, tmp_path):
    data = ImageEmbeddingPairs(build[0], SAMPLE / "images", 32, [str(build[1])])
    before = fixed_loss(Visualizer.tiny(seed=0).eval(), data)
    losses = train_visualizer(config(build, tmp_path / "full", train_iters=8), log=lambda *_: None)
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    after = fixed_loss(Visualizer.load(tmp_path / "full", device="cpu"), data)
    assert after < 0.7 * before, (before, after)

    first = train_visualizer(config(build, tmp_path / "split", train_iters=4), log=lambda *_: None)
    rest = train_visualizer(config(build, tmp_path / "split", train_iters=8), log=lambda *_: None)  # resumes at 4
    assert first + rest == losses
    full, split = Visualizer.load(tmp_path / "full", device="cpu"), Visualizer.load(tmp_path / "split", device="cpu")
    for (name, a), b in zip(full.state_dict().items(), split.state_dict().values()):
        assert torch.equal(a, b), name


def test_render_size_save_load_and_guidance(tmp_path):
    visualizer = Visualizer.tiny(seed=3).eval()
    with torch.no_grad():  # a non-zero null condition, so guidance has something to act on
        visualizer.null_condition.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    tokens = F.normalize(torch.randn(2, 64, 1152, generator=torch.Generator().manual_seed(1)), dim=-1)
    images = visualizer.render(tokens, num_inference_steps=3, size=40, seed=7)
    assert [image.size for image in images] == [(40, 40), (40, 40)]
    pt = visualizer.render(tokens, num_inference_steps=3, seed=7, output_type="pt")
    assert pt.shape == (2, 3, 32, 32) and 0 <= pt.min() and pt.max() <= 1
    visualizer.save(tmp_path / "viz")
    loaded = Visualizer.load(tmp_path / "viz", device="cpu")
    assert torch.equal(loaded.render(tokens, num_inference_steps=3, seed=7, output_type="pt"), pt)
    other_scale = visualizer.render(tokens, num_inference_steps=3, seed=7, output_type="pt", guidance_scale=7.0)
    assert not torch.equal(other_scale, pt)
    with pytest.raises(ValueError, match="multiple"):
        visualizer.render(tokens, num_inference_steps=1, size=33)


def test_starts_from_a_local_stable_diffusion_directory(tmp_path):
    unet, vae, scheduler = tiny_visualizer_components(seed=5)
    for name, part in (("unet", unet), ("vae", vae), ("scheduler", scheduler)):
        part.save_pretrained(tmp_path / "sd" / name)
    visualizer = Visualizer.from_stable_diffusion(tmp_path / "sd", resolution=32)
    assert torch.equal(visualizer.unet.conv_in.weight, unet.conv_in.weight)
    assert not visualizer.vae.encoder.conv_in.weight.requires_grad  # the VAE stays frozen
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        Visualizer.from_stable_diffusion(tmp_path / "missing")


def test_render_cli(tmp_path):
    from safetensors.torch import save_file

    from engine.visualizer import render

    Visualizer.tiny(seed=0).save(tmp_path / "viz")
    tokens = F.normalize(torch.randn(3, 64, 1152), dim=-1)
    save_file({"sample_00000.image_0": tokens[0], "batch": tokens[1:]}, str(tmp_path / "t.safetensors"))
    assert render.main(["--visualizer", str(tmp_path / "viz"), "--tokens", str(tmp_path / "t.safetensors"),
                        "--output", str(tmp_path / "png"), "--steps", "2", "--size", "16"]) == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        "batch_0.png", "batch_1.png", "sample_00000.image_0.png"]
