"""The visualizer: a diffusers latent diffusion model that renders VPiT visual tokens (needs the `viz` extra)."""

from engine.visualizer.model import TokenConditionProjector, Visualizer, tiny_visualizer_components

__all__ = ["TokenConditionProjector", "Visualizer", "tiny_visualizer_components"]
