"""Preemption as SLURM does it: SIGTERM to every process of the job (the trainer and its DataLoader workers). The
workers ignore it, the trainer finishes the step, saves a checkpoint and exits 0, and the next launch resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--mock-data", "--mock-data-sequences", "64", "--num-layers", "2", "--hidden-size", "32",
        "--ffn-hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "128",
        "--max-position-embeddings", "256", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3",
        "--log-interval", "1", "--seed", "5"]


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, str(ROOT / "pretrain_gpt_vision.py"), *args], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_steps(proc: subprocess.Popen, jsonl: Path, steps: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not (jsonl.exists() and len(jsonl.read_text().splitlines()) >= steps):
        assert proc.poll() is None, "the trainer ended before it was signalled"
        assert time.time() < deadline, "the trainer made no progress"
        time.sleep(0.2)


def test_sigterm_to_the_process_group_saves_and_exits_zero(tmp_path):
    save, jsonl, out = tmp_path / "ck", tmp_path / "log.jsonl", tmp_path / "out.txt"
    args = [*TINY, "--num-workers", "2", "--train-iters", "100000", "--save", str(save), "--log-jsonl", str(jsonl)]
    proc = start(args, out)
    wait_for_steps(proc, jsonl, 2)
    os.killpg(proc.pid, signal.SIGTERM)  # every process of the group: trainer and loader workers
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    text = out.read_text()
    assert code == 0, text[-3000:]
    assert "received signal 15" in text and "Traceback" not in text
    latest = (save / "latest").read_text().strip()
    saved = int(latest[5:])
    assert saved >= 2
    assert (save / latest / "chrysalis_train.json").is_file()
    # The next launch resumes where the preempted one stopped.
    resumed = subprocess.run([sys.executable, str(ROOT / "pretrain_gpt_vision.py"), *TINY, "--num-workers", "0",
                              "--train-iters", str(saved + 1), "--load", str(save), "--save", str(save),
                              "--log-jsonl", str(jsonl)], cwd=ROOT, capture_output=True, text=True, timeout=180,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at iteration {saved}" in resumed.stdout
    assert json.loads(jsonl.read_text().splitlines()[-1])["iteration"] == saved + 1


def test_exit_signal_can_be_chosen_and_turned_off(tmp_path):
    """--exit-signal SIGUSR1 (SLURM's `--signal=USR1@90` pattern) saves on SIGUSR1; --no-exit-signal-handler leaves
    SIGTERM fatal, as without Megatron's --exit-signal-handler."""
    save, jsonl = tmp_path / "ck", tmp_path / "log.jsonl"
    proc = start([*TINY, "--num-workers", "0", "--train-iters", "100000", "--save", str(save), "--log-jsonl",
                  str(jsonl), "--exit-signal", "SIGUSR1"], tmp_path / "a.txt")
    wait_for_steps(proc, jsonl, 1)
    os.killpg(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=120) == 0, (tmp_path / "a.txt").read_text()[-3000:]
    assert (save / "latest").is_file()
    jsonl2 = tmp_path / "log2.jsonl"
    proc = start([*TINY, "--num-workers", "0", "--train-iters", "100000", "--save", str(tmp_path / "ck2"),
                  "--log-jsonl", str(jsonl2), "--no-exit-signal-handler"], tmp_path / "b.txt")
    wait_for_steps(proc, jsonl2, 1)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == -signal.SIGTERM
    assert not (tmp_path / "ck2" / "latest").exists()
