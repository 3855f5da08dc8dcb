"""The visualizer: a diffusers latent diffusion model that renders VPiT visual tokens (needs the `viz` extra).

Names are imported on first use, so `python -m engine.visualizer.<tool> --help` does not load torch.
"""

__all__ = ["ConditionerConfig", "SigLIPConditioner", "Visualizer", "tiny_visualizer_components"]


def __getattr__(name: str):
    if name in __all__:
        from engine.visualizer import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
