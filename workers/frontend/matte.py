"""Taking the conveyor away: a re-centred crop, and the composite mask shrunk and applied.

As in the ZeroBox system, the composite mask is shrunk by a fraction per side (resized to
``1 - 2 * fraction`` of its size and padded back, centred) before it multiplies the crop, so that
no rim of belt survives at the product's edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from workers.contract import MaskShape
from workers.weights import verified


@dataclass(frozen=True)
class Matted:
    crop: np.ndarray  # (h, w, 3) BGR, belt set to zero
    mask: np.ndarray  # (h, w) uint8, 255 = kept
    box: tuple[int, int, int, int]  # the crop's place in the frame: x, y, w, h
    coverage: float  # fraction of the crop kept


def recentred_box(
    bbox: tuple[int, int, int, int], frame_shape: tuple[int, int], margin: float = 0.05
) -> tuple[int, int, int, int]:
    """The box grown by ``margin`` per side around its centre, kept inside the frame."""
    x, y, w, h = bbox
    cx, cy = x + w / 2, y + h / 2
    w2, h2 = w * (1 + 2 * margin), h * (1 + 2 * margin)
    fh, fw = frame_shape
    x0, y0 = int(max(0, round(cx - w2 / 2))), int(max(0, round(cy - h2 / 2)))
    x1, y1 = int(min(fw, round(cx + w2 / 2))), int(min(fh, round(cy + h2 / 2)))
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def shrink_mask(mask: np.ndarray, fraction: float) -> np.ndarray:
    if not 0 <= fraction < 0.5:
        raise ValueError(f"shrink fraction must be in [0, 0.5), got {fraction}")
    if fraction == 0:
        return mask.copy()
    h, w = mask.shape
    sh, sw = max(1, round(h * (1 - 2 * fraction))), max(1, round(w * (1 - 2 * fraction)))
    small = cv2.resize(mask, (sw, sh), interpolation=cv2.INTER_NEAREST)
    out = np.zeros_like(mask)
    top, left = (h - sh) // 2, (w - sw) // 2
    out[top : top + sh, left : left + sw] = small
    return out


def matte(
    frame: np.ndarray,
    bbox: tuple[int, int, int, int],
    composite_mask: np.ndarray | None,
    *,
    shrink: float = 0.1,
    margin: float = 0.05,
    max_side: int | None = None,
    shape: MaskShape = "silhouette",
) -> Matted:
    """Crop the product re-centred on ``bbox`` and keep only its (shrunk) mask, of ``shape``.
    ``max_side``: a larger crop is scaled down (area average) to this many pixels on its longer
    side; ``box`` stays in frame pixels."""
    x, y, w, h = recentred_box(bbox, frame.shape[:2], margin)
    crop = frame[y : y + h, x : x + w]
    mask = product_mask(composite_mask, bbox, (x, y, w, h), shape)
    mask = shrink_mask(mask, shrink)
    if max_side is not None and max(h, w) > max_side:
        size = (max(1, round(w * max_side / max(h, w))), max(1, round(h * max_side / max(h, w))))
        crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
        mask = (cv2.resize(mask, size, interpolation=cv2.INTER_AREA) > 127).astype(np.uint8) * 255
    matted = crop * (mask[:, :, None] > 0)
    return Matted(matted.astype(np.uint8), mask, (x, y, w, h), float((mask > 0).mean()))


def product_mask(
    composite_mask: np.ndarray | None,
    bbox: tuple[int, int, int, int],
    crop_box: tuple[int, int, int, int],
    shape: MaskShape,
) -> np.ndarray:
    """The product's mask over the crop at ``crop_box``, 255 = product."""
    x, y, w, h = crop_box
    mask = np.zeros((h, w), np.uint8)
    if shape == "box":
        bx, by, bw, bh = bbox
        mask[max(0, by - y) : by - y + bh, max(0, bx - x) : bx - x + bw] = 255
        return mask
    if composite_mask is None:
        return np.full((h, w), 255, np.uint8)
    silhouette = (composite_mask[y : y + h, x : x + w] > 0).astype(np.uint8) * 255
    contours, _ = cv2.findContours(silhouette, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if shape == "hull" and contours:
        contours = [cv2.convexHull(np.concatenate(contours))]
    # Holes inside the silhouette are product too: every enclosed region is filled.
    cv2.drawContours(mask, contours, -1, 255, thickness=cv2.FILLED)
    return mask


class DeepMatter:
    """A background-matting network (BGMv2-style) from a TorchScript file the user gives.

    Called as ``model(src, bgr)`` with RGB tensors ``(1, 3, H, W)`` in [0, 1]; the first output is
    the alpha matte ``(1, 1, H, W)``. Never downloaded: the file must exist, with the sha256 its
    camera's settings record.
    """

    def __init__(self, path: Path, sha256: str, device: str | None = None):
        import torch

        from workers.devices import choose_device

        # TorchScript loads no Python objects, but its code runs: only the recorded file.
        path = verified(path, sha256, "matting model")
        self.device = choose_device(device)
        try:
            self.model = torch.jit.load(str(path), map_location=self.device).eval()
        except RuntimeError as exc:
            raise ValueError(f"{path}: not a TorchScript model ({exc})") from None

    def alpha(self, frame_bgr: np.ndarray, background_bgr: np.ndarray) -> np.ndarray:
        """Alpha in [0, 1], ``(H, W)``."""
        import torch

        def tensor(img: np.ndarray) -> torch.Tensor:
            rgb = np.ascontiguousarray(img[:, :, ::-1])
            return torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(255).to(self.device)

        with torch.no_grad():
            out = self.model(tensor(frame_bgr), tensor(background_bgr))
        pha = out[0] if isinstance(out, (tuple, list)) else out
        return pha[0, 0].clamp(0, 1).cpu().numpy()
