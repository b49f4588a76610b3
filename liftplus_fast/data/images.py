"""Loading images from disk with errors that name the offending file."""
from __future__ import annotations

import os

from PIL import Image, UnidentifiedImageError

from ..errors import MissingInputError


class CorruptImageError(ValueError):
    """An image file exists but cannot be decoded. ``path`` holds the file."""

    def __init__(self, path: str, reason: str):
        self.path = path
        super().__init__(f"cannot decode image {path!r}: {reason}")


def load_rgb_image(path: str) -> Image.Image:
    """Open ``path`` and return a fully decoded RGB PIL image.

    Raises ``FileNotFoundError`` (with the path) if the file is missing and
    :class:`CorruptImageError` (a ``ValueError``) if it cannot be decoded.
    """
    if not os.path.isfile(path):
        raise MissingInputError(f"image file not found: {path!r}")
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            # convert() forces the full decode while the file is open, so a truncated file
            # fails here with its name rather than later inside a transform.
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CorruptImageError(path, f"{type(exc).__name__}: {exc}") from exc
