"""bf16 mixed precision under every parallel layout, through `pretrain_gpt_vision.py` on real shards (the bundled
sample built by `python -m preprocess build`): TP2, PP2 interleaved, TP2 x PP2 + SP (1F1B), DP2 x TP2 and DDP2 (both with
`--grad-reduce-in-bf16`) and FSDP2 each log the 5 losses of one bf16 process within 2e-2
relative. In-process checks: what runs in bf16 and what stays fp32 in a pipeline stage, and `--fp16`'s refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_launch import REPO, torchrun

ENTRY = REPO / "pretrain_gpt_vision.py"

LAYOUTS = {
    "tp2": (2, "--tensor-model-parallel-size", "2"),
    "pp2-interleaved": (2, "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"),
    "tp2xpp2-sp": (4, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                   "--sequence-parallel"),
    "dp2xtp2-bf16-reduce": (4, "--tensor-model-parallel-size", "2", "--grad-reduce-in-bf16"),
    "fsdp2": (2, "--data-parallel-sharding", "fsdp"),
    # DDP's bf16 gradient compression: torch's bf16_compress_hook refuses gloo (a TypeError at the first backward).
    "ddp2-bf16-reduce": (2, "--grad-reduce-in-bf16"),
}


def cli_args(data: Path, log: Path, *extra: str) -> list[str]:
    return ["--data-path", str(data), "--split", "100,0,0", "--num-layers", "4", "--hidden-size", "32",
            "--ffn-hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "5", "--lr", "3e-3",
            "--lr-warmup-iters", "1", "--num-workers", "0", "--log-interval", "100", "--seed", "11", "--bf16",
            "--log-jsonl", str(log), *extra]


def losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def bf16_reference(sample_shards, tmp_path_factory) -> list[float]:
    log = tmp_path_factory.mktemp("bf16-ref") / "ref.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(ENTRY), *cli_args(sample_shards, log)], check=False,
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return losses(log)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bf16_layout_matches_one_bf16_process(sample_shards, bf16_reference, tmp_path, layout):
    nproc, *flags = LAYOUTS[layout]
    log = tmp_path / "run.jsonl"
    done = torchrun(ENTRY, nproc, cli_args(sample_shards, log, *flags))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    got = losses(log)
    print(layout, "max relative loss difference", max(abs(h - w) / w for w, h in zip(bf16_reference, got)))
    assert len(got) == len(bf16_reference) == 5
    for step, (want, have) in enumerate(zip(bf16_reference, got)):
        assert abs(have - want) <= 2e-2 * abs(want), f"{layout} step {step}: loss {have} vs one process {want}"


def test_pipeline_stage_precision():
    """Under bf16 a stage's matmuls run in bf16, the hidden states it sends are bf16, the loss is fp32, and the
    master weights and their gradients stay fp32."""
    from engine.config import ModelConfig
    from engine.model import IGNORE_INDEX
    from engine.parallel.pipeline import VPiTStage, build_model_part

    config = ModelConfig(vocab_size=64, hidden_size=32, ffn_hidden_size=64, num_layers=2, num_attention_heads=4,
                         num_query_groups=2, seq_length=16, max_position_embeddings=32)
    first = build_model_part(config, [0], is_first=True, is_last=False, device="cpu", model_class=VPiTStage)
    last = build_model_part(config, [1], is_first=False, is_last=True, device="cpu", model_class=VPiTStage)
    matmul_dtypes = []
    for part in (first, last):
        part.autocast_dtype = part.boundary_dtype = torch.bfloat16
        part.layers[next(iter(part.layers))].attention.wq.register_forward_hook(
            lambda module, args, out: matmul_dtypes.append(out.dtype))
    b, s = 2, config.seq_length
    tokens = torch.randint(0, 64, (b, s))
    labels = torch.randint(0, 64, (b, s))
    labels[:, :3] = IGNORE_INDEX
    kwargs = {"position_ids": torch.arange(s).expand(b, s), "document_ids": torch.zeros(b, s, dtype=torch.long),
              "visual_tokens": torch.zeros(b, 0, config.vision_dim), "visual_slots": torch.full((b, 0), -1),
              "visual_targets": torch.zeros(b, 0, dtype=torch.bool), "labels": labels}
    hidden = first(tokens, **kwargs)
    assert hidden.dtype == torch.bfloat16  # what travels to the next stage
    received = hidden.detach().requires_grad_()
    loss = last(received, **kwargs)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    hidden.backward(received.grad)
    assert received.grad.dtype == torch.bfloat16  # the gradient sent back
    assert matmul_dtypes == [torch.bfloat16, torch.bfloat16]
    for part in (first, last):
        for name, p in part.named_parameters():
            assert p.dtype == torch.float32, name
            if p.grad is not None:
                assert p.grad.dtype == torch.float32, name


def test_fp16_is_refused_and_grad_reduce_flags_parse():
    from engine.training import parse_training_config

    config = parse_training_config(["--mock-data", "--fp16"])
    with pytest.raises(ValueError, match="--fp16 is not supported: use --bf16"):
        config.validate()
    assert parse_training_config(["--mock-data", "--bf16"]).accumulate_allreduce_grads_in_fp32 is True
    assert parse_training_config(["--mock-data", "--accumulate-allreduce-grads-in-fp32"]) \
        .accumulate_allreduce_grads_in_fp32 is True
    assert parse_training_config(["--mock-data", "--grad-reduce-in-bf16"]).accumulate_allreduce_grads_in_fp32 is False
    # The reduction is bf16 only in bf16 training: an fp32 run with the flag reduced its fp32 gradients in bf16
    # under TP/PP (ParallelVPiT) while DDP/FSDP2 (and Megatron) reduce them in fp32. The trainer reads this property.
    assert parse_training_config(["--mock-data", "--grad-reduce-in-bf16"]).grad_reduce_in_bf16 is False
    assert parse_training_config(["--mock-data", "--grad-reduce-in-bf16", "--bf16"]).grad_reduce_in_bf16 is True
    assert parse_training_config(["--mock-data", "--bf16"]).grad_reduce_in_bf16 is False
