"""MetaQuery through the real CLIs on a build of the bundled sample images (examples/data/sample):

  * `python -m preprocess build --targets vae-latents`: latents of every image equal the VAE's, stored once per
    distinct image beside the SigLIP rows; text-to-image and instruction records become samples, VQA does not;
  * `pretrain_gpt_vision.py --recipe metaquery`: the frozen LLM gets no gradient and stays bitwise equal to its
    checkpoint while the queries and the connector change; resume is bitwise exact (CPU fp32); TP2 on the frozen
    LLM logs the losses of one process; a tiny model overfits (denoising loss / 5 and more) and
    `python -m engine.generate --recipe metaquery` renders each training caption closer to its own picture than to
    every other bundled image; the Sana (flow-matching) decoder trains and renders with a source image.

Models are tiny and built here (no download): a tiktoken tokenizer, the tiny random SigLIP, a random LLaMA saved as
a Chrysalis checkpoint, tiny diffusers decoders, and the tiny AutoencoderKL of `engine.visualizer.autoencoder`
trained (by that module) on the bundled images at 16 px, so that rendered latents decode to recognisable pictures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_launch import REPO, torchrun

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLE = REPO / "examples" / "data" / "sample" / "images"
ENTRY = REPO / "pretrain_gpt_vision.py"
SIZE = 16  # pixels; the tiny VAE's latents are 4 x 8 x 8
# Every distinct picture of the bundled sample (the comparison set of the overfitting test).
BUNDLED = ["astronaut.jpg", "coffee.jpg", "chelsea.jpg", "chelsea_eyes.jpg", "rocket.jpg", "rocket_gray.jpg",
           "webdataset-000.tar::000001.jpg", "webdataset-000.tar::000002.jpg"] + [f"video/frame{i}.jpg" for i in range(4)]
# Text-to-image pairs: one caption per distinct picture. (rocket.jpg is the instruction pair's source instead: the
# 16 px tiny autoencoder reconstructs it closer to its grey copy, so no model could render it closer to itself.)
CAPTIONS = {"astronaut.jpg": "a photo of an astronaut in an orange suit", "coffee.jpg": "a cup of coffee on a saucer",
            "chelsea.jpg": "a ginger cat looking at the camera",
            "webdataset-000.tar::000001.jpg": "a man with a camera on a tripod",
            "webdataset-000.tar::000002.jpg": "coins on a table"}


def _blob(name: str) -> bytes:
    if "::" in name:
        tar, member = name.split("::")
        with tarfile.open(SAMPLE / tar) as archive:
            return archive.extractfile(member).read()
    return (SAMPLE / name).read_bytes()


def _pixels(name: str) -> torch.Tensor:
    """[3, 16, 16] in [0, 1]: the picture as the build's latents see it (the reference's target transform)."""
    from preprocess.vae_latents import target_pixels

    return (target_pixels(_blob(name), SIZE) + 1) / 2


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Records, a trained tiny VAE, decoder directories, the build and a tiny LLM checkpoint (module-wide)."""
    from diffusers import AutoencoderKL

    from engine.checkpoint_io import save_model_checkpoint
    from engine.config import preset
    from engine.metaquery.decoder import write_tiny_decoder
    from engine.model import build_model
    from engine.tokenizer import build_tokenizer
    from engine.training.data import padded_vocab_size
    from engine.visualizer import autoencoder

    root = tmp_path_factory.mktemp("metaquery")
    records = root / "records.jsonl"
    lines = [{"id": f"t2i-{i}", "image": name, "conversations": [
        {"from": "human", "value": caption}, {"from": "gpt", "value": "<image>"}]}
        for i, (name, caption) in enumerate(CAPTIONS.items())]
    lines.append({"id": "edit-0", "image": ["rocket.jpg", "rocket_gray.jpg"], "conversations": [
        {"from": "human", "value": "<image>\nMake this photo black and white."}, {"from": "gpt", "value": "<image>"}]})
    lines.append({"id": "vqa-0", "image": "astronaut.jpg", "conversations": [  # no response image: not a sample
        {"from": "human", "value": "<image>\nWhat is the person wearing?"}, {"from": "gpt", "value": "A suit."}]})
    records.write_text("".join(json.dumps(line) + "\n" for line in lines))

    # The visualizer's tiny AutoencoderKL, trained by its own trainer on the pictures as the build will see them.
    pixels = torch.stack([_pixels(name) * 2 - 1 for name in BUNDLED])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(autoencoder, "build_pixels", lambda config: pixels)
        autoencoder.train_autoencoder(autoencoder.AutoencoderTrainingConfig(
            data_path="(bundled pictures)", image_root=str(SAMPLE), save=str(root / "vae"), resolution=SIZE,
            train_iters=150, micro_batch_size=12, lr=3e-3, log_interval=1000), log=lambda *_: None)
    vae = AutoencoderKL.from_pretrained(root / "vae")
    decoders = {"unet": write_tiny_decoder(root / "sd", "unet", vae, sample_size=SIZE // 2),
                # x0 targets: what memorises a few pictures in a few hundred CPU steps (epsilon needs far more
                # steps at high noise, where rendering starts; the visualizer's demo found the same)
                "unet-x0": write_tiny_decoder(root / "sd-x0", "unet", vae, sample_size=SIZE // 2,
                                              prediction_type="sample"),
                "sana": write_tiny_decoder(root / "sana", "sana", vae, sample_size=SIZE // 2)}
    build = root / "build"
    done = _run(["-m", "preprocess", "build", "--input", str(records), "--image-root", str(SAMPLE),
                 "--tokenizer-type", "tiktoken", "--tokenizer-model",
                 str(REPO / "examples/data/tokenizer/tokenizer.model"), "--vision-encoder", "tiny-random",
                 "--seq-length", "256", "--output", str(build), "--no-progress", "--image-decoder", "pil",
                 "--targets", "vae-latents", "--vae", str(decoders["unet"]), "--vae-image-size", str(SIZE)])
    assert done.returncode == 0, done.stderr[-3000:]

    # A random tiny LLaMA as a Chrysalis model-only checkpoint with the build's tokenizer (what --llm reads).
    # init std 0.1: at 0.02 a random 64-wide LLaMA attends almost uniformly, so its states barely tell prompts
    # apart; a pretrained LLM does, and the tests need a stand-in that does.
    tokenizer = build_tokenizer("tiktoken", REPO / "examples/data/tokenizer/tokenizer.model")
    size = padded_vocab_size(tokenizer.vocab_size, 128, 2)
    model = build_model(preset("tiny", vocab_size=size, real_vocab_size=tokenizer.vocab_size, init_method_std=0.1),
                        seed=11)
    vocab = {"base_vocab_size": tokenizer.base_vocab_size, "image_start_id": tokenizer.image_start_id,
             "image_end_id": tokenizer.image_end_id}
    llm = save_model_checkpoint(model, root / "llm", vocab=vocab, tokenizer=tokenizer)
    return {"root": root, "records": records, "build": build, "decoders": decoders, "llm": llm, "vae": root / "vae"}


def _train_args(world, save: Path, *extra: str, decoder: str = "unet") -> list[str]:
    return ["--recipe", "metaquery", "--data-path", str(world["build"]), "--decoder", str(world["decoders"][decoder]),
            "--llm", str(world["llm"]), "--num-queries", "8", "--connector-layers", "2", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--lr", "2e-3", "--lr-warmup-iters", "0", "--split", "100,0,0",
            "--num-workers", "0", "--seed", "5", "--save", str(save), "--log-jsonl", str(save / "log.jsonl"),
            "--log-interval", "1", *extra]


def _losses(save: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (save / "log.jsonl").read_text().splitlines()]


def _saved(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_build_stores_every_images_latent_once_beside_its_siglip_row(world):
    from diffusers import AutoencoderKL

    from engine.metaquery.data import MetaQueryDataset
    from engine.tokenizer import Turn, encode_generation_prompt, load_saved_tokenizer

    build = world["build"]
    manifest = json.loads((build / "manifest.json").read_text())
    latents = manifest["latents"]
    assert latents["rows"] == manifest["embeddings"]["rows"] == 7  # 5 captioned + rocket + rocket_gray, astronaut once
    assert latents["row_shape"] == [8, 8, 8] and latents["vae"]["kind"] == "gaussian"
    assert all(f in manifest["sha256"] for f in (s["path"] for s in latents["segments"]))
    assert _run(["-m", "preprocess", "verify", str(build)]).returncode == 0
    data = MetaQueryDataset(build)
    assert len(data) == 6  # 5 text-to-image + 1 instruction; the VQA record has no response image
    vae = AutoencoderKL.from_pretrained(world["vae"]).eval()
    tokenizer = load_saved_tokenizer(build / "tokenizer")
    by_prompt = {tokenizer.decode(list(data[i].tokens)): data[i] for i in range(len(data))}
    for name, caption in CAPTIONS.items():
        expected = encode_generation_prompt([Turn("user", caption)], tokenizer, "llama3").tokens
        sample = next(s for s in by_prompt.values() if list(s.tokens) == expected)  # training prompt == generation's
        with torch.no_grad():
            posterior = vae.encode(_pixels(name)[None] * 2 - 1).latent_dist
        stored = data.latents.rows_of([sample.target_row])[0].float()
        torch.testing.assert_close(stored, torch.cat([posterior.mean, posterior.std], 1)[0].bfloat16().float())
    edit = next(s for s in by_prompt.values() if len(s.image_rows))
    assert len(edit.image_rows) == 1 and edit.image_rows[0] != edit.target_row


def test_llm_gets_no_gradient_and_stays_bitwise_while_queries_and_connector_train(world, tmp_path):
    from engine.checkpoint_io import load_model_checkpoint
    from engine.metaquery.config import parse_metaquery_config
    from engine.metaquery.trainer import MetaQueryTrainer
    from engine.training.parallel import build_device_mesh

    config, mq = parse_metaquery_config(_train_args(world, tmp_path / "run", "--train-iters", "3")[2:])
    trainer = MetaQueryTrainer(config, mq, build_device_mesh(), log=lambda *_: None)
    queries = trainer.model.queries.detach().clone()
    connector = {k: v.detach().clone() for k, v in trainer.model.connector.state_dict().items()}
    decoder = {k: v.detach().clone() for k, v in trainer.frozen_decoder.state_dict().items()}
    assert not any(p.requires_grad for p in trainer.llm.model.parameters())
    assert {id(p) for p in trainer.params}.isdisjoint(id(p) for p in trainer.llm.model.parameters())
    trainer.train()
    reference, _ = load_model_checkpoint(world["llm"])
    for name, param in trainer.llm.model.named_parameters():
        assert param.grad is None, name
        assert torch.equal(param, reference.state_dict()[name]), name
    assert all(torch.equal(v, decoder[k]) for k, v in trainer.frozen_decoder.state_dict().items())
    assert not torch.equal(trainer.model.queries, queries)  # the queries learn through the frozen LLM
    assert all(not torch.equal(trainer.model.connector.state_dict()[k], v) for k, v in connector.items()
               if k.endswith("weight") and v.ndim == 2)
    saved = _saved(tmp_path / "run" / "iter_0000003")
    assert set(saved) >= {"model.queries"} and not any(".layers.0.attention" in k and "connector" not in k
                                                       for k in saved)  # no LLM tensor in the checkpoint


def test_resume_is_bitwise_and_tp2_llm_and_fsdp2_log_the_losses_of_one_process(world, tmp_path):
    common = ["--train-iters", "4", "--cfg-prob", "0.5"]
    full = tmp_path / "full"
    done = _run([str(ENTRY), *_train_args(world, full, *common)])
    assert done.returncode == 0, done.stderr[-3000:]
    split = tmp_path / "split"
    first = _run([str(ENTRY), *_train_args(world, split, *common, "--exit-interval", "2")])
    assert first.returncode == 0 and (split / "iter_0000002").is_dir(), first.stderr[-3000:]
    second = _run([str(ENTRY), *_train_args(world, split, *common, "--load", str(split))])
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-3000:]
    a, b = _saved(full / "iter_0000004"), _saved(split / "iter_0000004")
    assert set(a) == set(b) and any(k.startswith("optimizer.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _losses(full) == _losses(split)

    tp = tmp_path / "tp2"
    done = torchrun(ENTRY, 2, _train_args(world, tp, *common, "--tensor-model-parallel-size", "2"))
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(_losses(tp), _losses(full), rtol=2e-5)
    torch.testing.assert_close(_saved(tp / "iter_0000004")["model.queries"], a["model.queries"], rtol=1e-4,
                               atol=1e-6)
    dp = tmp_path / "fsdp2"  # two data-parallel ranks, FSDP2 over the head: the same global batches and losses
    done = torchrun(ENTRY, 2, _train_args(world, dp, *common, "--data-parallel-sharding", "fsdp"))
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(_losses(dp), _losses(full), rtol=2e-5)


def _fixed_loss(trainer) -> float:
    """Mean denoising loss of every sample at 8 noise levels with fixed noise and no CFG dropout."""
    from engine.metaquery.data import MetaQueryCollate

    collate = MetaQueryCollate(seed=99, pad_id=trainer.collate.pad_id, nulls=trainer.collate.nulls,
                               noise=trainer.collate.noise, cfg_prob=0.0, cfg_instruct_prob=0.0)
    data = trainer.datasets[0][1]
    items = [(i, data[i], data.embeddings(data[i].image_rows), data.latents.rows_of([data[i].target_row])[0])
             for i in range(len(data))]
    batch = collate(items * 8)
    batch.u[:] = torch.arange(8, dtype=torch.float64).repeat_interleave(len(items)) / 8 + 1 / 16
    with torch.no_grad():
        return float(trainer.per_sample_losses(batch).mean())


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a.double() - b.double()) ** 2).mean()))


def test_tiny_metaquery_overfits_and_renders_each_caption_closest_to_its_picture(world, tmp_path):
    from PIL import Image

    from engine.metaquery.config import parse_metaquery_config
    from engine.metaquery.trainer import MetaQueryTrainer
    from engine.training import checkpoint as ckpt
    from engine.training.parallel import build_device_mesh

    save = tmp_path / "overfit"
    args = _train_args(world, save, "--train-iters", "200", "--global-batch-size", "6", "--micro-batch-size", "6",
                       "--min-lr", "2e-4", "--weight-decay", "0", "--clip-grad", "1", "--train-decoder",
                       decoder="unet-x0")
    done = _run([str(ENTRY), *args])
    assert done.returncode == 0, done.stderr[-3000:]
    config, mq = parse_metaquery_config(args[2:])
    trainer = MetaQueryTrainer(config, mq, build_device_mesh(), log=lambda *_: None)  # the run's initial weights
    before = _fixed_loss(trainer)
    ckpt.load_model_weights(save / "iter_0000200", trainer.model)
    after = _fixed_loss(trainer)
    assert after * 5 <= before, (before, after)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": caption}) + "\n" for caption in CAPTIONS.values()))
    out = tmp_path / "rendered"
    done = _run(["-m", "engine.generate", "--recipe", "metaquery", "--load", str(save), "--batch-file", str(prompts),
                 "--output", str(out), "--steps", "20", "--batch-size", "3", "--guidance-scale", "1"])
    # guidance 1 renders the conditional branch alone: after 200 steps with 10% dropout the unconditional branch is
    # barely trained and guidance would mostly add its error (guidance runs in the Sana test)
    assert done.returncode == 0, done.stderr[-3000:]
    references = {name: _pixels(name) for name in BUNDLED}
    for index, name in enumerate(CAPTIONS):
        image = np.asarray(Image.open(out / "images" / f"sample_{index:05d}.png"), dtype=np.float32) / 255
        rendered = torch.from_numpy(image).permute(2, 0, 1)  # [16, 16, 3] -> [3, 16, 16]
        scores = {other: _psnr(rendered, picture) for other, picture in references.items()}
        best = max(scores, key=scores.get)
        assert best == name, f"{CAPTIONS[name]!r} rendered closest to {best} ({scores})"


def test_sana_decoder_trains_in_bf16_and_renders_with_a_source_image(world, tmp_path):
    save = tmp_path / "sana"
    done = _run([str(ENTRY), *_train_args(world, save, "--train-iters", "30", "--train-decoder", "--bf16",
                                          decoder="sana")])  # bf16: frozen LLM in bf16, autocast over fp32 masters
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sana decoder (flow loss), 8 queries" in done.stdout
    losses = _losses(save)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    out = tmp_path / "rendered"
    done = _run(["-m", "engine.generate", "--recipe", "metaquery", "--load", str(save), "--prompt",
                 "Make this photo black and white.", "--image", str(SAMPLE / "rocket.jpg"), "--output", str(out),
                 "--steps", "4"])
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads((out / "results.jsonl").read_text())
    from PIL import Image

    image = np.asarray(Image.open(out / row["image"]))
    assert image.shape == (SIZE, SIZE, 3) and image.std() > 0


def test_errors_name_the_flag_or_file(world, sample_shards, tmp_path, capsys):
    import pretrain_gpt_vision
    from engine.metaquery.decoder import write_tiny_decoder
    from engine.visualizer.autoencoder import tiny_autoencoder

    other = write_tiny_decoder(tmp_path / "other", "unet", tiny_autoencoder(SIZE, seed=3), sample_size=8)
    args = _train_args(world, tmp_path / "x", "--train-iters", "1")
    args[args.index("--decoder") + 1] = str(other)
    assert pretrain_gpt_vision.main(args) == 1
    assert "is not the autoencoder the builds' latents were made with" in capsys.readouterr().err
    args = _train_args(world, tmp_path / "y", "--train-iters", "1")
    args[args.index("--data-path") + 1] = str(sample_shards)  # a VPiT build: SigLIP rows, no latents
    assert pretrain_gpt_vision.main(args) == 1
    assert "--targets vae-latents" in capsys.readouterr().err
    assert pretrain_gpt_vision.main(_train_args(world, tmp_path / "z", "--pipeline-model-parallel-size", "2")) == 1
    assert "tensor parallelism only" in capsys.readouterr().err
    vpit = _train_args(world, tmp_path / "w", "--train-iters", "1", "--load", str(world["llm"]))
    assert pretrain_gpt_vision.main(vpit) == 1
    assert "give a frozen LLM as --llm" in capsys.readouterr().err


def test_a_checkpoint_of_the_other_kind_is_named_with_the_command_that_takes_it(world, tmp_path, capsys,
                                                                              monkeypatch):
    """A MetaQuery checkpoint given to VPiT generation or as --llm, an LLM given to --recipe metaquery generation,
    a missing --llm: one line naming the flag and what to do (it was "invalid model config (unknown model config
    field(s): connector, ...)" and "--load PATH: no such file" for a missing --llm)."""
    import pretrain_gpt_vision
    from engine import generate

    save = tmp_path / "mq"
    assert pretrain_gpt_vision.main(_train_args(world, save, "--train-iters", "1")) == 0
    capsys.readouterr()
    assert generate.main(["--load", str(save), "--prompt", "a cat", "--output", str(tmp_path / "g1")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a MetaQuery checkpoint" in err[0] and "--recipe metaquery" in err[0], err
    # VPiT training and export given it: one line too (an 11-line list of unknown fields and mismatches before)
    from engine.training import export

    vpit = ["--mock-data", "--mock-data-sequences", "8", "--num-layers", "2", "--hidden-size", "32",
            "--ffn-hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "128",
            "--micro-batch-size", "1", "--global-batch-size", "1", "--num-workers", "0", "--train-iters", "1",
            "--save", str(tmp_path / "v"), "--load", str(save)]
    assert pretrain_gpt_vision.main(vpit) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert len(err) == 1 and "is a MetaQuery checkpoint" in err[0] and "VPiT training cannot use it" in err[0], err
    assert export.main(["--load", str(save), "--output", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a MetaQuery checkpoint" in err[0], err
    assert not (tmp_path / "e").exists()
    args = _train_args(world, tmp_path / "x", "--train-iters", "1")
    args[args.index("--llm") + 1] = str(save)
    assert pretrain_gpt_vision.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--llm {save} is a MetaQuery checkpoint" in err[0], err
    args[args.index("--llm") + 1] = str(tmp_path / "nowhere")
    assert pretrain_gpt_vision.main(args) == 1
    assert f"--llm {tmp_path / 'nowhere'}: no such file or directory" in capsys.readouterr().err
    assert generate.main(["--recipe", "metaquery", "--load", str(world["llm"]), "--prompt", "a cat",
                          "--output", str(tmp_path / "g2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a MetaQuery checkpoint but a model-only LLM checkpoint" in err[0], err
    (tmp_path / "a_file").write_text("")  # --output naming a file: refused before loading (it failed after rendering)
    assert generate.main(["--recipe", "metaquery", "--load", str(save), "--prompt", "a cat", "--steps", "1",
                          "--output", str(tmp_path / "a_file")]) == 1
    captured = capsys.readouterr()
    assert "is a file: --output is the directory" in captured.err and "loading" not in captured.out
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun every rank rendered the same files
    assert generate.main(["--recipe", "metaquery", "--load", str(save), "--prompt", "a cat", "--steps", "1",
                          "--output", str(tmp_path / "g3")]) == 1
    assert "renders in one process" in capsys.readouterr().err and not (tmp_path / "g3").exists()
