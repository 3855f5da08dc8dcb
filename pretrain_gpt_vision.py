"""VPiT pretraining entry point (stage 1 and stage 2). See docs/training.md.

    torchrun --nproc-per-node N pretrain_gpt_vision.py --data-path 0.7 DIR1 0.3 DIR2 --model-preset tiny \
        --micro-batch-size 4 --global-batch-size 32 --train-iters 1000 --lr 3e-4 --stage 2 --save CKPT ...

Exit status: 0 when training finished, stopped at `--exit-interval`, or was stopped by SIGTERM after saving;
1 on a configuration error or after too many non-finite steps.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist

from engine.training import TooManySkippedSteps, Trainer, build_device_mesh, parse_training_config


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_training_config(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        info = build_device_mesh(parallel=config.parallel_config())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    code = 0
    try:
        trainer = Trainer(config, info)
        trainer.train()
    except (ValueError, TooManySkippedSteps) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 1
    if dist.is_initialized():
        # Tearing down the DDP reducer / gloo process group at exit occasionally hangs (torch 2.13 CPU, seen once
        # in ~20 runs); the checkpoint and logs are on disk, so leave without running destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
