"""benchmarks/gpu_training.py --smoke: every GPU check of the training issue runs end to end at tiny sizes on CPU
and writes its figures, so the GPU minutes are not spent discovering a broken script."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_training.py"


def test_gpu_training_benchmark_smoke(tmp_path):
    pytest.importorskip("torchao", reason="the FP8 checks need torchao (pip install 'chrysalis[fp8]')")
    spec = importlib.util.spec_from_file_location("gpu_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu_training.json").read_text())
    assert results["smoke"] is True and results["environment"]["torch"]
    checks = results["checks"]
    assert set(checks) == set(module.CHECKS)
    for name, figures in checks.items():
        assert "error" not in figures, (name, figures.get("error"), figures.get("traceback"))
    assert checks["bf16_mfu"]["tokens_per_s"] > 0 and checks["bf16_mfu"]["mfu_convention"] > 0
    assert checks["fp8_vs_bf16"]["fp8_speedup_median"] > 0 and checks["compile"]["compile_speedup_median"] > 0
    assert {"sdpa", "flex"} <= {k for k, v in checks["packed_vs_unpacked"].items()
                                if isinstance(v, dict) and "packed_s" in v}
    assert "unavailable" in checks["packed_vs_unpacked"]["flash"]
    assert set(checks["memory"]) >= {"bf16", "bf16_selective_recompute", "fp8"}
    assert checks["fp8_loss"]["relative_difference"] < 0.015
