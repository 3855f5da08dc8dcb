"""VPiT training: typed config and flags, blended data, stage freezing, AdamW + schedule, DCP checkpoints, the
trainer, metrics. The entry point is `pretrain_gpt_vision.py`; see docs/training.md.

    config = parse_training_config(argv)
    info = build_device_mesh()            # the one place the mesh is made (extend it for TP/PP)
    Trainer(config, info).train()
"""

# Names are imported on first use (PEP 562), so `from engine.training.config import ...` (the flag parser) does not
# pull in torch, the model and the data stack: `pretrain_gpt_vision.py --help` answers in well under a second.
_EXPORTS = {
    "TrainingConfig": "config", "parse_training_config": "config",
    "Batch": "data", "BlendedSamples": "data", "SyntheticDataset": "data", "collate_packed": "data",
    "ParallelInfo": "parallel", "build_device_mesh": "parallel",
    "TooManySkippedSteps": "loop", "Trainer": "trainer",
}

__all__ = ["Batch", "BlendedSamples", "ParallelInfo", "SyntheticDataset", "TooManySkippedSteps", "Trainer",
           "TrainingConfig", "build_device_mesh", "collate_packed", "parse_training_config"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"engine.training.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
