"""Share of the training step spent waiting for data, in the tiny CPU run of the quick start.

    python benchmarks/loader_step_share.py [--build /tmp/chrysalis_demo] [--iters 60] [--workers 0 2]

Builds the bundled sample (`examples/data/sample`, tiny random encoder, --seq-length 1024) if `--build` has no
manifest, then trains `--model-preset tiny` for `--iters` steps (micro-batch 2, global batch 4) per worker count,
and reports sum(data_wait_s) / sum(step_s) from the `--log-jsonl` records, without the first 5 steps (warm-up).
`data_wait_s` is the time `Trainer.train` spends in `next(loader)` and the host-to-device copy of the step's
micro-batches; `step_s` is the whole step including it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLE = ROOT / "examples" / "data" / "sample"


def build(out: Path) -> Path:
    if (out / "manifest.json").is_file():
        return out
    cmd = [sys.executable, "-m", "preprocess", "build", "--input", str(SAMPLE / "samples.jsonl"),
           "--image-root", str(SAMPLE / "images"), "--tokenizer-type", "tiktoken",
           "--tokenizer-model", str(ROOT / "examples/data/tokenizer/tokenizer.model"), "--chat-template", "llama3",
           "--vision-encoder", "tiny-random", "--seq-length", "1024", "--workers", "1", "--output", str(out),
           "--no-progress"]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default="/tmp/chrysalis_demo")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    out = build(Path(args.build))
    import pretrain_gpt_vision

    results = []
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "log.jsonl"
            code = pretrain_gpt_vision.main([
                "--data-path", str(out), "--split", "100,0,0", "--model-preset", "tiny", "--micro-batch-size", "2",
                "--global-batch-size", "4", "--train-iters", str(args.iters), "--lr", "1e-3", "--num-workers",
                str(workers), "--log-interval", str(args.iters), "--log-jsonl", str(log)])
            assert code == 0
            rows = [json.loads(line) for line in log.read_text().splitlines()][5:]
        data = sum(r["data_wait_s"] for r in rows)
        step = sum(r["step_s"] for r in rows)
        results.append({"num_workers": workers, "steps": len(rows), "mean_step_ms": 1000 * step / len(rows),
                        "mean_data_wait_ms": 1000 * data / len(rows), "loader_share_percent": 100 * data / step})
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
