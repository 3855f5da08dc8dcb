"""Checkpoints used across parallel layouts, through the real CLIs (an audit's findings):

- the model read from a training checkpoint (export, generation) does not depend on the layout that saved it: a TP2
  run pads the vocabulary to 1,024 rows where one process pads it to 896, and the model-only export kept the
  TP2 padding; the Hugging Face export was already identical;
- `python -m engine.convert chrysalis-to-hf --load` takes a training checkpoint (it said the checkpoint was not a
  Chrysalis checkpoint, "an interrupted save leaves no config.json");
- a resume honours this run's --weight-decay / --adam-beta* / --adam-eps (the checkpoint's param-group settings
  silently won) and says which changed;
- a vocabulary-sharded embedding and LM head whose rows the TP size does not divide (generation at TP2 of a
  checkpoint with an odd vocabulary) give the one-device embeddings and logits (rank 1 assumed it started at
  rank x local rows: wrong tokens, and one padding column left unmasked).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from distributed_launch import REPO, torchrun
from safetensors.torch import load_file

ENTRY = REPO / "pretrain_gpt_vision.py"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cli_args(data: Path, *extra: str) -> list[str]:
    # --lr 1e-30: the weights stay their (layout-independent) initial values, so checkpoints saved under different
    # layouts hold the same model and their exports can be compared bit for bit.
    return ["--data-path", str(data), "--split", "100,0,0", "--num-layers", "3", "--hidden-size", "32",
            "--ffn-hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "1", "--lr", "1e-30",
            "--min-lr", "0", "--num-workers", "0", "--log-interval", "100", "--seed", "5", "--save-interval", "1",
            *extra]


def one_process(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ENTRY), *args], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)), check=False)


@pytest.fixture(scope="module")
def saved(sample_shards, tmp_path_factory) -> dict[str, Path]:
    """One iteration saved by one process and by TP2 (837-token tokenizer: 896 vs 1,024 vocabulary rows)."""
    root = tmp_path_factory.mktemp("cross-layout")
    done = one_process(cli_args(sample_shards, "--save", str(root / "tp1")))
    assert done.returncode == 0, done.stderr[-3000:]
    done = torchrun(ENTRY, 2, cli_args(sample_shards, "--tensor-model-parallel-size", "2", "--save",
                                       str(root / "tp2")))
    assert done.returncode == 0, done.stderr[-3000:]
    return {"tp1": root / "tp1", "tp2": root / "tp2", "data": sample_shards, "root": root}


def test_exports_do_not_depend_on_the_saving_layout(saved, tmp_path):
    from engine.training.export import export_training_checkpoint

    rows = {}
    for layout in ("tp1", "tp2"):
        record = json.loads((saved[layout] / "iter_0000001" / "chrysalis_train.json").read_text())
        rows[layout] = record["model"]["vocab_size"]
        export_training_checkpoint(saved[layout], tmp_path / layout / "model", hf_output=tmp_path / layout / "hf")
    assert rows == {"tp1": 896, "tp2": 1024}  # the checkpoints differ in padding ...
    configs = {k: json.loads((tmp_path / k / "model" / "config.json").read_text())["model"] for k in rows}
    assert configs["tp1"] == configs["tp2"] and configs["tp1"]["vocab_size"] == 896  # ... their exports do not
    one, two = (load_file(tmp_path / k / "model" / "model.safetensors") for k in ("tp1", "tp2"))
    assert one.keys() == two.keys()
    for name in one:  # identical but for ~1e-37 on zero-initialised biases that took one 1e-30 step
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-33, msg=name)
    hf = (tmp_path / "tp1" / "hf" / "model.safetensors").read_bytes()
    assert (tmp_path / "tp2" / "hf" / "model.safetensors").read_bytes() == hf


def test_convert_takes_a_training_checkpoint(saved, tmp_path, capsys):
    """engine.convert chrysalis-to-hf --load on a training checkpoint (a --save folder or one iter_*, here saved at
    TP2) writes what `engine.training.export --hf-output` writes."""
    from engine import convert
    from engine.training.export import export_training_checkpoint

    export_training_checkpoint(saved["tp2"], tmp_path / "model", hf_output=tmp_path / "hf")
    for load in (saved["tp2"], saved["tp2"] / "iter_0000001"):
        out = tmp_path / f"convert-{load.name}"
        assert convert.main(["chrysalis-to-hf", "--load", str(load), "--output", str(out)]) == 0, \
            capsys.readouterr().err
        for name in ("model.safetensors", "config.json", "vpit_heads.safetensors"):
            assert (out / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name
        assert (out / "chrysalis_tokenizer").is_dir()


def test_a_resume_uses_this_runs_optimizer_flags(saved):
    out = saved["root"] / "resumed"
    done = one_process(cli_args(saved["data"], "--load", str(saved["tp2"]), "--train-iters", "2", "--save", str(out),
                                "--weight-decay", "0.5", "--adam-eps", "1e-6"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "at iteration 1" in done.stdout
    assert "note: --weight-decay: using this run's weight_decay 0.5" in done.stdout, done.stdout[-2000:]
    assert "note: --adam-eps: using this run's eps 1e-06" in done.stdout
    assert "--adam-beta1/--adam-beta2" not in done.stdout  # unchanged: no note
    items = json.loads((out / "iter_0000002" / "state.json").read_text())["optimizer_items"]
    decay = {v for k, v in items.items() if k.endswith(".weight_decay")}
    assert decay == {0.5, 0.0}, decay  # matrices get the new value, norms and biases none (the defaults said 0.1)
    assert {v for k, v in items.items() if k.endswith(".eps")} == {1e-6}


UNEVEN_VOCAB_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from engine.config import ModelConfig
    from engine.model import build_model
    from engine.parallel.tensor_parallel import apply_tensor_parallel

    torch.set_num_threads(1)
    # 301 rows over 2 ranks: 151 + 150; ids 299 and 300 are padding (rank 1 holds real rows and padding).
    config = ModelConfig(vocab_size=301, real_vocab_size=299, hidden_size=32, ffn_hidden_size=64, num_layers=1,
                         num_attention_heads=4, num_query_groups=2, seq_length=16, max_position_embeddings=32,
                         attention_backend="sdpa")
    model = build_model(config, seed=0).eval()
    ids = torch.tensor([[0, 150, 151, 152, 298, 7, 200, 151]])
    with torch.no_grad():
        want_hidden = model(ids)
        want = model.logits(want_hidden)
    dist.init_process_group("gloo")
    apply_tensor_parallel(model, init_device_mesh("cpu", (2,)), sequence_parallel=False)
    with torch.no_grad():
        hidden = model(ids)
        logits = model.logits(hidden).full_tensor()
    hidden = hidden.full_tensor() if hasattr(hidden, "full_tensor") else hidden
    torch.testing.assert_close(hidden, want_hidden, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isfinite(logits), torch.isfinite(want)), "padding columns masked differently"
    assert torch.isfinite(want[..., :299]).all() and not torch.isfinite(want[..., 299:]).any()
    real = torch.isfinite(want)
    torch.testing.assert_close(logits[real], want[real], rtol=1e-5, atol=1e-5)
    if dist.get_rank() == 0:
        print("uneven vocabulary shards ok", flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip the gloo teardown (see tests/test_parallel_units.py)
""")


def test_uneven_vocabulary_shards_give_the_one_device_embeddings_and_logits(tmp_path):
    script = tmp_path / "uneven_vocab.py"
    script.write_text(UNEVEN_VOCAB_SCRIPT)
    done = torchrun(script, 2, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "uneven vocabulary shards ok" in done.stdout


def test_a_mis_shaped_load_names_ten_tensors_and_counts_the_rest():
    """`--stage 2 --load S1 --load-partial` with another --hidden-size mis-shapes every tensor: the one-line error
    listed all of them (40 for a 3-layer model, 6 KB); it names ten and counts the rest."""
    from engine.training.checkpoint import _tensor_problems

    expected = {f"layers.{i}.w": torch.zeros(48) for i in range(40)}
    stored = {f"model.layers.{i}.w": (32,) for i in range(40)}
    problems, missing = _tensor_problems(expected, stored, "model.", partial=True)
    assert missing == [] and len(problems) == 11
    assert problems[0] == "tensor layers.0.w has shape [32] in the checkpoint, [48] in this model"
    assert problems[-1] == "... and 30 more mis-shaped tensors"
