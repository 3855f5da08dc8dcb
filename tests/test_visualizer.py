"""The diffusers visualizer on a tiny random config: training on a preprocess build lowers the loss, resume is exact,
rendering gives the requested size, a saved visualizer renders identically, a local Stable-Diffusion-layout
directory loads, images are paired with their stored embeddings by sha256, the conditioner is MetaMorph's (same
math and parameter names as its adapter), its published layout loads with weights_only, and rendering never writes
outside --output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from distributed_launch import REPO

from engine.visualizer import ConditionerConfig, SigLIPConditioner, Visualizer, tiny_visualizer_components
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


class ReferenceAdapter(torch.nn.Module):
    """MetaMorph's `SimplifiedSigLIPProjector` in its "mlp" mode, re-written from facebookresearch/metamorph
    `inference/adapter.py` as an independent reference: Linear -> LayerNorm -> ReLU, then Linear -> LayerNorm."""

    def __init__(self, input_dim=1152, hidden_dim=2048, output_dim=768, num_layers=2):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(input_dim, hidden_dim)])
        self.norms = torch.nn.ModuleList([torch.nn.LayerNorm(hidden_dim)])
        for _ in range(num_layers - 2):
            self.layers.append(torch.nn.Linear(hidden_dim, hidden_dim))
            self.norms.append(torch.nn.LayerNorm(hidden_dim))
        self.layers.append(torch.nn.Linear(hidden_dim, output_dim))
        self.norms.append(torch.nn.LayerNorm(output_dim))

    def forward(self, x):
        for layer, norm in zip(self.layers[:-1], self.norms[:-1]):
            x = F.relu(norm(layer(x)))
        return self.norms[-1](self.layers[-1](x))


@pytest.mark.parametrize("num_layers", [2, 3])
def test_conditioner_is_the_reference_adapter(num_layers):
    config = ConditionerConfig(hidden_dim=96, output_dim=48, num_layers=num_layers)
    ours = SigLIPConditioner(config)
    reference = ReferenceAdapter(1152, 96, 48, num_layers)
    with torch.no_grad():  # LayerNorms away from their identity init, so a missing or misplaced norm shows
        for param in ours.parameters():
            param.normal_(0, 0.5)
    reference.load_state_dict(ours.state_dict())  # same parameter names and shapes (strict)
    tokens = F.normalize(torch.randn(2, 64, 1152), dim=-1)
    torch.testing.assert_close(ours(tokens), reference(tokens), rtol=0, atol=0)
    default = ConditionerConfig()
    assert (default.input_dim, default.hidden_dim, default.output_dim, default.num_layers, default.num_tokens) == (
        1152, 2048, 768, 2, 77)
    with pytest.raises(ValueError, match="xattn"):
        ConditionerConfig(mode="xattn")


def test_context_is_padded_to_77_with_zeros_and_dropped_to_all_zeros():
    from engine.visualizer.train import VisualizerTrainingConfig

    visualizer = Visualizer.tiny(seed=0)
    tokens = F.normalize(torch.randn(3, 64, 1152), dim=-1)
    context = visualizer.condition(tokens, drop=torch.tensor([False, True, False]))
    assert context.shape == (3, 77, 64)
    assert torch.equal(context[:, 64:], torch.zeros(3, 13, 64))  # padding rows
    assert torch.equal(context[1], torch.zeros(77, 64))  # the unconditional input: zeros, nothing learned
    torch.testing.assert_close(context[[0, 2], :64], visualizer.conditioner(tokens[[0, 2]]))
    assert context[0, :64].abs().sum() > 0
    assert VisualizerTrainingConfig(data_path="d", image_root="i", save="s").cfg_prob == 0.8  # the reference's
    assert not any(name.startswith("null") for name, _ in visualizer.named_parameters())


def write_metamorph_layout(root, *, unet_shift: float = 0.25, payload: Path | None = None):
    """Tiny files in MetaMorph's published layout (as its visualization/train.py writes them, with torch.save),
    next to a local SD-layout directory; returns (visualizer dir, sd dir, adapter state, unet state)."""
    unet, vae, scheduler = tiny_visualizer_components(seed=5)
    sd = root / "sd"
    for name, part in (("unet", unet), ("vae", vae), ("scheduler", scheduler)):
        part.save_pretrained(sd / name)
    config = {"input_dim": 1152, "hidden_dim": 96, "output_dim": 64, "num_tokens": 77, "num_layers": 2,
              "num_heads": 8, "mode": "mlp"}
    adapter = ReferenceAdapter(1152, 96, 64, 2)
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(0, 0.3)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-5, betas=(0.9, 0.999), weight_decay=0.01)
    adapter(torch.randn(1, 64, 1152)).sum().backward()
    optimizer.step()
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda step: 1.0)
    viz = root / "metamorph"
    viz.mkdir()
    (viz / "model_config.json").write_text(json.dumps(config, indent=2))
    checkpoint = {"model_state_dict": adapter.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                  "scheduler_state_dict": schedule.state_dict(), "global_step": 1000, "model_config": config}
    if payload is not None:
        checkpoint["extra"] = Payload(str(payload))
    torch.save(checkpoint, viz / "adapter_checkpoint.pt")
    unet_state = {k: v + unet_shift for k, v in unet.state_dict().items()}  # a "fine-tuned" UNet
    torch.save({"model_state_dict": unet_state, "global_step": 1000}, viz / "unet_checkpoint.pt")
    return viz, sd, adapter.state_dict(), unet_state


class Payload:
    """Unpickling this would create a file: the `.pt` reader must refuse it before that can happen."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_loads_metamorphs_published_layout_with_weights_only(tmp_path):
    from engine.visualizer import render

    viz, sd, adapter_state, unet_state = write_metamorph_layout(tmp_path)
    visualizer = Visualizer.load(viz, device="cpu", stable_diffusion=sd)
    for key, value in adapter_state.items():
        assert torch.equal(visualizer.conditioner.state_dict()[key], value), key
    for key, value in unet_state.items():  # the checkpoint's UNet, not the SD directory's
        assert torch.equal(visualizer.unet.state_dict()[key], value), key
    assert visualizer.conditioner.config.hidden_dim == 96 and visualizer.condition(torch.zeros(1, 64, 1152)).shape \
        == (1, 77, 64)

    from safetensors.torch import save_file

    save_file({"sample_00000.image_0": F.normalize(torch.randn(64, 1152), dim=-1)}, str(tmp_path / "t.safetensors"))
    assert render.main(["--visualizer", str(viz), "--stable-diffusion", str(sd), "--tokens",
                        str(tmp_path / "t.safetensors"), "--output", str(tmp_path / "png"), "--steps", "2",
                        "--size", "16"]) == 0
    assert [p.name for p in (tmp_path / "png").iterdir()] == ["sample_00000.image_0.png"]
    with pytest.raises(ValueError, match="--stable-diffusion"):
        Visualizer.load(viz, device="cpu")
    (viz / "unet_checkpoint.pt").unlink()  # adapter-only training: the SD UNet as it is
    plain = Visualizer.load(viz, device="cpu", stable_diffusion=sd)
    assert torch.equal(plain.unet.conv_in.weight, UNetFrom(sd).conv_in.weight)


