"""Metrics: the JSON-lines fields, TensorBoard, validation numbers, the FLOP formula, and engine.plot."""

import json
import math

import pretrain_gpt_vision
from engine.config import preset
from engine.training.metrics import STEP_FIELDS, flops_per_token, matmul_params

TINY = ["--mock-data", "--mock-data-sequences", "64", "--num-layers", "2", "--hidden-size", "32",
        "--ffn-hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "128",
        "--max-position-embeddings", "256", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3",
        "--num-workers", "0", "--log-interval", "2", "--seed", "5", "--split", "90,10,0"]


def test_jsonl_tensorboard_validation_and_progress(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    assert pretrain_gpt_vision.main([*TINY, "--train-iters", "4", "--log-jsonl", str(log), "--eval-interval", "2",
                                     "--eval-iters", "1", "--tensorboard-dir", str(tmp_path / "tb")]) == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert set(STEP_FIELDS) <= set(r)
        assert r["mfu"] is None and r["skipped"] is False and r["tokens_per_sec"] > 0 and r["memory_gib"] > 0
        assert math.isclose(r["loss"], r["lm_loss"] + r["visual_loss"], rel_tol=1e-12)
        assert r["visual_targets"] == 4 * 64  # one response image per synthetic sequence
    assert 0 < rows[3]["lr"] < rows[0]["lr"]
    valid = [r for r in rows if "valid_ppl" in r]
    assert [r["iteration"] for r in valid] == [2, 4]
    assert all(math.isclose(r["valid_ppl"], math.exp(r["valid_lm_loss"])) and -1 <= r["valid_visual_cosine"] <= 1
               for r in valid)
    out = capsys.readouterr().out
    assert "iteration        2/       4" in out and "validation at iteration 4: text perplexity" in out
    # tensorboard is in the dev extra the suite runs with: if it is missing this must fail, not skip (an
    # importorskip here turned the whole test, JSON-lines checks included, into a skip).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/lm_loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("valid/valid_ppl")] == [2, 4]


def test_flop_formula():
    c = preset("llama3.1-8b")
    n = matmul_params(c)
    # 32 blocks of (2 * 4096^2 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + LM head + projector/head.
    assert n == 32 * (2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 4096 * 128256 + 2 * (1152 * 4096 + 4096**2)
    assert flops_per_token(c) == 6 * n + 12 * 32 * 4096 * (4096 + 1) / 2  # causal: half the square



def test_step_flops_count_the_work_done():
    """Attention pairs are counted per document (causal: n(n+1)/2), the LM head on labelled rows only, the
    projector and head on their rows; an unpacked row of every-token targets gives the published convention."""
    import torch

    from engine.training.metrics import StepCounts, attended_pairs, step_flops, visual_matmul_params

    c = preset("llama3.1-8b", seq_length=8)
    assert attended_pairs(None, 2, 8) == 2 * 36
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0] * 8])
    assert attended_pairs(docs, 2, 8) == (6 + 3 + 6) + 36
    unpacked = StepCounts(tokens=16, text_rows=16, attention_pairs=2 * 36)
    no_visual = step_flops(c, unpacked)
    assert math.isclose(step_flops(c, StepCounts(tokens=16, text_rows=16, attention_pairs=72,
                                                 visual_slots=16, visual_targets=16)), 16 * flops_per_token(c))
    assert no_visual < 16 * flops_per_token(c)
    packed = StepCounts.from_batches([type("B", (), dict(tokens=torch.zeros(2, 8), lm_targets=5, visual_targets=1,
                                                         visual_tokens=torch.zeros(3, 1152), document_ids=docs))])
    assert (packed.tokens, packed.text_rows, packed.visual_slots, packed.visual_targets,
            packed.attention_pairs) == (16, 5, 3, 1, 51)


def test_mfu_is_logged_with_a_peak(tmp_path):
    log = tmp_path / "log.jsonl"
    assert pretrain_gpt_vision.main([*TINY, "--train-iters", "2", "--log-jsonl", str(log), "--peak-tflops",
                                     "0.5"]) == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    for r in rows:
        assert 0 < r["mfu"] < 1 and math.isclose(r["mfu"], r["tflops_per_device"] / 0.5, rel_tol=1e-9)

def test_plot_draws_several_runs(tmp_path):
    import matplotlib  # noqa: F401  (dev extra: missing must fail, not skip)

    from engine import plot

    logs = []
    for run in range(2):
        path = tmp_path / f"run{run}.jsonl"
        path.write_text("".join(json.dumps({"iteration": i, "loss": 5 - i * 0.1 * (run + 1), "lm_loss": 4 - i * 0.1,
                                            "visual_loss": 1 - i * 0.01, "skipped": False}) + "\n"
                                for i in range(1, 20)) + '{"iteration": 20, "loss"')  # a line cut by a crash
        logs.append(str(path))
    out = tmp_path / "curves.png"
    assert plot.main([*logs, "--output", str(out), "--smooth", "3"]) == 0
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    assert len(plot.read_log(logs[0])) == 19
    assert plot.main([str(tmp_path / "missing.jsonl"), "--output", str(out)]) == 1
