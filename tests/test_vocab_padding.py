"""Vocabulary padding never changes the math (issue 9, item 3).

The vocabulary is padded to a multiple of --make-vocab-size-divisible-by x TP, so its size depends on the layout.
Padded rows are zero, masked to -inf in every softmax (single-device and vocabulary-parallel), never generated, and
the real rows are initialised the same whatever the padding. So:

- unit: a padded model has the unpadded model's loss and real-row gradients; logits never pick a padding id;
- ParallelVPiT at TP1 / TP2 / TP4 (three different paddings of a 301-token vocabulary, one TP4 rank holding only
  padding) gives the unpadded single-device losses over 5 AdamW steps (gloo, 4 processes);
- the real CLI on shards built by `python -m preprocess build` with a 301-token tokenizer: TP1, TP2 and TP2 x PP2
  log the same losses, and a TP2 x PP2 checkpoint (512 rows) resumes at TP1 (384 rows) with the uninterrupted
  run's losses;
- a single-process checkpoint resumes under another padding (model and AdamW moments).
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
import torch.nn.functional as F
from distributed_launch import REPO, torchrun

from engine.config import ModelConfig
from engine.model import IGNORE_INDEX, build_model
from engine.model.losses import mask_padded_vocab, text_cross_entropy_sum

REAL = 301


def small_config(vocab_size: int, real: int | None = REAL, tie: bool = False) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, real_vocab_size=real, hidden_size=32, ffn_hidden_size=64, num_layers=2,
                       num_attention_heads=4, num_query_groups=4, seq_length=64, max_position_embeddings=128,
                       tie_embeddings=tie, attention_backend="sdpa")


@pytest.mark.parametrize("tie", [False, True])
def test_real_rows_do_not_depend_on_the_padding(tie):
    unpadded = build_model(small_config(REAL, None, tie), seed=3)
    for rows in (320, 384, 512):
        padded = build_model(small_config(rows, REAL, tie), seed=3)
        for name in ("tok_embeddings.weight", "output.weight"):
            p, u = padded.state_dict()[name], unpadded.state_dict()[name]
            assert p.shape[0] == rows
            assert torch.equal(p[:REAL], u), f"{name}: real rows differ at {rows} rows"
            assert torch.count_nonzero(p[REAL:]) == 0, f"{name}: padding rows are not zero"
        others = {k: v for k, v in padded.state_dict().items() if "tok_embeddings" not in k and "output" not in k}
        assert all(torch.equal(v, unpadded.state_dict()[k]) for k, v in others.items())


def _batch(seed: int = 0, b: int = 2, s: int = 48):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, REAL, (b, s), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    labels[0, :7] = IGNORE_INDEX
    labels[1, 3] = REAL - 1  # the last real id is a target
    return tokens, labels


def test_padded_model_has_the_unpadded_loss_and_gradients():
    tokens, labels = _batch()
    unpadded = build_model(small_config(REAL, None), seed=1)
    padded = build_model(small_config(512, REAL), seed=1)
    want, got = unpadded(tokens, labels=labels), padded(tokens, labels=labels)
    torch.testing.assert_close(got.lm_loss, want.lm_loss, rtol=1e-6, atol=0)
    want.loss.backward()
    got.loss.backward()
    for name, p in padded.named_parameters():
        ref = dict(unpadded.named_parameters())[name].grad
        grad = p.grad[:REAL] if name in ("tok_embeddings.weight", "output.weight") else p.grad
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-7, msg=name)
    assert torch.count_nonzero(padded.output.weight.grad[REAL:]) == 0
    assert torch.count_nonzero(padded.tok_embeddings.weight.grad[REAL:]) == 0


def test_padding_is_never_generated_and_never_in_the_softmax():
    model = build_model(small_config(384, REAL), seed=0)
    with torch.no_grad():
        model.output.weight[REAL:] = 100.0  # padding rows that would win every argmax if they were not masked
        hidden = model(torch.tensor([[1, 2, 3, 4]]))
        logits = model.logits(hidden)
    assert logits.shape[-1] == 384
    assert torch.isneginf(logits[..., REAL:]).all() and torch.isfinite(logits[..., :REAL]).all()
    assert int(logits.argmax(-1).max()) < REAL
    # The loss path masks the same columns and leaves the caller's logits untouched.
    raw = model.output(hidden.reshape(-1, 32)).detach()
    labels = torch.tensor([5, 6, 7, REAL - 1])
    before = raw.clone()
    loss = text_cross_entropy_sum(raw, labels, REAL)
    assert torch.equal(raw, before)
    torch.testing.assert_close(loss, F.cross_entropy(raw[:, :REAL], labels, reduction="sum"))
    assert torch.equal(mask_padded_vocab(raw, None), raw)


def test_checkpoint_resumes_under_another_padding(tmp_path):
    """The training loop at --make-vocab-size-divisible-by 128 (384 rows) saves at step 2; a run at 256 (512 rows,
    what TP2 pads to) resumes it (model and AdamW moments) and continues with the uninterrupted run's losses."""
    import pretrain_gpt_vision

    base = ["--mock-data", "--mock-data-sequences", "32", "--num-layers", "2", "--hidden-size", "32",
            "--ffn-hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "128",
            "--max-position-embeddings", "256", "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "3e-3",
            "--lr-warmup-iters", "1", "--weight-decay", "0.1", "--num-workers", "0", "--log-interval", "100",
            "--seed", "5", "--train-iters", "4"]

    def losses(path):
        return [json.loads(line)["loss"] for line in path.read_text().splitlines()]

    assert pretrain_gpt_vision.main([*base, "--log-jsonl", str(tmp_path / "full.jsonl")]) == 0
    assert pretrain_gpt_vision.main([*base, "--save", str(tmp_path / "ck"), "--exit-interval", "2",
                                     "--log-jsonl", str(tmp_path / "a.jsonl")]) == 0
    record = json.loads((tmp_path / "ck" / "iter_0000002" / "chrysalis_train.json").read_text())
    assert record["model"]["vocab_size"] == 384 and record["model"]["real_vocab_size"] == 302
    assert pretrain_gpt_vision.main([*base, "--make-vocab-size-divisible-by", "256", "--load", str(tmp_path / "ck"),
                                     "--log-jsonl", str(tmp_path / "b.jsonl")]) == 0
    full, resumed = losses(tmp_path / "full.jsonl"), losses(tmp_path / "b.jsonl")
    assert len(full) == 4 and len(resumed) == 2
    for want, have in zip(full[2:], resumed):
        assert abs(have - want) <= 1e-5 * abs(want), (full, resumed)