def UNetFrom(sd):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(sd, subfolder="unet", local_files_only=True)


def test_a_pickle_payload_in_the_published_layout_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    viz, sd, _, _ = write_metamorph_layout(tmp_path, payload=marker)
    with pytest.raises(ValueError, match="weights_only"):
        Visualizer.load(viz, device="cpu", stable_diffusion=sd)
    assert not marker.exists()
    config = json.loads((viz / "model_config.json").read_text())
    (viz / "model_config.json").write_text(json.dumps({**config, "mode": "xattn"}))
    with pytest.raises(ValueError, match="model_config.json.*xattn"):
        Visualizer.load(viz, device="cpu", stable_diffusion=sd)


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_render_never_writes_outside_output(tmp_path):
    from safetensors.torch import save_file

    from engine.visualizer import render

    Visualizer.tiny(seed=0).save(tmp_path / "viz")
    work = tmp_path / "a" / "b"
    out = work / "png"
    out.mkdir(parents=True)
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"keep")
    (out / "planted.png").symlink_to(outside)  # a link planted where a key's PNG goes is replaced, not followed
    keys = ["../../x", "../../../outside", str(tmp_path / "abs"), "/etc/passwd_like", "a/b", "a_b", ".hidden",
            "..", "", "planted", "ok.name-1"]
    tokens = F.normalize(torch.randn(len(keys), 64, 1152), dim=-1)
    save_file({k: t for k, t in zip(keys, tokens)}, str(tmp_path / "t.safetensors"))
    before = files_under(tmp_path) - files_under(out)
    code = render.main(["--visualizer", str(tmp_path / "viz"), "--tokens", str(tmp_path / "t.safetensors"),
                        "--output", str(out), "--steps", "1", "--size", "8"])
    assert code == 0
    assert files_under(tmp_path) - files_under(out) == before  # nothing new outside --output
    assert outside.read_bytes() == b"keep"
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == len(keys) and all(not n.startswith(".") for n in written)
    assert all((out / n).is_file() and not (out / n).is_symlink() for n in written)
    assert "a_b.png" in written and "a_b-2.png" in written and "ok.name-1.png" in written
    for key in keys:
        stem = render.safe_file_stem(key)
        assert os.sep not in stem and not stem.startswith(".") and stem


