"""Packaging: light core imports, declared extras, and no shadowing of Hugging Face's `kernels` package."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_core_import_does_not_load_optional_backends():
    code = (
        "import sys, engine, engine.config, engine.model, engine.tokenizer, engine.convert, engine.checkpoint_io\n"
        "heavy = [m for m in ('transformers', 'sentencepiece', 'tiktoken', 'tokenizers', 'diffusers',\n"
        "         'transformer_engine', 'flash_attn', 'torchao', 'triton', 'nvidia.dali', 'mpi4py') if m in sys.modules]\n"
        "print(heavy)\n"
        "assert not heavy, heavy\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr + result.stdout


def test_extras_are_declared():
    extras = set(importlib.metadata.metadata("chrysalis").get_all("Provides-Extra") or [])
    assert {"dev", "data", "gpu", "viz"} <= extras


@pytest.mark.parametrize("cwd", [REPO, Path("/")], ids=["repo-root", "elsewhere"])
def test_transformers_still_works_with_our_kernels_installed(cwd):
    pytest.importorskip("transformers")
    code = (
        "import importlib.util, torch\n"
        "import chrysalis_kernels.registry\n"  # ours, under its installed name
        f"ours = {str(REPO / 'kernels')!r}\n"
        "spec = importlib.util.find_spec('kernels')\n"
        # A regular package named `kernels` may only be Hugging Face's; ours is at most a namespace portion.
        "regular = spec is not None and spec.origin not in (None, 'namespace')\n"
        "assert not (regular and spec.origin.startswith(ours)), spec\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "if not regular: assert not is_kernels_available(), 'transformers mistook our folder for HF kernels'\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,\n"
        "                  num_attention_heads=2, num_key_value_heads=1)\n"
        "out = LlamaForCausalLM(cfg)(torch.tensor([[1, 2, 3]])).logits\n"
        "assert out.shape == (1, 3, 64)\n"
        "print('ok')\n"
    )
    result = run_python(code, cwd=cwd)
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout.strip().endswith("ok")


def test_kernels_source_folder_is_not_a_regular_package():
    # An __init__.py would make `kernels/` a regular package that shadows Hugging Face's `kernels` from the repo root.
    assert not (REPO / "kernels" / "__init__.py").exists()
    import chrysalis_kernels.registry as registry

    backends = registry.available_backends()
    assert set(backends) == {"triton", "transformer_engine", "flash_attn", "apex", "torchao"}
    assert all(isinstance(v, bool) for v in backends.values())
