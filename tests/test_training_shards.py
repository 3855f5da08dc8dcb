"""End to end on real preprocess shards: build the bundled sample with the tiny random encoder, train stage 1 then
stage 2, check the checkpoint's tokenizer copy and vision-encoder reference, and the shard integrity checks."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pretrain_gpt_vision
from engine.training import Trainer, build_device_mesh, parse_training_config
from engine.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "data" / "sample"


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "build"
    cmd = [sys.executable, "-m", "preprocess", "build", "--input", str(SAMPLE / "samples.jsonl"),
           "--image-root", str(SAMPLE / "images"), "--tokenizer-type", "tiktoken",
           "--tokenizer-model", str(ROOT / "examples/data/tokenizer/tokenizer.model"), "--chat-template", "llama3",
           "--vision-encoder", "tiny-random", "--seq-length", "512", "--workers", "1", "--output", str(out),
           "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def args(build: Path, *extra: str) -> list[str]:
    return ["--data-path", str(build), "--split", "100,0,0", "--model-preset", "tiny", "--micro-batch-size", "1",
            "--global-batch-size", "2", "--lr", "2e-3", "--lr-warmup-iters", "1", "--num-workers", "0",
            "--log-interval", "100", "--seed", "3", *extra]


def test_stage1_then_stage2_on_real_shards(build, tmp_path):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    assert pretrain_gpt_vision.main(args(build, "--stage", "1", "--train-iters", "3", "--save", str(s1),
                                         "--log-jsonl", str(tmp_path / "s1.jsonl"))) == 0
    manifest = json.loads((build / "manifest.json").read_text())
    record = ckpt.read_record(s1 / "iter_0000003")
    assert record["model"]["vocab_size"] == 896  # 837 = 835 + 2 image tokens, padded to a multiple of 128
    assert record["model"]["seq_length"] == 512
    assert record["vocab"]["image_start_id"] == manifest["tokenizer"]["image_start_id"]
    assert record["data"]["vision_encoder"] == manifest["vision_encoder"]
    assert record["data"]["tokenizer_fingerprint"] == manifest["tokenizer"]["fingerprint"]
    from engine.tokenizer import load_saved_tokenizer

    assert load_saved_tokenizer(s1 / "iter_0000003" / "tokenizer").fingerprint() == manifest["tokenizer"]["fingerprint"]
    rows = [json.loads(line) for line in (tmp_path / "s1.jsonl").read_text().splitlines()]
    assert all(r["lm_tokens"] > 0 and r["visual_targets"] % 64 == 0 for r in rows)
    assert any(r["visual_targets"] > 0 for r in rows)
    # Stage 1 measures the visual loss (it does not learn from it): logged wherever there are visual targets.
    assert all((r["visual_loss"] > 0) == (r["visual_targets"] > 0) for r in rows)

    assert pretrain_gpt_vision.main(args(build, "--stage", "2", "--train-iters", "2", "--load", str(s1),
                                         "--save", str(s2))) == 0
    from engine.training.export import load_for_generation

    model, tokenizer, _ = load_for_generation(s2)
    assert tokenizer is not None and tokenizer.image_start_id == 835
    assert model.config.vocab_size == 896


def _response_images_in_source() -> int:
    """`<image>` placeholders in assistant turns of the bundled JSONL (the build's source of truth)."""
    count = 0
    for line in (SAMPLE / "samples.jsonl").read_text().splitlines():
        for turn in json.loads(line)["conversations"]:
            if turn["from"] == "gpt":
                count += turn["value"].count("<image>")
    return count


def test_visual_targets_come_from_response_images_only(build):
    """Prompt images are inputs only; response images are targets, on a sequence that has both."""
    from engine.model import IGNORE_INDEX
    from engine.training.data import collate_packed

    t = Trainer(parse_training_config(args(build, "--train-iters", "3")), build_device_mesh())
    reader = t.datasets[0][1]
    image_start = t.vocab["image_start_id"]
    total_response = 0
    mixed = 0
    for i in range(len(reader)):
        packed = reader[i]
        starts = np.asarray(packed.image_slot_starts)
        if starts.size == 0:
            continue
        # Independent of the shard's image_is_response field: an image is a response image when the model must
        # emit its <image_start> (a text target in the chat template's response mask), else a prompt image.
        assert all(int(packed.tokens[p - 1]) == image_start for p in starts)
        response = np.array([bool(packed.loss_mask[p - 1]) for p in starts])
        total_response += int(response.sum())
        batch = collate_packed([(packed, reader.embeddings(packed.image_rows))], reader.seq_length)
        mask = batch.visual_target_mask.view(-1, 64)
        assert mask.shape[0] == starts.size
        assert torch.equal(mask, torch.from_numpy(response)[:, None].expand(-1, 64)), (i, response, mask[:, 0])
        assert batch.visual_targets == 64 * int(response.sum())
        # No image slot is a text target, and the slots hold their own image's tokens.
        labels = batch.labels.view(-1)
        assert (labels[batch.visual_positions - 1] == IGNORE_INDEX).all()
        emb = reader.embeddings(packed.image_rows).reshape(-1, 1152)
        assert torch.equal(batch.visual_tokens, emb)
        if response.any() and (~response).any():
            mixed += 1
            # The loss counts exactly the response slots: prompt slots never reach the visual loss.
            out = t.core_model(batch.tokens, **batch.model_inputs())
            assert int(out.visual_targets) == 64 * int(response.sum())
    assert mixed > 0, "the sample build has no sequence with both a prompt and a response image"
    assert total_response == _response_images_in_source() == 3


def test_flipped_byte_in_a_shard_is_named(build, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(build, broken)
    target = next((broken / "shards").glob("shard-*.loss_mask.bin"))
    data = bytearray(target.read_bytes())
    data[0] ^= 1
    target.write_bytes(bytes(data))
    config = parse_training_config(args(broken, "--train-iters", "1"))
    with pytest.raises(ValueError, match=target.name):
        Trainer(config, build_device_mesh())
    # In a blend the message names the build too (it named the shard file only, relative to a build).
    config = parse_training_config(["--data-path", "0.5", str(build), "0.5", str(broken),
                                    *args(broken, "--train-iters", "1")[2:]])
    with pytest.raises(ValueError, match=re.escape(f"{broken}: shards/{target.name}")):
        Trainer(config, build_device_mesh())


def test_the_data_sequence_length_replacing_seq_length_is_said(build, capsys):
    """A Megatron script's --seq-length 1024 on shards packed at 512 trains at 512 (the shards' length); that was
    silent."""
    t = Trainer(parse_training_config(args(build, "--seq-length", "1024", "--train-iters", "1")), build_device_mesh())
    assert t.model_config.seq_length == 512
    assert "sequence length 512: the data's (the model configuration said 1024" in capsys.readouterr().out


def test_mixed_tokenizer_builds_are_refused(build, tmp_path):
    from preprocess.manifest import serialize_manifest

    other = tmp_path / "other"
    shutil.copytree(build, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "0" * 64
    manifest["tokenizer"]["vocab_size"] += 7  # another vocabulary
    (other / "manifest.json").write_bytes(serialize_manifest(manifest))
    config = parse_training_config(["--data-path", "0.5", str(build), "0.5", str(other),
                                    *args(build, "--train-iters", "1")[2:]])
    with pytest.raises(ValueError, match="different tokenizer") as refused:
        Trainer(config, build_device_mesh())
    # One line that names the odd build and says what differs (it listed every build's full fingerprint, one per
    # line, without saying which one was wrong).
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"--data-path: {other} was built with a different tokenizer")
    assert f"vocabulary {manifest['tokenizer']['vocab_size']}, fingerprint 000000000000" in message


def test_load_hf_starts_from_a_hugging_face_llama(build, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(vocab_size=835, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                  tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hf).save_pretrained(tmp_path / "hf", safe_serialization=True)
    t = Trainer(parse_training_config(args(build, "--train-iters", "1", "--load-hf", str(tmp_path / "hf"),
                                           "--attention-backend", "flex", "--visual-loss-coef", "0.25")),
                build_device_mesh())
    assert t.model_config.hidden_size == 64 and t.model_config.vocab_size == 896
    # Run choices survive the import of the Hugging Face architecture (they were once replaced by its config).
    assert t.model_config.attention_backend == "flex" and t.model_config.visual_loss_coef == 0.25
    assert t.train() == "done"
    bad = transformers.LlamaConfig(vocab_size=900, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, max_position_embeddings=512)
    transformers.LlamaForCausalLM(bad).save_pretrained(tmp_path / "hf_bad", safe_serialization=True)
    with pytest.raises(ValueError, match="base_vocab_size"):
        Trainer(parse_training_config(args(build, "--train-iters", "1", "--load-hf", str(tmp_path / "hf_bad"))),
                build_device_mesh())
