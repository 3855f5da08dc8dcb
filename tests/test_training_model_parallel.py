"""The training loop under tensor and pipeline parallelism: a run saved at TP2 x PP2 resumes at TP1 x PP1 and at
DP2 x TP2, and the next losses continue as in the uninterrupted single-process run (the checkpoint reshards)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

from distributed_launch import REPO, torchrun

ENTRY = REPO / "pretrain_gpt_vision.py"
ARGS = ["--mock-data", "--model-preset", "tiny", "--seq-length", "256", "--micro-batch-size", "2",
        "--global-batch-size", "8", "--train-iters", "6", "--lr", "3e-3", "--log-interval", "100", "--seed", "7",
        "--vocab-size", "512"]  # a vocabulary divisible by every TP size, so all layouts share one model


def single(*flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(ENTRY), *ARGS, *flags], check=False, capture_output=True, text=True,
                          timeout=600, env=env, cwd=REPO)


def losses(path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def test_tp2_pp2_checkpoint_resumes_under_other_layouts(tmp_path):
    ref = single("--log-jsonl", str(tmp_path / "ref.jsonl"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    first = torchrun(ENTRY, 4, [*ARGS, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                                "--save", str(tmp_path / "ck"), "--exit-interval", "3",
                                "--log-jsonl", str(tmp_path / "a.jsonl")])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "1f1b: stage 0 (pp rank 0): layers 0-1 (2) + embedding+projector" in first.stdout
    shutil.copytree(tmp_path / "ck", tmp_path / "ck2")
    tp1 = single("--load", str(tmp_path / "ck"), "--save", str(tmp_path / "ck"),
                 "--log-jsonl", str(tmp_path / "b.jsonl"))
    assert tp1.returncode == 0, tp1.stderr[-3000:]
    dp2tp2 = torchrun(ENTRY, 4, [*ARGS, "--tensor-model-parallel-size", "2", "--load", str(tmp_path / "ck2"),
                                 "--save", str(tmp_path / "ck2"), "--log-jsonl", str(tmp_path / "c.jsonl")])
    assert dp2tp2.returncode == 0, dp2tp2.stderr[-3000:]

    reference = losses(tmp_path / "ref.jsonl")
    assert len(reference) == 6
    parallel_first = losses(tmp_path / "a.jsonl")
    assert len(parallel_first) == 3
    for want, have in zip(reference[:3], parallel_first):
        assert abs(have - want) <= 1e-5 * want
    for name in ("b.jsonl", "c.jsonl"):
        resumed = losses(tmp_path / name)
        assert len(resumed) == 3, name
        for want, have in zip(reference[3:], resumed):
            assert abs(have - want) <= 1e-5 * want, (name, reference[3:], resumed)
    assert "resumed from" in tp1.stdout and "at iteration 3" in tp1.stdout


def test_tied_embeddings_checkpoint_reshards_between_pp2_and_pp1(tmp_path):
    """Tied embeddings (LLaMA-3.2's layout): the first and last pipeline stage each hold the matrix. A PP2 checkpoint
    resumes on one process, and a one-process checkpoint resumes at TP2 x PP2, with the uninterrupted losses: the
    LM-head copy is checkpointed under the embedding's name and gets its optimizer state back."""
    tied = [*ARGS, "--tie-embeddings"]
    ref = single("--tie-embeddings", "--save", str(tmp_path / "ref"), "--save-interval", "3",
                 "--log-jsonl", str(tmp_path / "ref.jsonl"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    pp2 = torchrun(ENTRY, 2, [*tied, "--pipeline-model-parallel-size", "2", "--save", str(tmp_path / "pp2"),
                              "--exit-interval", "3", "--log-jsonl", str(tmp_path / "pp2.jsonl")])
    assert pp2.returncode == 0, pp2.stderr[-3000:]
    to_pp1 = single("--tie-embeddings", "--load", str(tmp_path / "pp2"), "--log-jsonl", str(tmp_path / "pp1.jsonl"))
    assert to_pp1.returncode == 0, to_pp1.stderr[-3000:]
    to_tp2pp2 = torchrun(ENTRY, 4, [*tied, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size",
                                    "2", "--load", str(tmp_path / "ref" / "iter_0000003"),
                                    "--log-jsonl", str(tmp_path / "tp2pp2.jsonl")])
    assert to_tp2pp2.returncode == 0, to_tp2pp2.stderr[-3000:]

    reference = losses(tmp_path / "ref.jsonl")
    assert len(reference) == 6
    for name, want in (("pp2.jsonl", reference[:3]), ("pp1.jsonl", reference[3:]), ("tp2pp2.jsonl", reference[3:])):
        have = losses(tmp_path / name)
        assert len(have) == 3, name
        for a, b in zip(want, have):
            assert abs(a - b) <= 1e-5 * a, (name, want, have)
    assert "at iteration 3" in to_pp1.stdout and "at iteration 3" in to_tp2pp2.stdout
    # The logged model size is the whole model's in every layout (it was the main rank's pipeline stages only,
    # 82,080 instead of 146,752 at PP2; the tied copy on the last stage counts once).
    sizes = {name: re.search(r"stage \d, ([\d,]+) trainable parameters( \(\+[\d,]+ in \d+ vocabulary padding)?",
                             run.stdout).groups() for name, run in (("pp1", ref), ("pp2", pp2), ("tp2pp2", to_tp2pp2))}
    assert len(set(sizes.values())) == 1, sizes

    # Export/generation loads the PP2 checkpoint into one tied model (the head is stored as the embedding).
    from engine.training.export import load_for_generation

    model, _, record = load_for_generation(tmp_path / "pp2")
    assert record["iteration"] == 3 and model.config.tie_embeddings
    assert model.output.weight is model.tok_embeddings.weight


def test_too_few_micro_batches_for_the_pipeline_fail_at_start():
    """A global batch of one micro-batch at PP2: refused before the model is built and the data loader started (the
    layout error came from the first step, after all of that)."""
    run = torchrun(ENTRY, 2, [*ARGS, "--pipeline-model-parallel-size", "2", "--global-batch-size", "2",
                              "--train-iters", "1"])
    assert run.returncode == 1
    assert "1 micro-batches per step is fewer than the 2 pipeline stages" in run.stderr
    assert "model parallel:" not in run.stdout and "training ..." not in run.stdout