@pytest.mark.parametrize("case", ["nan-tokens", "directory-at-a-png", "output-is-a-file", "deep-json",
                                  "truncated-unet"])
def test_render_faults_are_one_line(tmp_path, capsys, case):
    """NaN tokens rendered a noise PNG (with a numpy warning); a directory where a PNG goes, or an --output that is
    a file, ended in an OSError traceback; so did visualizer.json nested too deeply (RecursionError) and a
    truncated UNet (diffusers' OSError)."""
    from safetensors.torch import save_file

    from engine.visualizer import render

    Visualizer.tiny(seed=0).save(tmp_path / "viz")
    tokens = F.normalize(torch.randn(64, 1152), dim=-1)
    if case == "nan-tokens":
        tokens[3, 5] = float("nan")
    save_file({"x": tokens}, str(tmp_path / "t.safetensors"))
    out = tmp_path / "png"
    if case == "directory-at-a-png":
        (out / "x.png").mkdir(parents=True)
    elif case == "output-is-a-file":
        out.write_text("mine")
    elif case == "deep-json":
        (tmp_path / "viz" / "visualizer.json").write_text("[" * 100_000 + "]" * 100_000)
    elif case == "truncated-unet":
        (unet,) = (tmp_path / "viz" / "unet").glob("*.safetensors")
        unet.write_bytes(unet.read_bytes()[:200])
    code = render.main(["--visualizer", str(tmp_path / "viz"), "--tokens", str(tmp_path / "t.safetensors"),
                        "--output", str(out), "--steps", "1", "--size", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    want = {"nan-tokens": "tensor 'x' holds NaN or Inf", "directory-at-a-png": f"{out / 'x.png'}: Is a directory",
            "output-is-a-file": "File exists", "deep-json": "visualizer.json: not usable JSON",
            "truncated-unet": f"--visualizer {tmp_path / 'viz'}: "}[case]
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and want in err[0], err
    assert not (out.is_dir() and any(p.name.endswith(".tmp") for p in out.iterdir()))


def test_a_small_demo_run_renders_coffee_closest_to_coffee(build, tmp_path):
    """The quick start's picture recipe on a small run: an autoencoder and a visualizer trained on the build's
    three images (astronaut, coffee, rocket) render coffee's visual tokens closer to coffee.jpg than to every other
    bundled image, by PSNR and by SSIM (the demo's check, with the demo's settings)."""
    from engine.visualizer.autoencoder import AutoencoderTrainingConfig, train_autoencoder
    from engine.visualizer.similarity import closest_is_target, expand_images, score_against

    out, records = build
    common = {"data_path": str(out), "image_root": str(SAMPLE / "images"), "inputs": [str(records)]}
    train_autoencoder(AutoencoderTrainingConfig(**common, save=str(tmp_path / "vae"), resolution=32, levels=3,
                                                train_iters=150, micro_batch_size=3), log=lambda *_: None)
    train_visualizer(VisualizerTrainingConfig(**common, save=str(tmp_path / "viz"), vae=str(tmp_path / "vae"),
                                              prediction_type="sample", cfg_prob=0.1, train_iters=300,
                                              micro_batch_size=3, lr=2e-3, lr_warmup_iters=20, lr_decay_iters=300),
                     log=lambda *_: None)
    visualizer = Visualizer.load(tmp_path / "viz", device="cpu")
    data = ImageEmbeddingPairs(out, SAMPLE / "images", 32, [str(records)])
    coffee_tokens = data[[ref for ref, _ in data.pairs].index("coffee.jpg")][1]
    bundled = expand_images([SAMPLE / "images"])
    assert len(bundled) == 12  # every bundled picture, the two inside the WebDataset tar too
    for guidance in (1.0, 3.0):  # the demo's, and with classifier-free guidance against the zero context
        picture = tmp_path / f"coffee_g{guidance}.png"
        visualizer.render(coffee_tokens, guidance_scale=guidance, num_inference_steps=10, seed=0)[0].save(picture)
        scores = score_against(picture, bundled)
        assert closest_is_target(scores, SAMPLE / "images" / "coffee.jpg") == (True, True), [
            (s.path.rsplit("/", 1)[-1], round(s.psnr, 2), round(s.ssim, 3)) for s in scores]


def test_learning_rate_schedule_is_the_references():
    import math

    from engine.visualizer.train import lr_factor

    def reference(step, target=16000):  # facebookresearch/metamorph visualization/train.py, lr_lambda
        peak = target // 4
        if step < peak:
            return math.log(step + 1) / math.log(peak + 1)
        if step < target:
            return 1.0 - (step - peak) / (target - peak)
        return 0.0

    for step in (0, 1, 10, 3999, 4000, 4001, 10000, 15999, 16000, 20000):
        assert lr_factor(step, 4000, 16000) == pytest.approx(reference(step), abs=1e-12)
    assert lr_factor(5, 0, None) == 1.0 and lr_factor(2, 4, None) == pytest.approx(math.log(3) / math.log(5))


def test_train_cli_faults_are_one_line(build, tmp_path, capsys):
    """A --pretrained directory that does not exist was a diffusers traceback about connecting to huggingface.co;
    --device cuda without a GPU was an AssertionError traceback."""
    from engine.visualizer import train

    args = ["--data-path", str(build[0]), "--image-root", str(SAMPLE / "images"), "--input", str(build[1]),
            "--train-iters", "1", "--micro-batch-size", "1"]
    assert train.main([*args, "--pretrained", str(tmp_path / "sd15"), "--save", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    expected = (f"error: Stable Diffusion directory {tmp_path / 'sd15'}: no such directory (weights are read from a "
                "local path; nothing is downloaded)")
    assert err == [expected], err
    if not torch.cuda.is_available():
        assert train.main([*args, "--device", "cuda", "--save", str(tmp_path / "b")]) == 1
        assert "--device cuda: no CUDA device is available here" in capsys.readouterr().err
