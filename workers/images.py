"""Reading images of any common kind into 8-bit RGB arrays, with one clear error type."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


class ImageError(ValueError):
    """An image that cannot be read: missing, empty, truncated, or not an image."""


def decode_image(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes into an ``(H, W, 3)`` uint8 RGB array.

    Grey, grey+alpha, palette, RGBA and 16-bit images are all accepted; alpha is dropped and
    16-bit values are scaled to 8 bits by their full range.
    """
    if not data:
        raise ImageError(f"{source}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # Decodes everything now, so truncation is caught here.
            return _to_rgb8(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{source}: not a readable image ({exc})") from None


def load_image(path: Path | str) -> np.ndarray:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image") from None
    return decode_image(data, str(path))


def encode_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _to_rgb8(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr)
