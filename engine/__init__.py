"""Chrysalis engine: the VPiT LLaMA model, tokenizers, conversion and (later) training.

Importing `engine` loads only the core (torch); optional backends are imported where they are used.
"""

__version__ = "0.1.0"

from engine import known_warnings as _known_warnings

_known_warnings.install()  # exact-text filters for third-party warnings known to be harmless (see the module)
