"""Third-party warnings we know to be harmless here, filtered by their exact text, nothing broader.

Installed once by `import engine` (cheap: no third-party import). Each entry says why it is harmless; every other
warning, from these libraries too, still shows. `CHRYSALIS_SHOW_ALL_WARNINGS=1` installs nothing.

- megatron-core: "Transformer Engine and Apex are not installed. Falling back to ..." (one per module, in every
  process): we use megatron-core for its data format only, never its fused optimizers or kernels.
- torch.distributed.checkpoint: "torch.distributed is disabled, unavailable or uninitialized, assuming the intent
  is to load/save in a single process": single-process loads (generation, export, resharding to one process) are
  meant to be single-process.
- torchao, imported by diffusers' quantizer registry when installed: "Failed to load .../torchao/_C*.so" (CUDA
  kernels of other builds; never used on these code paths), and torch's "<enum ...> is an Enum subclass and is now
  natively supported by torch.compile" deprecation notice for torchao's enums; diffusers' "Unable to import
  `torchao` Tensor objects" (only matters for torchao-quantised diffusers checkpoints, which we do not load).
- transformers: "`CLIPImageProcessor` requires torchvision (not installed); falling back to
  `CLIPImageProcessorPil`" (and Siglip's), printed when diffusers' pipeline module is imported: the visualizer
  passes no feature extractor and our images are decoded by our own code, so no image processor ever runs.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

_WARNING_MESSAGES = (
    r"Transformer Engine and Apex are not installed",
    (r"torch\.distributed is (disabled, )?unavailable or uninitialized, assuming the intent is to (load|save) in a "
     r"single process"),
)

# logger name -> regular expressions of harmless messages it emits.
_LOG_MESSAGES = {
    "torchao": (r"Failed to load \S*torchao\S*\.so",),
    "torch.utils._pytree": (r"<enum '\w+'> is an Enum subclass and is now natively supported by torch\.compile",),
    "diffusers.quantizers.torchao.torchao_quantizer": (r"Unable to import `torchao` Tensor objects",),
    "transformers.utils.import_utils": (
        r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`",),
}

_installed = False


class _DropMatching(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
            return True
        return not any(p.match(message) for p in self.patterns)


def install() -> None:
    """Adds the filters (idempotent)."""
    global _installed
    if _installed or os.environ.get("CHRYSALIS_SHOW_ALL_WARNINGS") == "1":
        return
    _installed = True
    for pattern in _WARNING_MESSAGES:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
    for name, patterns in _LOG_MESSAGES.items():
        logging.getLogger(name).addFilter(_DropMatching(patterns))
