"""The Triton kernels inside the engine: `--attention-backend triton|triton-fp8` and the fused losses
(`--fused-linear-cross-entropy`, `--fused-visual-head-loss`) through the model and the training CLI, against the
SDPA / unfused reference (CPU: Triton interpreter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from chrysalis_kernels.testing import load_kernels

import pretrain_gpt_vision
from engine.config import preset
from engine.model.vpit import build_model
from engine.training import parse_training_config

ka = load_kernels("attention")  # the engine imports the kernel modules lazily, then finds them loaded
for _name in ("attention_fp8", "linear_cross_entropy", "visual_head_loss"):
    load_kernels(_name)

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter runs (the GPU has its own tests)")]

FUSED = ["--fused-linear-cross-entropy", "--fused-visual-head-loss"]
TINY = ["--mock-data", "--mock-data-sequences", "64", "--num-layers", "2", "--hidden-size", "64",
        "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "128",
        "--max-position-embeddings", "256", "--micro-batch-size", "1", "--global-batch-size", "1", "--lr", "3e-3",
        "--lr-warmup-iters", "2", "--num-workers", "0", "--log-interval", "100", "--seed", "5"]


@pytest.fixture
def sequence_tiles(monkeypatch):
    """One 128-token tile per document row: the interpreter runs a few programs a layer (block skipping and the
    masked/unmasked phases are covered by tests/test_kernels_attention.py at 16-token tiles)."""
    monkeypatch.setitem(ka._INTERPRET_TILES, "BLOCK_M", 128)
    monkeypatch.setitem(ka._INTERPRET_TILES, "BLOCK_N", 128)


def _losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def test_fifty_cli_steps_with_triton_attention_and_fused_losses_match_sdpa(tmp_path, sequence_tiles):
    reference, fused = tmp_path / "sdpa.jsonl", tmp_path / "triton.jsonl"
    assert pretrain_gpt_vision.main([*TINY, "--train-iters", "50", "--attention-backend", "sdpa",
                                     "--log-jsonl", str(reference)]) == 0
    assert pretrain_gpt_vision.main([*TINY, "--train-iters", "50", "--attention-backend", "triton", *FUSED,
                                     "--log-jsonl", str(fused)]) == 0
    want, got = _losses(reference), _losses(fused)
    assert len(got) == len(want) == 50
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-2
    assert want[-1] < want[0] - 0.2  # the run learns, so the comparison covers changing weights


def test_cli_steps_with_fp8_attention_track_sdpa(tmp_path, sequence_tiles):
    reference, fp8 = tmp_path / "sdpa.jsonl", tmp_path / "fp8.jsonl"
    assert pretrain_gpt_vision.main([*TINY, "--train-iters", "8", "--attention-backend", "sdpa",
                                     "--log-jsonl", str(reference)]) == 0
    assert pretrain_gpt_vision.main([*TINY, "--train-iters", "8", "--attention-backend", "triton-fp8",
                                     "--log-jsonl", str(fp8)]) == 0
    want, got = _losses(reference), _losses(fp8)
    assert all(torch.isfinite(torch.tensor(got)))
    assert max(abs(a - b) / abs(b) for a, b in zip(got, want)) <= 2e-2


def test_fused_paths_under_bf16_autocast_match_the_reference_model():
    # Packed rows with a length-1 document and padding, response images, padded vocabulary; bf16 autocast.
    cfg = preset("tiny", real_vocab_size=500, num_layers=2)
    torch.manual_seed(5)
    tokens = torch.randint(0, 500, (2, 40))
    document_ids = torch.tensor([[0] * 20 + [1] + [2] * 19, [0] * 33 + [-1] * 7])
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, :4] = -100
    visual = torch.nn.functional.normalize(torch.randn(8, 1152), dim=-1).bfloat16()
    positions = torch.arange(5, 13)
    target_mask = torch.tensor([False, False, True, True, True, True, True, True])
    results = {}
    for name, changes in [("reference", {"attention_backend": "sdpa"}),
                          ("fused", {"attention_backend": "triton", "fused_linear_cross_entropy": True,
                                     "fused_visual_head_loss": True})]:
        model = build_model(cfg.replace(**changes), seed=6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tokens, document_ids=document_ids, labels=labels, visual_tokens=visual,
                        visual_positions=positions, visual_target_mask=target_mask)
        out.loss.backward()
        results[name] = (out, {n: p.grad.float() for n, p in model.named_parameters()})
    ref, fused = results["reference"], results["fused"]
    for part in ("lm_loss", "visual_loss"):
        want, got = getattr(ref[0], part).item(), getattr(fused[0], part).item()
        assert abs(got - want) <= 2e-2 * abs(want), part
    for name, grad in ref[1].items():
        err = (fused[1][name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert torch.isfinite(fused[1][name]).all() and err <= 2e-2, f"{name}: {err:.2e}"
    assert not fused[1]["output.weight"][500:].any(), "padded vocabulary rows must get no gradient"


def test_fp32_triton_attention_past_head_dim_128_is_refused_at_start():
    # fp32 attention kernels take head dims up to 128 (chrysalis_kernels.attention); without --bf16 the model runs
    # them in fp32, so a 256-wide head is refused before data and model setup, not at the first step.
    from engine.training import Trainer, build_device_mesh

    wide = [*TINY, "--hidden-size", "256", "--num-attention-heads", "1", "--num-query-groups", "1"]
    with pytest.raises(ValueError, match="head dim 256 without --bf16 runs the Triton attention kernels in fp32"):
        Trainer(parse_training_config([*wide, "--attention-backend", "triton"]), build_device_mesh())


def test_fused_loss_flags_reach_the_model_config_and_are_checked():
    config = parse_training_config([*TINY, *FUSED])
    assert config.model.fused_linear_cross_entropy and config.model.fused_visual_head_loss
    assert not parse_training_config(TINY).model.fused_linear_cross_entropy
    config = parse_training_config([*TINY, "--fused-visual-head-loss", "--tensor-model-parallel-size", "2"])
    with pytest.raises(ValueError, match="--fused-visual-head-loss"):
        config.validate(data_parallel_size=1)
