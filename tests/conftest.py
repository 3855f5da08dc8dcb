"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels (chrysalis_kernels) are tested under Triton's interpreter, which must be chosen
# before triton is first imported by anything (torch.compile's inductor imports it): triton.language's own @jit
# helpers (tl.zeros, tl.max, ...) are fixed at that import. Tests that need the variable unset delete it themselves.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls on a shared 2-core machine: a second intra-op thread costs 10-30x in synchronisation.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory):
    """The bundled sample (examples/data/sample) built once per session by `python -m preprocess build` (tiktoken
    tokenizer, llama3 chat template, tiny random SigLIP, sequences of 512): real shards for CLI tests."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sample = root / "examples" / "data" / "sample"
    out = tmp_path_factory.mktemp("sample-shards") / "build"
    cmd = [sys.executable, "-m", "preprocess", "build", "--input", str(sample / "samples.jsonl"),
           "--image-root", str(sample / "images"), "--tokenizer-type", "tiktoken",
           "--tokenizer-model", str(root / "examples/data/tokenizer/tokenizer.model"), "--chat-template", "llama3",
           "--vision-encoder", "tiny-random", "--seq-length", "512", "--workers", "1", "--output", str(out),
           "--no-progress"]
    done = subprocess.run(cmd, cwd=root, check=False, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def pytest_addoption(parser):
    parser.addoption("--decoder", choices=["pil", "dali"], default="pil",
                     help="image decoder of the preprocess tests' builds (dali: NVIDIA DALI's CPU decoder)")


def pytest_configure(config):
    import os

    decoder = config.getoption("--decoder")
    if decoder == "dali":
        import importlib.util

        if importlib.util.find_spec("nvidia.dali") is None:
            raise pytest.UsageError("--decoder dali: NVIDIA DALI is not installed (pip install -e .[dali])")
    os.environ["CHRYSALIS_TEST_IMAGE_DECODER"] = decoder  # read by tests/fixtures/preprocess (and subprocesses)
