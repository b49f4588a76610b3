"""Loading images from disk with errors that name the offending file.

:func:`load_rgb_image` is the one place where files become RGB images: 16-bit and float images
are scaled to 8 bits (a plain ``convert("RGB")`` clips them to near-white), CMYK, palette and
alpha images are converted, and a file Pillow refuses as a decompression bomb is reported with
its name.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import CorruptImageError, MissingInputError


def _to_8bit(img: Image.Image) -> Image.Image:
    # Pillow's convert() of "I;16"/"I"/"F" to "L"/"RGB" clips each value at 255 instead of
    # rescaling, which turns a 16-bit photograph white.
    if img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64) / 257.0  # 65535 -> 255
    elif img.mode == "I":  # 32-bit ints: older Pillows read 16-bit PNGs so; 0..255 data stays
        a = np.asarray(img, dtype=np.float64)
        a = a / 257.0 if a.size and a.max() > 255 else a
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a  # [0, 1] floats, else 0..255
    else:
        return img
    return Image.fromarray(np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8), mode="L")


def load_rgb_image(path: str) -> Image.Image:
    """Open ``path`` and return a fully decoded 8-bit RGB PIL image.

    Raises ``FileNotFoundError`` (with the path) if the file is missing and
    :class:`CorruptImageError` (a ``ValueError``) naming the file if it cannot be decoded,
    including images above Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``).
    """
    if not os.path.isfile(path):
        raise MissingInputError(f"image file not found: {path!r}")
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            # convert() forces the full decode while the file is open, so a truncated file
            # fails here with its name rather than later inside a transform.
            img.load()
            return _to_8bit(img).convert("RGB")
    except Image.DecompressionBombError as exc:
        raise CorruptImageError(
            path,
            f"too large to decode safely ({exc}); shrink it, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if the file is trusted",
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CorruptImageError(path, f"{type(exc).__name__}: {exc}") from None
