"""The kernel benchmarks' --smoke modes (CPU, Triton interpreter, tiny sizes) run every case and write their JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,cases", [
    ("kernels_attention.py", {"causal-48", "packed-48"}),
    ("kernels_fused.py", {"linear_cross_entropy", "rmsnorm", "rotary", "head_loss"}),
])
def test_benchmark_smoke_mode_writes_every_case(tmp_path, script, cases):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--output-dir",
                             str(tmp_path)], check=False, capture_output=True, text=True, timeout=600, cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / script.replace(".py", ".json")).read_text())
    assert data["smoke"] and data["environment"]["triton_interpret"]
    assert set(data["cases"]) == cases and not any("error" in c for c in data["cases"].values())
    if script == "kernels_attention.py":
        for case in cases:  # ours and the reference did the same work
            entry = data["cases"][case]
            assert {"triton", "triton-fp8", "sdpa-dense-cpu"} <= set(entry["forward"])
            assert entry["max_abs_diff"]["sdpa-dense-cpu"] < 5e-2 and entry["backward"]["triton"]["median_s"] > 0
    else:
        ce = data["cases"]["linear_cross_entropy"]["loss"]
        assert abs(ce["fused"] - ce["unfused"]) <= 1e-3 * abs(ce["unfused"])
