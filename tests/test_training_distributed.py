"""Data parallelism on CPU/gloo with 2 processes: parity with 1 process (DDP and FSDP2), bitwise resume, a SIGKILL in
the middle of a checkpoint, and SIGTERM on one rank."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY = str(ROOT / "pretrain_gpt_vision.py")
TINY = ["--mock-data", "--mock-data-sequences", "64", "--num-layers", "2", "--hidden-size", "32",
        "--ffn-hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "128",
        "--max-position-embeddings", "256", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3",
        "--lr-warmup-iters", "1", "--weight-decay", "0.1", "--num-workers", "0", "--log-interval", "1", "--seed", "5",
        "--train-iters", "4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], tmp: Path, env_extra: dict | None = None, nproc: int = 2) -> list[subprocess.Popen]:
    """Starts `nproc` ranks the way torchrun does (RANK/WORLD_SIZE/MASTER_* in the environment), so the test can
    signal a single rank."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONFAULTHANDLER": "1", **(env_extra or {})}
        out = open(tmp / f"rank{rank}.out", "a")
        procs.append(subprocess.Popen([sys.executable, ENTRY, *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                      cwd=ROOT))
    return procs


def wait(procs: list[subprocess.Popen], tmp: Path, timeout: float = 240) -> list[int]:
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.1)
    if any(p.poll() is None for p in procs):
        for p in procs:  # faulthandler writes every thread's stack to the rank's log
            if p.poll() is None:
                p.send_signal(signal.SIGABRT)
        time.sleep(2)
        for p in procs:
            p.kill()
    codes = [p.wait() for p in procs]
    if any(codes):
        logs = "\n".join((tmp / f"rank{r}.out").read_text()[-3000:] for r in range(len(procs)))
        raise AssertionError(f"exit codes {codes}\n{logs}")
    return codes


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(path: Path) -> list[tuple]:
    return [(r["iteration"], r["loss"], r["lm_loss"], r["visual_loss"]) for r in records(path)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process (2 micro-batches of 2) and two DDP processes (1 micro-batch of 2 each)."""
    tmp = tmp_path_factory.mktemp("reference")
    wait(launch([*TINY, "--log-jsonl", str(tmp / "dp1.jsonl")], tmp, nproc=1), tmp)
    wait(launch([*TINY, "--log-jsonl", str(tmp / "dp2.jsonl")], tmp), tmp)
    return tmp


def assert_close(a: list[tuple], b: list[tuple], rel: float) -> None:
    assert [r[0] for r in a] == [r[0] for r in b]
    for ra, rb in zip(a, b):
        for x, y in zip(ra[1:], rb[1:]):
            assert abs(x - y) <= rel * abs(y), (ra, rb)


def test_ddp_two_processes_match_one_process(reference):
    dp1, dp2 = records(reference / "dp1.jsonl"), records(reference / "dp2.jsonl")
    assert_close(losses(reference / "dp1.jsonl"), losses(reference / "dp2.jsonl"), rel=1e-6)
    for a, b in zip(dp1, dp2):
        assert a["visual_targets"] == b["visual_targets"] and a["lm_tokens"] == b["lm_tokens"]
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"]
    assert dp2[-1]["loss"] < dp2[0]["loss"]


def test_fsdp2_matches_ddp(reference, tmp_path):
    wait(launch([*TINY, "--data-parallel-sharding", "fsdp", "--log-jsonl", str(tmp_path / "fsdp.jsonl"),
                 "--recompute-num-layers", "1"], tmp_path), tmp_path)
    assert_close(losses(tmp_path / "fsdp.jsonl"), losses(reference / "dp2.jsonl"), rel=1e-6)


def test_ddp_resume_after_sigkill_mid_checkpoint_is_bitwise(reference, tmp_path):
    log, save = tmp_path / "log.jsonl", tmp_path / "ck"
    args = [*TINY, "--log-jsonl", str(log), "--save", str(save), "--save-interval", "2"]
    procs = launch(args, tmp_path, env_extra={"CHRYSALIS_TEST_SLEEP_IN_SAVE": "4:120"})
    deadline = time.time() + 240
    while not (save / "iter_0000004" / "state.json").exists():  # DCP files of iteration 4 written, record not yet
        assert time.time() < deadline and all(p.poll() is None for p in procs), "trainer ended early"
        time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert (save / "latest").read_text().strip() == "iter_0000002"
    assert not (save / "iter_0000004" / "chrysalis_train.json").exists()

    wait(launch([*args, "--load", str(save)], tmp_path), tmp_path)
    out = (tmp_path / "rank0.out").read_text()
    assert "iter_0000004 is unusable" in out and "falling back to iter_0000002" in out
    assert "resumed from" in out and "at iteration 2" in out
    assert losses(log) == losses(reference / "dp2.jsonl")  # bitwise, iterations 1-4
    assert (save / "latest").read_text().strip() == "iter_0000004"


@pytest.mark.parametrize("layout", [[], ["--tensor-model-parallel-size", "2"]], ids=["dp2", "tp2"])
def test_sigterm_on_one_rank_saves_and_exits_zero(tmp_path, layout):
    """The stop vote spans every rank: under TP2 (no data parallelism) the unsignalled rank stops too."""
    log, save = tmp_path / "log.jsonl", tmp_path / "ck"
    args = [*TINY, *layout, "--train-iters", "1000", "--log-jsonl", str(log), "--save", str(save)]
    procs = launch(args, tmp_path)
    deadline = time.time() + 240
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "trainer ended early"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # a preemption notice reaching one rank first
    assert wait(procs, tmp_path, timeout=120) == [0, 0]
    saved = int((save / "latest").read_text().strip()[5:])
    assert 2 <= saved < 1000
    assert (save / f"iter_{saved:07d}" / "chrysalis_train.json").is_file()
    assert "received signal 15" in (tmp_path / "rank1.out").read_text() or \
        "received signal 15" in (tmp_path / "rank0.out").read_text()


def test_fsdp2_checkpoint_resumes_on_one_process(reference, tmp_path):
    """Save under FSDP2 x 2 (sharded DTensors), resume under 1 process (plain tensors): DCP reshards."""
    log, save = tmp_path / "log.jsonl", tmp_path / "ck"
    args = [*TINY, "--log-jsonl", str(log), "--save", str(save), "--exit-interval", "2"]
    wait(launch([*args, "--data-parallel-sharding", "fsdp"], tmp_path), tmp_path)
    wait(launch([*args, "--load", str(save)], tmp_path, nproc=1), tmp_path)
    assert [r[0] for r in losses(log)] == [1, 2, 3, 4]
    assert_close(losses(log), losses(reference / "dp2.jsonl"), rel=1e-6)


def test_fsdp2_stage1_matches_one_process(tmp_path):
    """Stage 1 under FSDP2: the new-row gradient mask is applied to row-sharded DTensor gradients."""
    stage1 = [*TINY, "--stage", "1", "--train-iters", "3"]
    wait(launch([*stage1, "--log-jsonl", str(tmp_path / "one.jsonl")], tmp_path, nproc=1), tmp_path)
    wait(launch([*stage1, "--log-jsonl", str(tmp_path / "fsdp.jsonl"), "--data-parallel-sharding", "fsdp"],
                tmp_path), tmp_path)
    assert_close(losses(tmp_path / "fsdp.jsonl"), losses(tmp_path / "one.jsonl"), rel=1e-6)
