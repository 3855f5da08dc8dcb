"""Image bytes -> pixels: the PIL decoder (portable, the reference) and NVIDIA DALI's (CPU or GPU nvJPEG).

Both do the same operations: decode, convert to RGB, resize to the encoder's square input with a bicubic
(antialiased) filter, and return float32 [3, S, S] in [0, 1]. They agree closely, not bit for bit (the
resize kernels differ slightly: see docs/data_format.md for the measured agreement of the embeddings), so
the decoder's name is part of the encoder fingerprint.

Bad images are classified the same way by both: the header is opened with PIL first (unknown format,
truncated header, too many pixels); an image DALI still refuses is decoded alone with PIL so the reason and
message are PIL's. A format DALI has no decoder for but PIL reads (GIF, still or animated: PIL's first frame)
is decoded by PIL instead of being rejected, and counted (`DaliImageDecoder.pil_fallbacks`; the manifest's
`pil_fallback_images`), so the same records are kept with either decoder. Messages never hold object addresses,
so a rejects file is the same from run to run.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: reading records needs no torch
    import torch

# A decoded-size cap against decompression bombs: a 12000 x 12000 PNG of 420 KB decodes to 432 MB of RGB
# (1.5 GB with PIL's intermediates). 64 M pixels admits 8000 x 8000 photos; `--max-image-pixels` changes it.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
# A file-size cap, checked before a byte is read (the pixel cap needs the bytes in memory first): a mislabelled
# video or disk image under --image-root would otherwise be read whole into every worker. 256 MiB is above any
# 64 M-pixel photo in a compressed format; `--max-image-bytes` changes it.
DEFAULT_MAX_IMAGE_BYTES = 256 * 2**20
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{6,}")


class ImageDecodeError(ValueError):
    """An image that cannot be used; `reason` is a short machine-readable code for reject counts."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def clean_message(text: str) -> str:
    """One line, without object addresses (`<_io.BytesIO object at 0x7f...>`): rejects must be reproducible."""
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return _ADDRESS.sub("", line)


def _classify(error: Exception) -> ImageDecodeError:
    from PIL import Image, UnidentifiedImageError

    if isinstance(error, ImageDecodeError):
        return error
    if isinstance(error, UnidentifiedImageError):
        return ImageDecodeError("image_not_decodable", "not a decodable image (unknown format)")
    if isinstance(error, Image.DecompressionBombError):
        return ImageDecodeError("image_too_large", f"image refused: {clean_message(error)}")
    text = clean_message(error)
    lowered = text.lower()
    if "truncat" in lowered or "premature end" in lowered or "broken data stream" in lowered:
        return ImageDecodeError("image_truncated", f"truncated image ({text})")
    return ImageDecodeError("image_not_decodable", f"image cannot be decoded ({text})")


def open_image_header(data: bytes, max_pixels: int | None):
    """PIL image with only its header read; raises ImageDecodeError (empty, unknown, too large)."""
    from PIL import Image

    if len(data) == 0:
        raise ImageDecodeError("image_empty", "image file is empty (0 bytes)")
    if max_pixels is not None:
        # Our cap replaces PIL's own bomb guard (a warning at 89 M pixels, a refusal at 179 M, whatever the cap).
        Image.MAX_IMAGE_PIXELS = None
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as error:  # noqa: BLE001 - every PIL failure is this image's problem
        raise _classify(error) from None
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError("image_too_large", f"image is {width}x{height} = {width * height:,} pixels, more "
                               f"than --max-image-pixels {max_pixels:,}")
    return image


def _high_bit_depth_to_l(image):
    """16-bit grayscale (a 16-bit PNG opens as "I;16" or "I") scaled to 8 bits, as DALI does. PIL's own
    convert("RGB") clips every value above 255, so such an image came out almost white."""
    import numpy as np
    from PIL import Image

    array = np.asarray(image).astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")


