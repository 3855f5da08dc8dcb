"""Tensor parallelism with model sizes the TP size does not divide (an audit with awkward sizes through the real
CLIs; training's validator refuses them at start, and its accepted layouts log one process's losses):

- generation (`torchrun -m engine.generate --tensor-model-parallel-size N`) checked only the attention heads and
  KV groups: a checkpoint whose FFN width N does not divide (100 at TP3: shards 34 + 34 + 32) died at the first
  forward in DTensor's sharding propagation ('a and b must have same reduction dim, but got [132, 102] X
  [100, 36]', a traceback from every rank). It is now the one-line refusal naming the flag and the size.
"""

from __future__ import annotations

import pytest
from distributed_launch import REPO, torchrun

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_generation_refuses_an_ffn_width_the_tp_size_does_not_divide(tmp_path):
    from engine.checkpoint_io import save_model_checkpoint
    from engine.config import ModelConfig
    from engine.model.vpit import build_model
    from engine.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("tiktoken", REPO / "examples" / "data" / "tokenizer" / "tokenizer.model")
    config = ModelConfig(vocab_size=896, real_vocab_size=tokenizer.vocab_size, hidden_size=32, ffn_hidden_size=99,
                         num_layers=1, num_attention_heads=4, num_query_groups=2, seq_length=64,
                         max_position_embeddings=128)
    vocab = {"base_vocab_size": tokenizer.base_vocab_size, "image_start_id": tokenizer.image_start_id,
             "image_end_id": tokenizer.image_end_id}
    ckpt = save_model_checkpoint(build_model(config, seed=0), tmp_path / "ckpt", vocab=vocab, tokenizer=tokenizer)
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
