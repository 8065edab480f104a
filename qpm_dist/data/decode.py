"""Image bytes -> uint8 RGB CHW tensor, the one decoding path of the folder and WebDataset backends and of
the converters.

Why torchvision first: `torchvision.io.decode_jpeg` (libjpeg-turbo) is the fastest CPU decoder measured on
our machines (docs/BENCHMARKS.md, "Data loaders"). PIL is the fallback for files it rejects (a PNG named
.JPEG, unusual colour spaces) and the `decoder: pil` option. A file neither can read raises
`CorruptImageError` naming the file, so callers can stop or skip it by `data.on_corrupt`; a missing file
raises FileNotFoundError with its path.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from qpm_dist.data.integrity import CorruptImageError  # noqa: F401 - defined there (torch-free), raised here

JPEG_MAGIC = b"\xff\xd8\xff"

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec and warns on every import site. We use
# them on purpose (pinned torchvision, fastest decoder measured here); revisit when upgrading torchvision.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def read_bytes(path: str | Path) -> np.ndarray:
    """The file's bytes as a uint8 array (FileNotFoundError names a missing file)."""
    return np.fromfile(path, dtype=np.uint8)


def _pil_decode(data: np.ndarray) -> torch.Tensor:
    with Image.open(io.BytesIO(data.tobytes())) as image:
        array = np.array(image.convert("RGB"))  # writable: torch tensors must not alias read-only memory
    return torch.from_numpy(array).permute(2, 0, 1)


def decode(data: np.ndarray | bytes, source: str, decoder: str = "torchvision") -> torch.Tensor:
    """Decode encoded image bytes to a uint8 RGB tensor (3, H, W); `source` names the file in errors."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = np.frombuffer(data, dtype=np.uint8)
    first_error: Exception | None = None
    if decoder == "torchvision":
        tensor = torch.from_numpy(data) if data.flags.writeable else torch.from_numpy(data.copy())
        try:
            if data[:3].tobytes() == JPEG_MAGIC:
                return decode_jpeg(tensor, mode=ImageReadMode.RGB)
            return decode_image(tensor, mode=ImageReadMode.RGB)
        except RuntimeError as exc:
            first_error = exc
    elif decoder != "pil":
        raise ValueError(f"unknown image decoder {decoder!r} (expected 'torchvision' or 'pil')")
    try:
        return _pil_decode(data)
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, ... for bad data
        # torchvision prefixes "decode_jpeg, <source file>.cpp:<line>, "; keep the reason only
        reason = re.sub(r"^.*\.cpp:\d+,\s*", "", str(first_error or exc).strip().splitlines()[-1])
        raise CorruptImageError(f"cannot decode image {source}: {reason}") from exc


def read_image(path: str | Path, decoder: str = "torchvision") -> torch.Tensor:
    """Read and decode an image file to a uint8 RGB tensor (3, H, W)."""
    return decode(read_bytes(path), str(path), decoder)


def crop_box(image: torch.Tensor, box) -> torch.Tensor:
    """The part of `image` (3, H, W) inside box (x, y, w, h), clipped to the image, at least 1x1 pixel."""
    x, y, w, h = (int(round(float(v))) for v in box)
    _, height, width = image.shape
    x0, y0 = min(max(0, x), width - 1), min(max(0, y), height - 1)
    return image[:, y0 : max(y0 + 1, min(height, y + max(h, 1))), x0 : max(x0 + 1, min(width, x + max(w, 1)))]