def decode_image_pil(data: bytes, image_size: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
                     ) -> torch.Tensor:
    """Decode, convert to RGB and resize one image with PIL; returns float32 [3, S, S] in [0, 1].

    Raises:
        ImageDecodeError: reason `image_empty`, `image_truncated`, `image_not_decodable` or `image_too_large`.
    """
    import torch
    from PIL import Image

    image = open_image_header(data, max_pixels)
    try:
        image.load()  # forces the full decode: a truncated file raises here, not later
        if image.mode == "I" or image.mode.startswith("I;16"):
            image = _high_bit_depth_to_l(image)
        image = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
    except Exception as error:  # noqa: BLE001
        raise _classify(error) from None
    array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    # [S*S*3] -> [S, S, 3] -> [3, S, S]
    return array.view(image_size, image_size, 3).permute(2, 0, 1).float().div_(255.0)


class PilImageDecoder:
    """Per-image PIL decode; the portable backend and the numerical reference."""

    name = "pil"

    def __init__(self, image_size: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.image_size = image_size
        self.max_pixels = max_pixels

    def decode_batch(self, blobs: Sequence[bytes]) -> list[torch.Tensor | ImageDecodeError]:
        """Decode each blob to [3, S, S] float32 in [0, 1], or the error that stopped it."""
        out: list[torch.Tensor | ImageDecodeError] = []
        for data in blobs:
            try:
                out.append(decode_image_pil(data, self.image_size, self.max_pixels))
            except ImageDecodeError as error:
                out.append(error)
        return out


# PIL formats DALI's image decoder does not read (its list: JPEG, JPEG 2000, PNG, BMP, TIFF, PNM, WebP).
_PIL_ONLY_FORMATS = frozenset({"GIF"})


class DaliImageDecoder:
    """NVIDIA DALI decode + resize: `fn.decoders.image` on the CPU, or nvJPEG ("mixed") on a GPU.

    One pipeline is built and fed batch after batch (building one costs far more than decoding a batch). On
    a GPU the pixels stay on the device: DALI's output is copied device-to-device into a CUDA tensor on the
    current torch stream, and the encoder reads it there (no host round trip). A pipeline that met a bad
    image is rebuilt (DALI invalidates it).

    Args:
        image_size: square output side.
        device_id: CUDA device for the mixed decoder, or None for CPU operators.
        max_batch: largest batch fed at once.
    """

    def __init__(self, image_size: int, device_id: int | None = None, max_batch: int = 32,
                 max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, num_threads: int = 2) -> None:
        import nvidia.dali.fn  # noqa: F401  (fail early when DALI is missing)

        self.image_size = image_size
        self.device_id = device_id
        self.max_batch = max_batch
        self.max_pixels = max_pixels
        self.num_threads = num_threads
        self.name = "dali-cpu" if device_id is None else "dali-gpu"
        self._pipeline = None
        self._stream = None  # CUDA stream of the device-to-device copy out of DALI
        self.pil_fallbacks = 0  # images DALI could not decode and PIL did (GIF): decoded by PIL, not rejected

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device_id is not None

        # Synchronous execution: each run() decodes exactly the batch just fed (no prefetching ahead).
        @pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads, device_id=self.device_id,
                      prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            decoded = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
            # HWC uint8; the float conversion happens in torch, as in the PIL path.
            return fn.resize(decoded, resize_x=self.image_size, resize_y=self.image_size,
                             interp_type=types.INTERP_CUBIC, antialias=True)

        pipeline = pipe()
        pipeline.build()
        return pipeline

    def _run(self, blobs: Sequence[bytes]) -> torch.Tensor:
        """[B, 3, S, S] float32 in [0, 1] (on the GPU for the mixed decoder). Raises on any bad image."""
        import numpy as np
        import torch

        if self._pipeline is None:
            self._pipeline = self._build()
        try:
            self._pipeline.feed_input("encoded", [np.frombuffer(blob, dtype=np.uint8) for blob in blobs])
            (output,) = self._pipeline.run()
        except BaseException:
            self._pipeline = None  # DALI: "Current pipeline object is no longer valid"
            raise
        dense = output.as_tensor()  # every image is S x S x 3 after the resize: one dense [B, S, S, 3] tensor
        if self.device_id is None:
            # [B, S, S, 3] -> [B, 3, S, S]
            return torch.from_numpy(np.array(dense)).permute(0, 3, 1, 2).float().div_(255.0)
        from nvidia.dali.plugin.pytorch import feed_ndarray

        # Device to device on a stream of our own: DALI may reuse its output buffer at the next run(), so the
        # copy is complete before returning; waiting on this stream never waits for the encoder's kernels. The
        # float pixels are made on the caller's stream, so their memory belongs to it.
        caller = torch.cuda.current_stream(self.device_id)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device_id)
        with torch.cuda.stream(self._stream):
            pixels = torch.empty(dense.shape(), dtype=torch.uint8, device=f"cuda:{self.device_id}")
            feed_ndarray(dense, pixels, cuda_stream=self._stream)
        self._stream.synchronize()
        pixels.record_stream(caller)
        return pixels.permute(0, 3, 1, 2).float().div_(255.0)  # [B, S, S, 3] -> [B, 3, S, S]

    def decode_batch(self, blobs: Sequence[bytes]) -> list[torch.Tensor | ImageDecodeError]:
        out: list[torch.Tensor | ImageDecodeError | None] = [None] * len(blobs)
        good = []
        for index, data in enumerate(blobs):
            try:
                header = open_image_header(data, self.max_pixels)
            except ImageDecodeError as error:
                out[index] = error
                continue
            if header.format in _PIL_ONLY_FORMATS:  # no DALI decoder: spare the batch a failed run and rebuild
                out[index] = self._decode_with_pil(data)
            else:
                good.append(index)
        for start in range(0, len(good), self.max_batch):
            chunk = good[start:start + self.max_batch]
            try:
                pixels = self._run([blobs[i] for i in chunk])
            except Exception:  # noqa: BLE001 - find the bad image: each alone through DALI
                for i in chunk:
                    out[i] = self._decode_alone(blobs[i])
                continue
            for row, i in enumerate(chunk):
                out[i] = pixels[row]
        return out  # type: ignore[return-value]

    def _decode_alone(self, data: bytes) -> torch.Tensor | ImageDecodeError:
        try:
            return self._run([data])[0]
        except Exception:  # noqa: BLE001
            return self._decode_with_pil(data)

    def _decode_with_pil(self, data: bytes) -> torch.Tensor | ImageDecodeError:
        """PIL names a bad image in the same words as the PIL path; an image DALI has no decoder for (GIF) but
        PIL reads is PIL's pixels, where the encoder reads them, counted in `pil_fallbacks`."""
        try:
            pixels = decode_image_pil(data, self.image_size, self.max_pixels)
        except ImageDecodeError as error:
            return error
        self.pil_fallbacks += 1
        return pixels if self.device_id is None else pixels.to(f"cuda:{self.device_id}")