# ------------------------------------------------------------------------------------------------ TP1/TP2/TP4
TP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"], "tests"))
    from parallel_harness import synthetic_micro_batch
    from engine.config import ModelConfig
    from engine.model import build_model
    from engine.parallel import ParallelConfig, build_device_mesh
    from engine.parallel.parallel_model import ParallelVPiT
    from engine.training.data import padded_vocab_size

    REAL, STEPS, MICRO, MBS = 301, 5, 4, 2
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    def config(rows, real):
        return ModelConfig(vocab_size=rows, real_vocab_size=real, hidden_size=32, ffn_hidden_size=64, num_layers=2,
                           num_attention_heads=4, num_query_groups=4, seq_length=128, max_position_embeddings=128,
                           visual_loss_coef=0.5, attention_backend="sdpa")

    def batches(step):
        return [synthetic_micro_batch(step, i, MBS, 128, REAL, 1152, with_images=step != 2) for i in range(MICRO)]

    def run(tp):
        rows = padded_vocab_size(REAL, 64, tp)
        parallel = ParallelConfig(tensor_model_parallel_size=tp)
        mesh = build_device_mesh(parallel, "cpu")
        model = ParallelVPiT(config(rows, REAL), parallel, mesh, device="cpu", seed=11)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, foreach=False)
        dp_rank, dp = mesh.get_local_rank("dp"), mesh.size(mesh_dim=1)
        losses = []
        for step in range(STEPS):
            mbs = batches(step)[dp_rank * MICRO // dp:(dp_rank + 1) * MICRO // dp]
            opt.zero_grad(set_to_none=True)
            losses.append(model.forward_backward(mbs)["loss"])
            model.reduce_gradients()
            model.clip_grad_norm_(1.0)
            opt.step()
        weight = dict(model.named_parameters())["output.weight"]
        full = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
        return rows, losses, int(torch.count_nonzero(full.detach()[REAL:]))

    # Reference: one device, no padding at all.
    ref = build_model(config(REAL, None), seed=11)
    opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1, foreach=False)
    want = []
    for step in range(STEPS):
        mbs = batches(step)
        n_text = max(sum(int((mb["labels"] != -100).sum()) for mb in mbs), 1)
        n_vis = max(sum(int(mb["visual_target_mask"].sum()) if "visual_target_mask" in mb else 0 for mb in mbs), 1)
        opt.zero_grad(set_to_none=True)
        lm = vis = 0.0
        for mb in mbs:
            out = ref(**mb)
            (out.lm_loss_sum / n_text + 0.5 * out.visual_loss_sum / n_vis).backward()
            lm += out.lm_loss_sum.item()
            vis += out.visual_loss_sum.item()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        want.append(lm / n_text + 0.5 * vis / n_vis)
    result = {"reference": want}
    for tp in (1, 2, 4):
        result[f"tp{tp}"] = run(tp)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
