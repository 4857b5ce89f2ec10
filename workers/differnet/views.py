"""Turning images into the backbone's input: letterbox, exact D4 transforms, colour jitter.

Images keep their aspect ratio: each is resized so its longer side fits the square input and the
rest is padded, and a validity mask travels with it so that padding never counts as product.
Transforms are the 8 exact symmetries of the square (4 rotations by 90 degrees, each optionally
mirrored): no interpolation, no invented corners, and each is undone exactly on defect maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from workers.differnet.config import D4


@dataclass(frozen=True)
class Letterbox:
    """Where the image sits inside the square input."""

    top: int
    left: int
    height: int
    width: int
    source_shape: tuple[int, int]


# A crop this many times darker or brighter than the exposure target is a camera's fault (a
# lamp out, a shutter stuck), not the light's drift: it is brought only this far.
MAX_EXPOSURE_GAIN = 4.0


def normalised_exposure(rgb: np.ndarray, product: np.ndarray | None, target: float) -> np.ndarray:
    """``rgb`` (uint8) scaled by one gain so that the median luminance of its product pixels
    (``product`` > 0; all where None or empty) is ``target`` (0 to 255)."""
    luma = rgb.astype(np.float32) @ np.float32([0.299, 0.587, 0.114])
    inside = luma[product > 0] if product is not None and product.any() else luma
    gain = target / max(1.0, float(np.median(inside)))
    gain = min(MAX_EXPOSURE_GAIN, max(1 / MAX_EXPOSURE_GAIN, gain))
    return np.clip(rgb.astype(np.float32) * gain + 0.5, 0, 255).astype(np.uint8)


def letterbox(rgb: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor, Letterbox]:
    """``(H, W, 3)`` uint8 -> ``(3, S, S)`` float in [0, 1], ``(1, S, S)`` mask, placement."""
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    x = torch.tensor(rgb).permute(2, 0, 1).float().div_(255.0)
    x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (size - nh) // 2, (size - nw) // 2
    # Pad with mid-grey: after normalisation that is close to zero input.
    canvas = torch.full((3, size, size), 0.5)
    canvas[:, top : top + nh, left : left + nw] = x[0].clamp_(0.0, 1.0)
    mask = torch.zeros(1, size, size)
    mask[:, top : top + nh, left : left + nw] = 1.0
    return canvas, mask, Letterbox(top, left, nh, nw, (h, w))


def apply_d4(x: torch.Tensor, t: int) -> torch.Tensor:
    """Apply transform ``t`` of :data:`D4` to the last two (square) dimensions."""
    turns, mirrored = D4[t]
    if mirrored:
        x = x.flip(-1)
    return torch.rot90(x, turns, dims=(-2, -1))


def undo_d4(x: torch.Tensor, t: int) -> torch.Tensor:
    turns, mirrored = D4[t]
    x = torch.rot90(x, -turns, dims=(-2, -1))
    return x.flip(-1) if mirrored else x


def color_jitter(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation factors drawn from [1 - s, 1 + s] (ZeroBox: s = 0.5)."""
    if strength <= 0:
        return x
    b, c, s = (1.0 + strength * (2 * torch.rand(3, generator=generator) - 1)).tolist()
    x = x * b
    grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    x = grey.mean() + (x - grey.mean()) * c
    grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    x = grey + (x - grey) * s
    return x.clamp_(0.0, 1.0)


def crop_to_source(square_map: torch.Tensor, box: Letterbox) -> np.ndarray:
    """A ``(S, S)`` map in letterbox space -> ``(H, W)`` map over the source image."""
    inner = square_map[box.top : box.top + box.height, box.left : box.left + box.width]
    out = F.interpolate(inner[None, None], size=box.source_shape, mode="bilinear")
    return out[0, 0].numpy()


Box = tuple[int, int, int, int]  # top, left, height, width


def tile_boxes(shape: tuple[int, int], side: int, overlap: float) -> list[Box]:
    """``(top, left, height, width)`` of overlapping ``side``-pixel tiles covering an image of
    ``shape``, spread evenly so that the first and the last touch the borders (a side shorter
    than ``side`` is taken whole): every tile lies inside the image, none is padded but the
    image's own border."""

    def starts(length: int) -> list[int]:
        if length <= side:
            return [0]
        stride = max(1, round(side * (1.0 - overlap)))
        count = -(-(length - side) // stride) + 1
        return [round(i * (length - side) / (count - 1)) for i in range(count)]

    h, w = shape
    th, tw = min(h, side), min(w, side)
    return [(top, left, th, tw) for top in starts(h) for left in starts(w)]


def tile_cores(shape: tuple[int, int], boxes: list[Box]) -> list[Box]:
    """Each of :func:`tile_boxes`' tiles' core, ``(top, left, height, width)`` in the tile's own
    pixels: neighbours split their overlap in the middle, so every pixel of the image lies in
    one core, judged by the tile that sees it farthest from where it was cut. Near a cut, a
    tile's features see the cut as an edge of the product, which good products have elsewhere."""

    def split(starts: list[int], length: int, total: int) -> dict[int, tuple[int, int]]:
        middles = [(a + length + b) // 2 for a, b in zip(starts, starts[1:], strict=False)]
        cuts = [0, *middles, total]
        return {s: (cuts[i] - s, cuts[i + 1] - cuts[i]) for i, s in enumerate(starts)}

    rows = split(sorted({b[0] for b in boxes}), boxes[0][2], shape[0])
    cols = split(sorted({b[1] for b in boxes}), boxes[0][3], shape[1])
    return [(rows[t][0], cols[x][0], rows[t][1], cols[x][1]) for t, x, _, _ in boxes]
