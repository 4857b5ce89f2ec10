"""Reading images of any common kind into 8-bit RGB arrays, with one clear error type."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
# Pixels an image may have, checked from its header before anything is decoded: a few kB of
# PNG can claim gigabytes of pixels. Pillow itself refuses more than twice its MAX_IMAGE_PIXELS.
DEFAULT_MAX_PIXELS = 50_000_000
MAX_PIXELS_LIMIT = 2 * Image.MAX_IMAGE_PIXELS


class ImageError(ValueError):
    """An image that cannot be read: missing, empty, truncated, or not an image."""


def decode_image(
    data: bytes, source: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode encoded image bytes into an ``(H, W, 3)`` uint8 RGB array.

    Grey, grey+alpha, palette, RGBA and 16-bit images are all accepted; alpha is dropped and
    16-bit values are scaled to 8 bits by their full range.
    """
    return decode_with_alpha(data, source, max_pixels)[0]


def decode_with_alpha(
    data: bytes, source: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, np.ndarray | None]:
    """Like :func:`decode_image`, also returning the alpha channel (``(H, W)`` uint8) if any.

    Matted crops travel as RGBA PNGs whose alpha is the product mask.
    """
    with _opened(data, source, max_pixels) as img:
        alpha = np.asarray(img.getchannel("A")) if img.mode in ("RGBA", "LA") else None
        return _to_rgb8(img), alpha


def decode_grey(data: bytes, source: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS):
    """An 8-bit single-channel image (a mask) as an ``(H, W)`` uint8 array."""
    with _opened(data, source, max_pixels) as img:
        return np.asarray(img.convert("L"), dtype=np.uint8)


@contextmanager
def _opened(data: bytes, source: str, max_pixels: int) -> Iterator[Image.Image]:
    """The image of ``data``, decoded once its header has shown it within ``max_pixels``."""
    if not data:
        raise ImageError(f"{source}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{source}: {width}x{height} pixels, more than the {max_pixels:,} allowed "
                    "(max_image_pixels)"
                )
            img.load()  # Decodes everything now, so truncation is caught here.
            yield img
    except ImageError:
        raise
    # ImportError: once Ultralytics is imported it patches Image.open to retry unknown formats
    # with an optional HEIF plugin, which raises ImportError where that plugin is absent.
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        SyntaxError,
        ValueError,
        ImportError,
    ) as exc:
        raise ImageError(f"{source}: not a readable image ({exc})") from None


def load_image(path: Path | str) -> np.ndarray:
    return load_with_alpha(path)[0]


def load_with_alpha(path: Path | str) -> tuple[np.ndarray, np.ndarray | None]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image") from None
    return decode_with_alpha(data, str(path))


def encode_png(rgb: np.ndarray, alpha: np.ndarray | None = None) -> bytes:
    """PNG of an RGB (or grey) array, with ``alpha`` as its alpha channel when given."""
    buf = io.BytesIO()
    image = Image.fromarray(rgb if alpha is None else np.dstack([rgb, alpha]))
    image.save(buf, format="PNG", compress_level=1)  # speed over size: these cross a LAN
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
