"""VPiT pretraining entry point (stage 1 and stage 2). See docs/training.md.

    torchrun --nproc-per-node N pretrain_gpt_vision.py --data-path 0.7 DIR1 0.3 DIR2 --model-preset tiny \
        --micro-batch-size 4 --global-batch-size 32 --train-iters 1000 --lr 3e-4 --stage 2 --save CKPT ...

Exit status: 0 when training finished, stopped at `--exit-interval`, or was stopped by SIGTERM after saving;
1 on a configuration error or after too many non-finite steps; 2 on a flag argparse cannot read.
"""

from __future__ import annotations

import os
import sys
import time

# Only the flag parser before parsing: `--help` and flag errors answer without importing torch or the model.
from engine.training.config import parse_training_config


def _say(message: str) -> None:
    """A start-up progress line from the first process only (torchrun starts one per rank)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


def _recipe(argv: list[str]) -> tuple[str, list[str]]:
    """`--recipe vpit|metaquery` (default vpit) and the remaining flags."""
    for i, arg in enumerate(argv):
        if arg == "--recipe" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if arg.startswith("--recipe="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return "vpit", argv


def main(argv: list[str] | None = None) -> int:
    recipe, argv = _recipe(list(sys.argv[1:] if argv is None else argv))
    if recipe == "metaquery":  # MetaQuery: frozen LLM + learnable queries + diffusion decoder (docs/metaquery.md)
        if "-h" in argv or "--help" in argv:
            from engine.metaquery.config import metaquery_help

            print(metaquery_help())
            print("All other flags are the VPiT trainer's (below).\n")
        else:
            from engine.metaquery.trainer import main as metaquery_main

            return metaquery_main(argv)
    elif recipe != "vpit":
        print(f"error: --recipe {recipe!r}: choose vpit (default) or metaquery", file=sys.stderr)
        return 2
    try:
        config = parse_training_config(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _say(f"starting: {world} process(es); importing torch and the model code ...")
    from engine.training import TooManySkippedSteps, Trainer
    from engine.training.loop import run_training

    def build_trainer(info):
        _say(f"building the model and opening the data (TP {config.tensor_model_parallel_size} x PP "
             f"{config.pipeline_model_parallel_size}; {time.perf_counter() - start:.1f} s so far) ...")
        trainer = Trainer(config, info)
        _say(f"ready after {time.perf_counter() - start:.1f} s; training ...")
        return trainer

    return run_training(config, build_trainer, errors=(ValueError, TooManySkippedSteps))


if __name__ == "__main__":
    sys.exit(main())
