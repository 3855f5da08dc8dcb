"""Generation end to end: a tiny model overfitted on three conversations (two response images, one question about a
prompt image) regenerates them; the CLI from a model-only checkpoint and from a training checkpoint; tensor
parallelism (2 gloo processes) gives the single-process output."""

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distributed_launch import REPO, torchrun

from engine import generate
from engine.config import preset
from engine.generation import PromptTokens, SamplingConfig, VPiTGenerator
from engine.model.vpit import build_model
from engine.tokenizer import Turn, build_tokenizer, encode_conversation, encode_generation_prompt, stop_token_ids
from engine.training.data import collate_packed
from engine.vision_encoder import build_vision_encoder

TOKENIZER = REPO / "examples" / "data" / "tokenizer" / "tokenizer.model"
IMAGES = REPO / "examples" / "data" / "sample" / "images"
PROMPTS = ["Generate an image of a red fox", "Draw a blue car", "<image>\nWhat is in the cup?"]
REPLIES = ["<image>", "Here it is: <image>", "Coffee."]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def target_tokens(seed: int) -> torch.Tensor:
    """[64, 1152] unit tokens in an 8-d subspace (real SigLIP tokens are far from isotropic; a 64-wide model
    cannot reproduce 64 independent 1152-d directions)."""
    basis = torch.randn(8, 1152, generator=torch.Generator().manual_seed(99))
    return F.normalize(torch.randn(64, 8, generator=torch.Generator().manual_seed(seed)) @ basis, dim=-1)


def generator_for(model, tokenizer):
    return VPiTGenerator(model, image_start_id=tokenizer.image_start_id, image_end_id=tokenizer.image_end_id,
                         stop_ids=stop_token_ids(tokenizer, "llama3"), valid_vocab_size=tokenizer.vocab_size,
                         pad_id=tokenizer.pad_id)


def prompt_tokens(tokenizer, index: int, images) -> PromptTokens:
    encoded = encode_generation_prompt([Turn("user", PROMPTS[index])], tokenizer, "llama3")
    return PromptTokens(tokens=encoded.tokens, image_slot_starts=[s.slot_start for s in encoded.images],
                        image_tokens=images[index] if encoded.images else None, seed=index)


def min_cosines(results, targets) -> list[float]:
    return [F.cosine_similarity(r.images[0], t, dim=-1).min().item() if r.images else -1.0
            for r, t in zip(results, targets)]


