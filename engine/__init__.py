"""Chrysalis engine: the VPiT LLaMA model, tokenizers, conversion and (later) training.

Importing `engine` loads only the core (torch); optional backends are imported where they are used.
"""

__version__ = "0.1.0"