""")


def test_tp1_tp2_tp4_losses_equal_the_unpadded_model(tmp_path):
    script = tmp_path / "tp_padding.py"
    script.write_text(TP_SCRIPT)
    out = tmp_path / "result.json"
    result = torchrun(script, 4, [str(out)], timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    got = json.loads(out.read_text())
    want = got["reference"]
    assert len(want) == 5
    sizes = set()
    for tp in (1, 2, 4):
        rows, losses, nonzero_padding = got[f"tp{tp}"]
        sizes.add(rows)
        assert nonzero_padding == 0, f"tp{tp}: padding rows of the LM head moved"
        for step, (w, h) in enumerate(zip(want, losses)):
            assert abs(h - w) <= 1e-5 * abs(w), f"tp{tp} ({rows} rows) step {step}: {h} vs unpadded {w}"
    assert sizes == {320, 384, 512}  # three different paddings


# ------------------------------------------------------------------------------------------------ the real CLI
ENTRY = REPO / "pretrain_gpt_vision.py"
SAMPLE = REPO / "examples" / "data" / "sample"


@pytest.fixture(scope="module")
def shards_301(tmp_path_factory) -> Path:
    """`python -m preprocess build` with a 301-token tokenizer (299 byte-level BPE ids + the two image tokens)."""
    sys.path.insert(0, str(REPO / "examples" / "data" / "tokenizer"))
    from make_tokenizer import DEMO_CORPUS

    from engine.tokenizer.tiny import train_tiny_hf_tokenizer

    root = tmp_path_factory.mktemp("vocab301")
    tokenizer = train_tiny_hf_tokenizer(DEMO_CORPUS, root / "tokenizer", vocab_size=299)
    out = root / "build"
    cmd = [sys.executable, "-m", "preprocess", "build", "--input", str(SAMPLE / "samples.jsonl"),
           "--image-root", str(SAMPLE / "images"), "--tokenizer-type", "huggingface", "--tokenizer-model",
           str(tokenizer), "--chat-template", "llama3", "--vision-encoder", "tiny-random", "--seq-length", "256",
           "--workers", "1", "--output", str(out), "--no-progress"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["tokenizer"]["vocab_size"] == REAL
    return out


def cli_args(data: Path, *extra: str) -> list[str]:
    return ["--data-path", str(data), "--split", "100,0,0", "--num-layers", "4", "--hidden-size", "32",
            "--ffn-hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "5", "--lr", "3e-3",
            "--lr-warmup-iters", "1", "--weight-decay", "0.1", "--num-workers", "0", "--log-interval", "100",
            "--seed", "9", *extra]


def _losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def test_cli_parity_and_resume_with_a_301_token_tokenizer(shards_301, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    tp1 = subprocess.run([sys.executable, str(ENTRY), *cli_args(shards_301, "--log-jsonl", str(tmp_path / "tp1.jsonl"))],
                         capture_output=True, text=True, timeout=600, env=env, cwd=REPO, check=False)
    assert tp1.returncode == 0, tp1.stderr[-3000:]
    tp2 = torchrun(ENTRY, 2, cli_args(shards_301, "--tensor-model-parallel-size", "2",
                                      "--log-jsonl", str(tmp_path / "tp2.jsonl")))
    assert tp2.returncode == 0, tp2.stderr[-3000:]
    tp2pp2 = torchrun(ENTRY, 4, cli_args(shards_301, "--tensor-model-parallel-size", "2",
                                         "--pipeline-model-parallel-size", "2", "--save", str(tmp_path / "ck"),
                                         "--save-interval", "3", "--log-jsonl", str(tmp_path / "tp2pp2.jsonl")))
    assert tp2pp2.returncode == 0, tp2pp2.stderr[-3000:]
    reference = _losses(tmp_path / "tp1.jsonl")
    assert len(reference) == 5
    for name in ("tp2", "tp2pp2"):
        got = _losses(tmp_path / f"{name}.jsonl")
        assert len(got) == 5, name
        for step, (want, have) in enumerate(zip(reference, got)):
            assert abs(have - want) <= 1e-5 * abs(want), f"{name} step {step + 1}: {have} vs TP1 {want}"
    record = json.loads((tmp_path / "ck" / "iter_0000003" / "chrysalis_train.json").read_text())
    assert record["model"]["vocab_size"] == 512 and record["model"]["real_vocab_size"] == REAL  # TP1 pads to 384

    # The TP2 x PP2 checkpoint (512 rows) resumes at TP1 (384 rows) and continues as the uninterrupted TP1 run.
    resumed = subprocess.run([sys.executable, str(ENTRY), *cli_args(shards_301, "--load",
                                                                    str(tmp_path / "ck" / "iter_0000003"),
                                                                    "--log-jsonl", str(tmp_path / "resumed.jsonl"))],
                             capture_output=True, text=True, timeout=600, env=env, cwd=REPO, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at iteration 3" in resumed.stdout
    got = _losses(tmp_path / "resumed.jsonl")
    assert len(got) == 2
    for want, have in zip(reference[3:], got):
        assert abs(have - want) <= 1e-5 * abs(want), (reference, got)
