"""How long every program takes to print --help (goal: under 2 s), next to a bare interpreter and `import torch`.

    python benchmarks/help_latency.py [--rounds 5]

Runs each command `--rounds` times, interleaved (round r runs every command once, in the same order), after one
warm-up round (file-system cache), and prints the median and min-max wall time of each, the load average before
and after, and the interpreter and torch versions. The two reference rows bound what --help can cost: starting
Python, and importing torch (what a program that imports torch before parsing its arguments pays at least).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
COMMANDS = {
    "python -c pass (bound)": [PY, "-c", "pass"],
    "python -c 'import torch' (bound)": [PY, "-c", "import torch"],
    "pretrain_gpt_vision.py --help": [PY, "pretrain_gpt_vision.py", "--help"],
    "python -m engine.generate --help": [PY, "-m", "engine.generate", "--help"],
    "python -m engine.plot --help": [PY, "-m", "engine.plot", "--help"],
    "python -m engine.convert --help": [PY, "-m", "engine.convert", "--help"],
    "python -m engine.training.export --help": [PY, "-m", "engine.training.export", "--help"],
    "python -m engine.visualizer.train --help": [PY, "-m", "engine.visualizer.train", "--help"],
    "python -m engine.visualizer.render --help": [PY, "-m", "engine.visualizer.render", "--help"],
    "python -m engine.visualizer.autoencoder --help": [PY, "-m", "engine.visualizer.autoencoder", "--help"],
    "python -m preprocess build --help": [PY, "-m", "preprocess", "build", "--help"],
    "python -m preprocess inspect --help": [PY, "-m", "preprocess", "inspect", "--help"],
    "python -m engine.plan --help": [PY, "-m", "engine.plan", "--help"],
}


def run_once(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.decode()[-500:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/help_latency.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="(default: %(default)s)")
    args = parser.parse_args()
    import torch

    print(f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for command in COMMANDS.values():  # warm-up
        run_once(command)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, command in COMMANDS.items():
            times[name].append(run_once(command))
    width = max(map(len, COMMANDS))
    print(f"{'command':<{width}}  median (s)  min-max (s)  under 2 s")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<{width}}  {median:10.2f}  {min(values):.2f}-{max(values):.2f}  "
              f"{'yes' if median < 2 else 'NO'}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.rounds} interleaved rounds")


if __name__ == "__main__":
    main()