def dali_available() -> bool:
    """Whether NVIDIA DALI is installed (found without importing it: the import costs ~0.4 s)."""
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):  # no `nvidia` namespace package, or a module blocked in sys.modules
        return False


def resolve_decoder_name(kind: str, device_type: str) -> str:
    """"pil", "dali-cpu" or "dali-gpu" for `--image-decoder kind` and the encoder's device type, without
    building anything ("auto": DALI when it imports, on the encoder's device, else PIL)."""
    if kind not in ("auto", "pil", "dali"):
        raise ValueError(f"unknown image decoder {kind!r}; expected auto, pil or dali")
    if kind == "pil" or (kind == "auto" and not dali_available()):
        return "pil"
    if not dali_available():
        raise RuntimeError("--image-decoder dali: NVIDIA DALI is not installed (pip install nvidia-dali-cuda120, "
                           "or the `dali` extra: pip install -e .[dali])")
    return "dali-gpu" if device_type == "cuda" else "dali-cpu"


def build_image_decoder(name: str, image_size: int, *, device_index: int | None = None, max_batch: int = 32,
                        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> PilImageDecoder | DaliImageDecoder:
    """The decoder `name` ("pil", "dali-cpu", "dali-gpu"; or "auto"/"dali", resolved for the CPU)."""
    if name in ("auto", "dali"):
        name = resolve_decoder_name(name, "cpu")
    if name == "pil":
        return PilImageDecoder(image_size, max_pixels)
    if name == "dali-cpu":
        return DaliImageDecoder(image_size, None, max_batch, max_pixels)
    if name == "dali-gpu":
        return DaliImageDecoder(image_size, device_index or 0, max_batch, max_pixels)
    raise ValueError(f"unknown image decoder {name!r}")