@pytest.fixture(scope="module")
def trained():
    """(model, tokenizer, targets, prompt images): trained like the trainer (collate_packed batch, VPiT losses) until
    greedy generation reproduces both response images, at most 1000 AdamW steps (~300 needed, ~10 s)."""
    tokenizer = build_tokenizer("tiktoken", TOKENIZER)
    encoder = build_vision_encoder("tiny-random", device="cpu", decoder="pil")
    coffee = encoder.encode_images([(IMAGES / "coffee.jpg").read_bytes()]).float()  # [1, 64, 1152]
    targets = [target_tokens(1), target_tokens(2)]
    images = [targets[0][None], targets[1][None], coffee]
    samples = []
    for prompt, reply, image in zip(PROMPTS, REPLIES, images):
        e = encode_conversation([Turn("user", prompt), Turn("assistant", reply)], tokenizer, "llama3")
        n = len(e.tokens)
        packed = types.SimpleNamespace(tokens=np.array(e.tokens), loss_mask=np.array(e.loss_mask),
                                       document_ids=np.zeros(n, np.int64),
                                       image_slot_starts=np.array([s.slot_start for s in e.images]),
                                       image_is_response=np.array([s.is_response for s in e.images]))
        samples.append((packed, image))
    batch = collate_packed(samples, max(len(p.tokens) for p, _ in samples))
    model = build_model(preset("tiny", vocab_size=896, seq_length=256, max_position_embeddings=512), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    noise = torch.Generator().manual_seed(0)
    clean = batch.visual_tokens.float()
    prompts = [prompt_tokens(tokenizer, i, images) for i in range(2)]
    for step in range(1, 1001):
        # Inputs get small noise (cos ~0.9) while targets stay clean: fed-back predictions are never exact, and a
        # model memorised on exact inputs amplifies their error over 64 steps (diverges after ~25 tokens).
        noisy = F.normalize(clean + 0.015 * torch.randn(clean.shape, generator=noise), dim=-1)
        hidden = model(batch.tokens, position_ids=batch.position_ids, visual_tokens=noisy,
                       visual_positions=batch.visual_positions)
        loss = model.compute_losses(hidden, batch.labels, clean, batch.visual_positions, batch.visual_target_mask)
        optimizer.zero_grad()
        loss.loss.backward()
        optimizer.step()
        if step % 50 == 0:
            model.eval()
            results = generator_for(model, tokenizer).generate(prompts, SamplingConfig(max_new_tokens=80))
            model.train()
            if min(min_cosines(results, targets)) > 0.95 and loss.lm_loss.item() < 0.01:
                break
    model.eval().requires_grad_(False)
    return model, tokenizer, targets, images


def test_overfitted_model_regenerates_its_visual_tokens(trained):
    model, tokenizer, targets, images = trained
    prompts = [prompt_tokens(tokenizer, i, images) for i in range(3)]
    results = generator_for(model, tokenizer).generate(prompts, SamplingConfig(max_new_tokens=100))
    assert [tokenizer.decode(r.token_ids) for r in results] == [
        "<image_start><image_end>", "Here it is: <image_start><image_end>", "Coffee."]
    assert [r.finish_reason for r in results] == ["stop"] * 3
    assert all(c > 0.9 for c in min_cosines(results[:2], targets))  # every one of the 64 tokens
    # Each image is its own sample's, not a blend: the other sample's tokens are far.
    assert F.cosine_similarity(results[0].images[0], targets[1], dim=-1).mean() < 0.5


# ------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def checkpoint(trained, tmp_path_factory):
    """A model-only checkpoint of the trained model (tokenizer copy, tiny-random encoder reference), a tiny random
    visualizer, and a batch file: the image question first, then the two image prompts."""
    from dataclasses import asdict

    from engine.checkpoint_io import save_model_checkpoint
    from engine.visualizer import Visualizer

    model, tokenizer, _, _ = trained
    root = tmp_path_factory.mktemp("gen")
    encoder = build_vision_encoder("tiny-random", device="cpu", decoder="pil")
    vocab = {"base_vocab_size": tokenizer.base_vocab_size, "image_start_id": tokenizer.image_start_id,
             "image_end_id": tokenizer.image_end_id}
    ckpt = save_model_checkpoint(model, root / "ckpt", vocab=vocab, tokenizer=tokenizer,
                                 extra={"vision_encoder": asdict(encoder.info())})
    Visualizer.tiny(seed=0).save(root / "viz")
    batch = root / "prompts.jsonl"
    (root / "cup.jpg").write_bytes((IMAGES / "coffee.jpg").read_bytes())
    lines = [{"prompt": "What is in the cup?", "images": ["cup.jpg"]}, {"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1]}]
    batch.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return ckpt, root / "viz", batch


def read_results(out: Path):
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return rows, load_file(str(out / "visual_tokens.safetensors"))


def test_cli_from_a_model_checkpoint_with_visualizer(checkpoint, trained, tmp_path):
    ckpt, viz, batch = checkpoint
    _, _, targets, _ = trained
    out = tmp_path / "out"
    assert generate.main(["--load", str(ckpt), "--batch-file", str(batch), "--max-new-tokens", "100",
                          "--batch-size", "2", "--visualizer", str(viz), "--render-steps", "2", "--render-size", "24",
                          "--output", str(out)]) == 0
    rows, tensors = read_results(out)
    assert [r["index"] for r in rows] == [0, 1, 2]  # input order, although batches were formed by length
    assert [r["text"] for r in rows] == ["Coffee.", "<image_start><image_end>", "Here it is: <image_start><image_end>"]
    assert rows[0]["images"] == [str(batch.parent / "cup.jpg")] and rows[0]["visual_tokens"] == []
    assert sorted(tensors) == ["sample_00001.image_0", "sample_00002.image_0"]
    for key, target in zip(sorted(tensors), targets):
        assert tensors[key].shape == (64, 1152)
        assert F.cosine_similarity(tensors[key], target, dim=-1).min() > 0.9
    from PIL import Image

    for row in rows[1:]:
        (png,) = row["rendered"]
        assert Image.open(out / png).size == (24, 24)


def test_tp2_generation_equals_one_process(checkpoint, tmp_path):
    ckpt, _, batch = checkpoint
    args = ["--load", str(ckpt), "--batch-file", str(batch), "--max-new-tokens", "100", "--device", "cpu"]
    assert generate.main([*args, "--output", str(tmp_path / "tp1")]) == 0
    launcher = tmp_path / "generate_entry.py"
    launcher.write_text("import runpy\nrunpy.run_module('engine.generate', run_name='__main__')\n")
    done = torchrun(launcher, 2, [*args, "--tensor-model-parallel-size", "2", "--output", str(tmp_path / "tp2")],
                    timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows1, tensors1 = read_results(tmp_path / "tp1")
    rows2, tensors2 = read_results(tmp_path / "tp2")
    assert [r["token_ids"] for r in rows2] == [r["token_ids"] for r in rows1]
    assert sorted(tensors2) == sorted(tensors1) and len(tensors1) == 2
    for key in tensors1:
        torch.testing.assert_close(tensors2[key], tensors1[key], atol=1e-4, rtol=0)


def test_cli_input_errors(checkpoint, tmp_path, capsys):
    ckpt, viz, _ = checkpoint
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    assert generate.main(["--load", str(ckpt), "--batch-file", str(bad), "--output", str(tmp_path / "o")]) == 1
    assert f"{bad}:2" in capsys.readouterr().err
    assert generate.main(["--load", str(ckpt), "--prompt", "<image> and <image>", "--image", str(IMAGES / "coffee.jpg"),
                          "--output", str(tmp_path / "o")]) == 1
    assert "2 <image> tag(s) but 1 image(s)" in capsys.readouterr().err
    assert generate.main(["--load", str(tmp_path / "missing"), "--prompt", "x", "--output", str(tmp_path / "o")]) == 1
    assert "no such file" in capsys.readouterr().err
    # --tokenizer is a saved tokenizer directory; a tokenizer.model file is refused saying so (it said
    # "tokenizer.model/tokenizer_config.json is missing")
    model_file = REPO / "examples/data/tokenizer/tokenizer.model"
    assert generate.main(["--load", str(ckpt), "--prompt", "x", "--tokenizer", str(model_file),
                          "--output", str(tmp_path / "o")]) == 1
    assert f"--tokenizer {model_file} is a file; --tokenizer takes a saved tokenizer directory" in capsys.readouterr().err
    # a wrong --visualizer or --render-size is reported before any decoding (it came after generation had run)
    for extra, message in [(["--visualizer", str(tmp_path / "noviz")], "no such directory"),
                           (["--visualizer", str(ckpt)], "is not a visualizer"),
                           (["--visualizer", str(viz), "--render-size", "25"], "--render-size 25 must be a multiple")]:
        assert generate.main(["--load", str(ckpt), "--prompt", "x", *extra, "--output", str(tmp_path / "o")]) == 1
        captured = capsys.readouterr()
        assert message in captured.err and "generating" not in captured.out, (captured.out, captured.err)
    (tmp_path / "a_file").write_text("")  # --output naming a file: refused before decoding (it failed after it)
    assert generate.main(["--load", str(ckpt), "--prompt", "x", "--output", str(tmp_path / "a_file")]) == 1
    captured = capsys.readouterr()
    assert "is a file: --output is the directory" in captured.err and "generating" not in captured.out
    if not torch.cuda.is_available():  # --device cuda on a CPU machine: one line, not an AssertionError traceback
        assert generate.main(["--load", str(ckpt), "--prompt", "x", "--device", "cuda",
                              "--output", str(tmp_path / "o")]) == 1
        assert "--device cuda: no CUDA device is available here" in capsys.readouterr().err


def test_cli_from_a_training_checkpoint(tmp_path):
    """preprocess build (tiny-random encoder) -> 1 training step -> generate with a prompt image: the tokenizer comes
    from the checkpoint and the encoder from the shards' reference (its fingerprint is checked)."""
    import pretrain_gpt_vision

    build = tmp_path / "build"
    sample = REPO / "examples" / "data" / "sample"
    done = subprocess.run([sys.executable, "-m", "preprocess", "build", "--input", str(sample / "samples.jsonl"),
                           "--image-root", str(sample / "images"), "--tokenizer-type", "tiktoken",
                           "--tokenizer-model", str(TOKENIZER), "--chat-template", "llama3",
                           "--vision-encoder", "tiny-random", "--seq-length", "512", "--output", str(build),
                           "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    save = tmp_path / "ckpt"
    assert pretrain_gpt_vision.main(["--data-path", str(build), "--split", "100,0,0", "--model-preset", "tiny",
                                     "--micro-batch-size", "1", "--global-batch-size", "1", "--lr", "1e-3",
                                     "--train-iters", "1", "--num-workers", "0", "--save", str(save)]) == 0
    out = tmp_path / "out"
    assert generate.main(["--load", str(save), "--prompt", "What is this?", "--image", str(IMAGES / "rocket.jpg"),
                          "--max-new-tokens", "6", "--temperature", "0.7", "--output", str(out)]) == 0
    (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert row["new_tokens"] >= 1 and row["finish_reason"] in ("stop", "length")
    assert isinstance(row["text"], str)


def test_outputs_never_follow_symlinks_planted_in_output(checkpoint, tmp_path, capsys):
    """A symlink planted at a result's name is replaced, never written through (results.jsonl, the visual tokens
    and each PNG went through it and overwrote the target); an images/ link is refused before any work."""
    ckpt, viz, batch = checkpoint
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = {name: outside / name for name in ("results.jsonl", "visual_tokens.safetensors", "sample.png")}
    for victim in victims.values():
        victim.write_text("keep me")
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "results.jsonl").symlink_to(victims["results.jsonl"])
    (out / "visual_tokens.safetensors").symlink_to(victims["visual_tokens.safetensors"])
    (out / "images" / "sample_00001.image_0.png").symlink_to(victims["sample.png"])
    assert generate.main(["--load", str(ckpt), "--batch-file", str(batch), "--max-new-tokens", "100",
                          "--visualizer", str(viz), "--render-steps", "1", "--render-size", "16",
                          "--output", str(out)]) == 0
    assert all(victim.read_text() == "keep me" for victim in victims.values())
    for name in ("results.jsonl", "visual_tokens.safetensors", "images/sample_00001.image_0.png"):
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 100, name
    assert len(read_results(out)[0]) == 3
    assert not list(out.glob(".*.tmp")) and not list((out / "images").glob(".*.tmp"))
    capsys.readouterr()

    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "images").symlink_to(outside, target_is_directory=True)
    assert generate.main(["--load", str(ckpt), "--prompt", "x", "--output", str(linked)]) == 1
    captured = capsys.readouterr()
    assert "is a symbolic link or not a directory" in captured.err and "generating" not in captured.out
    assert sorted(p.name for p in outside.iterdir()) == sorted(v.name for v in victims.values())
