"""Training flags, YAML precedence, validation messages and the learning-rate schedule."""

import math

import pytest
import torch

from engine.training.config import OptimizerConfig, parse_training_config
from engine.training.optim import WarmupDecaySchedule


def test_yaml_sets_flags_and_the_command_line_wins(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("micro-batch-size: 4\nglobal_batch_size: 16\nlr: 0.01\n--seed: 9\n"
                   "data-path: [0.7, /a, 0.3, /b]\nmodel-preset: tiny\nstage: 1\nbf16: true\n")
    config = parse_training_config(["--config", str(run), "--lr", "0.002"])
    assert config.micro_batch_size == 4 and config.global_batch_size == 16 and config.seed == 9
    assert config.optimizer.lr == 0.002  # command line over YAML
    assert config.data.weighted_paths() == [(0.7, "/a"), (0.3, "/b")]
    assert config.stage == 1 and config.bf16 and config.model.hidden_size == 64


def test_unknown_yaml_key_is_named(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("micro-batch-sise: 4\n")
    with pytest.raises(ValueError, match="micro-batch-sise"):
        parse_training_config(["--config", str(run), "--mock-data"])


def test_validation_names_the_flag_to_change():
    config = parse_training_config(["--mock-data", "--micro-batch-size", "3", "--global-batch-size", "8"])
    with pytest.raises(ValueError, match="--global-batch-size 8 must be a multiple of --micro-batch-size 3"):
        config.validate(data_parallel_size=1)
    config = parse_training_config(["--model-preset", "tiny"])
    with pytest.raises(ValueError, match="--data-path"):
        config.validate()
    config = parse_training_config(["--mock-data", "--exit-interval", "5"])
    with pytest.raises(ValueError, match="--save"):
        config.validate()
    config = parse_training_config(["--data-path", "0.5", "/a", "/b", "--model-preset", "tiny"])
    with pytest.raises(ValueError, match="odd count"):
        config.validate()


def test_warmup_then_cosine_to_min_lr():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupDecaySchedule(opt, OptimizerConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=4), train_iters=104)
    lrs = [schedule.lr_at(i) for i in range(110)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(lrs[54], 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 100)))
    assert lrs[104:] == [0.1] * 6
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    schedule.step()
    assert opt.param_groups[0]["lr"] == 0.5
    fraction = WarmupDecaySchedule(opt, OptimizerConfig(lr=1.0, lr_warmup_fraction=0.1), train_iters=100)
    assert fraction.warmup == 10


def test_help_renders():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(repo / "pretrain_gpt_vision.py"), "--help"], capture_output=True,
                            text=True, timeout=120, cwd=repo)
    assert result.returncode == 0, result.stderr
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--sequence-parallel",
                 "--num-layers-per-virtual-pipeline-stage", "--data-path", "--exit-interval"):
        assert flag in result.stdout
