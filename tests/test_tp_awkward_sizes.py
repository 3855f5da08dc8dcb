"""Tensor parallelism with model sizes the TP size does not divide (an audit with awkward sizes through the real
CLIs; training's validator refuses them at start, and its accepted layouts log one process's losses):

- generation (`torchrun -m engine.generate --tensor-model-parallel-size N`) checked only the attention heads and
  KV groups: a checkpoint whose FFN width N does not divide (100 at TP3: shards 34 + 34 + 32) died at the first
  forward in DTensor's sharding propagation ('a and b must have same reduction dim, but got [132, 102] X
  [100, 36]', a traceback from every rank). It is now the one-line refusal naming the flag and the size.
- the MetaQuery recipe (`--recipe metaquery --tensor-model-parallel-size N`) checked none of them: a frozen LLM with
  an FFN width of 99 or 3 KV groups at TP2 died at the first step (DTensor's sharding propagation, or "shape
  '[2, 29, -1, 6]' is invalid"); it is refused at start, naming the LLM and the sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from distributed_launch import REPO, torchrun

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOKENIZER = REPO / "examples" / "data" / "tokenizer" / "tokenizer.model"


def save_llm(directory, **sizes):
    """A random model-only checkpoint with the example tokenizer (896 rows) and the given sizes."""
    from engine.checkpoint_io import save_model_checkpoint
    from engine.config import ModelConfig
    from engine.model.vpit import build_model
    from engine.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("tiktoken", TOKENIZER)
    config = ModelConfig(vocab_size=896, real_vocab_size=tokenizer.vocab_size, num_layers=1, seq_length=128,
                         max_position_embeddings=256, **sizes)
    vocab = {"base_vocab_size": tokenizer.base_vocab_size, "image_start_id": tokenizer.image_start_id,
             "image_end_id": tokenizer.image_end_id}
    return save_model_checkpoint(build_model(config, seed=0), directory, vocab=vocab, tokenizer=tokenizer)


def test_generation_refuses_an_ffn_width_the_tp_size_does_not_divide(tmp_path):
    ckpt = save_llm(tmp_path / "ckpt", hidden_size=32, ffn_hidden_size=99, num_attention_heads=4, num_query_groups=2)
    launcher = tmp_path / "generate_entry.py"
    launcher.write_text("import runpy\nrunpy.run_module('engine.generate', run_name='__main__')\n")
    done = torchrun(launcher, 2, ["--load", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu",
                                  "--tensor-model-parallel-size", "2", "--output", str(tmp_path / "out")],
                    timeout=300)
    assert done.returncode != 0
    want = ("error: --tensor-model-parallel-size 2 must divide the model's attention heads, KV groups and FFN hidden "
            "size; it does not divide the FFN hidden size (99)")
    assert want in done.stderr, done.stderr[-3000:]
    assert "Sharding propagation failed" not in done.stderr
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_metaquery_refuses_a_frozen_llm_the_tp_size_does_not_divide(tmp_path):
    """A frozen LLM with an FFN width of 99 at TP2 (it died at step 1 in DTensor's sharding propagation)."""
    from engine.metaquery.decoder import write_tiny_decoder
    from engine.visualizer.autoencoder import tiny_autoencoder

    images = REPO / "examples" / "data" / "sample" / "images"
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"id": f"t2i-{i}", "image": name, "conversations": [
        {"from": "human", "value": f"a picture of the {name}"}, {"from": "gpt", "value": "<image>"}]}) + "\n"
        for i, name in enumerate(["coffee.jpg", "rocket.jpg"])))
    decoder = write_tiny_decoder(tmp_path / "sd", "unet", tiny_autoencoder(16), sample_size=8)
    build = tmp_path / "build"
    done = subprocess.run([sys.executable, "-m", "preprocess", "build", "--input", str(records), "--image-root",
                           str(images), "--tokenizer-type", "tiktoken", "--tokenizer-model", str(TOKENIZER),
                           "--vision-encoder", "tiny-random", "--seq-length", "128", "--output", str(build),
                           "--no-progress", "--image-decoder", "pil", "--targets", "vae-latents", "--vae",
                           str(decoder), "--vae-image-size", "16"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"), check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    # (3 KV groups at TP2 died too, with "shape '[2, 29, -1, 6]' is invalid": the same check, tested above for
    # training's validator; one launch here keeps the test cheap)
    cases = {"ffn99": ({"hidden_size": 32, "ffn_hidden_size": 99, "num_attention_heads": 4, "num_query_groups": 2},
                       "FFN hidden size (99)")}
    for name, (sizes, what) in cases.items():
        llm = save_llm(tmp_path / name, **sizes)
        done = torchrun(REPO / "pretrain_gpt_vision.py", 2, [
            "--recipe", "metaquery", "--data-path", str(build), "--decoder", str(decoder), "--llm", str(llm),
            "--num-queries", "4", "--micro-batch-size", "1", "--global-batch-size", "2", "--split", "100,0,0",
            "--num-workers", "0", "--train-iters", "1", "--tensor-model-parallel-size", "2"], timeout=300)
        assert done.returncode != 0
        want = (f"error: --tensor-model-parallel-size 2 must divide the frozen LLM's (--llm {llm}) attention heads, "
                f"KV groups and FFN hidden size; it does not divide the {what}")
        assert want in done.stderr, done.stderr[-3000:]
        # (torchrun's own traceback follows any failed worker; the workers print none)
        assert not [line for line in done.stderr.splitlines() if line.startswith("[rank")], done.stderr[-3000:]


def test_a_refused_layout_is_one_error_line_naming_every_flag(tmp_path):
    """Every refusal of the layout validator in one `error:` line (run_training's contract); it was a header line
    followed by one indented line per problem. Here: heads, KV groups and FFN width TP2 does not divide, and
    --sequence-parallel with a --seq-length of 131."""
    done = torchrun(REPO / "pretrain_gpt_vision.py", 2, [
        "--mock-data", "--vocab-size", "512", "--seq-length", "131", "--num-layers", "1", "--hidden-size", "36",
        "--ffn-hidden-size", "63", "--num-attention-heads", "3", "--num-query-groups", "1", "--micro-batch-size", "1",
        "--train-iters", "1", "--num-workers", "0", "--tensor-model-parallel-size", "2", "--sequence-parallel"],
        timeout=300)
    assert done.returncode != 0
    line = next(line for line in done.stderr.splitlines() if line.startswith("error:"))
    assert line == ("error: invalid parallel layout: --num-attention-heads 3 is not divisible by "
                    "--tensor-model-parallel-size 2; --num-query-groups 1 is not divisible by "
                    "--tensor-model-parallel-size 2 (KV heads are sharded, not replicated); --ffn-hidden-size 63 is "
                    "not divisible by --tensor-model-parallel-size 2; --seq-length 131 is not divisible by "
                    "--tensor-model-parallel-size 2 (needed by --sequence-parallel)"), done.stderr[-3000:]


def test_model_and_training_config_refusals_are_one_line():
    from engine.config import ModelConfig
    from engine.training.config import parse_training_config

    with pytest.raises(ValueError) as err:
        ModelConfig(hidden_size=42, num_attention_heads=6, num_query_groups=0).validate()
    assert str(err.value) == "invalid model config: --num-query-groups must be positive, got 0"
    with pytest.raises(ValueError) as err:
        ModelConfig(hidden_size=42, ffn_hidden_size=64, num_attention_heads=6, num_query_groups=4).validate()
    assert str(err.value) == ("invalid model config: head dim 7 must be even for RoPE: change --hidden-size or "
                              "--num-attention-heads; --num-attention-heads 6 must be divisible by --num-query-groups 4")
    with pytest.raises(ValueError) as err:
        parse_training_config(["--mock-data", "--micro-batch-size", "0", "--train-iters", "0"]).validate()
    assert str(err.value) == ("invalid training config: --micro-batch-size must be positive, got 0; --train-iters "
                              "must be positive, got 0"), str(err.value)
