"""benchmarks/generate_kv_cache.py --smoke: every comparison of the generation benchmark (cached vs recompute,
ours vs Hugging Face generate() vs the GEMV bound, batches, and the GPU mode's compiled vs eager vs HF) runs end to
end at tiny sizes on CPU, with its same-work checks passing, so a re-run on a quiet machine or a GPU does not
discover a broken script."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "generate_kv_cache.py"


def load_script():
    spec = importlib.util.spec_from_file_location("generate_kv_cache", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("generate_kv_cache", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_generation_benchmark_smoke(tmp_path):
    pytest.importorskip("transformers")
    module = load_script()
    out = tmp_path / "cpu.json"
    results = module.main(["--smoke", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    by_name = {s["section"]: s for s in results["sections"]}
    assert set(by_name) == {"vpit", "bound", "batch"}
    vpit = by_name["vpit"]
    assert vpit["same_tokens"] and vpit["images"] == 1 and vpit["max_visual_token_diff"] < 1e-4
    assert vpit["speedup"]["median"] > 0 and results["header"]["load_before"]
    bound = by_name["bound"]
    assert bound["same_tokens"] and bound["weight_bytes"] > 0 and bound["ours_time_over_bound"]["median"] > 0
    assert by_name["batch"]["rows_with_same_tokens"] == by_name["batch"]["batch"] == 2

    gpu = module.main(["--smoke", "--gpu", "--json", str(tmp_path / "gpu.json")])["gpu"]
    (row,) = gpu["rows"]
    assert "error" not in row, row.get("traceback")
    assert not row["compiled_fell_back_to_eager"]
    assert row["rows_same_as_eager"] == row["rows_same_as_hf"] == 2
    assert json.loads((tmp_path / "gpu.json").read_text())["gpu"]["rows"][0]["batch"] == 2
