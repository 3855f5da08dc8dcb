"""Resume after an interrupt, and byte-identical output for any --workers and any MPI rank count."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "preprocess"))
import preprocess_factory as factory  # noqa: E402

from preprocess.build import CRASH_AFTER_SHARDS_ENV, CRASH_DURING_SHARD_ENV  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    factory.write_images(root / "images")
    first = factory.write_jsonl(root / "a.jsonl", factory.FAMILY_RECORDS)
    # A second input reusing the same images: cross-shard duplicates exercise the global dedup.
    second = factory.write_json_array(root / "b.json", list(reversed(factory.FAMILY_RECORDS)))
    tokenizer = factory.make_tokenizer(root / "tokenizer")
    return root, [first, second], tokenizer


def _args(data, out, *extra):
    root, inputs, tokenizer = data
    # 3 records per shard: 6 shards over the two 7-record inputs.
    return factory.build_args(inputs, out, tokenizer, root / "images", "--samples-per-shard", "3", *extra)


def _run(args, env_extra=None, launcher=()):
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(env_extra or {}))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([*launcher, sys.executable, "-m", "preprocess", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(data):
    out = data[0] / "reference"
    assert factory.run_cli(_args(data, out)) == 0
    return out


def test_reference_build_dedups_across_shards(reference):
    manifest = json.loads((reference / "manifest.json").read_text())
    assert len(manifest["shards"]) == 6
    assert manifest["counts"]["samples_written"] == 14
    assert manifest["counts"]["images"] == 22 and manifest["counts"]["unique_images"] == 10
    # The second input's shards re-use rows of the first: no new segment rows for them.
    assert sum(s["rows"] for s in manifest["embeddings"]["segments"]) == 10


def test_workers_give_byte_identical_output(data, reference):
    out = data[0] / "workers2"
    assert factory.run_cli(_args(data, out, "--workers", "2")) == 0  # spawned worker processes
    assert factory.tree_bytes(out) == factory.tree_bytes(reference)


def test_resume_after_interrupts_finishes_without_duplicates(data, reference, capsys):
    out = data[0] / "interrupted"
    # 1. Killed while writing shard 1: shard 0 done, shard 1's streams on disk but not marked complete.
    crashed = _run(_args(data, out), {CRASH_DURING_SHARD_ENV: "1"})
    assert crashed.returncode == 17, crashed.stderr
    assert not (out / "manifest.json").exists()
    assert (out / "parts" / "shard-00000.json").exists() and not (out / "parts" / "shard-00001.json").exists()
    (out / "shards" / "shard-00004.bin.tmp").write_bytes(b"half a write")  # a torn temp file too
    # 2. Without --resume the directory is refused, with a hint.
    capsys.readouterr()
    assert factory.run_cli(_args(data, out)) == 2
    assert "--resume" in capsys.readouterr().err
    # 3. Resuming with different output-affecting flags is refused, naming what differs.
    changed = _args(data, out, "--resume")
    changed[changed.index("--seq-length") + 1] = "1024"
    assert factory.run_cli(changed) == 2
    assert "settings" in capsys.readouterr().err
    # 4. Resumed, then killed again after two more shards.
    crashed = _run(_args(data, out, "--resume"), {CRASH_AFTER_SHARDS_ENV: "2"})
    assert crashed.returncode == 17, crashed.stderr
    assert len(list((out / "parts").glob("shard-*.json"))) == 3
    # 5. Resumed to the end: the same bytes as an uninterrupted build.
    assert factory.run_cli(_args(data, out, "--resume")) == 0
    assert factory.tree_bytes(out) == factory.tree_bytes(reference)
    # 6. Resuming a finished build is a no-op.
    assert factory.run_cli(_args(data, out, "--resume")) == 0
    assert factory.tree_bytes(out) == factory.tree_bytes(reference)


def test_mpi_two_ranks_byte_identical(data, reference):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun not found: install an MPI runtime (apt-get install openmpi-bin libopenmpi-dev) "
                    "and mpi4py to run the multi-rank test")
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install mpi4py)")
    out = data[0] / "mpi"
    launcher = (mpirun, "-n", "2", "--oversubscribe", "--allow-run-as-root")
    result = _run(_args(data, out), launcher=launcher)
    assert result.returncode == 0, result.stdout + result.stderr
    assert factory.tree_bytes(out) == factory.tree_bytes(reference)
