"""VPiT training: typed config and flags, blended data, stage freezing, AdamW + schedule, DCP checkpoints, the
trainer, metrics. The entry point is `pretrain_gpt_vision.py`; see docs/training.md.

    config = parse_training_config(argv)
    info = build_device_mesh()            # the one place the mesh is made (extend it for TP/PP)
    Trainer(config, info).train()
"""

from engine.training.config import TrainingConfig, parse_training_config
from engine.training.data import Batch, BlendedSamples, SyntheticDataset, collate_packed
from engine.training.parallel import ParallelInfo, build_device_mesh
from engine.training.trainer import TooManySkippedSteps, Trainer

__all__ = ["Batch", "BlendedSamples", "ParallelInfo", "SyntheticDataset", "TooManySkippedSteps", "Trainer",
           "TrainingConfig", "build_device_mesh", "collate_packed", "parse_training_config"]
