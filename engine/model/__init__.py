"""The VPiT LLaMA model."""

from engine.model.vpit import IGNORE_INDEX, ContinuousTokenHead, VisualProjector, VPiTLoss, VPiTModel, build_model

__all__ = ["IGNORE_INDEX", "ContinuousTokenHead", "VisualProjector", "VPiTLoss", "VPiTModel", "build_model"]
