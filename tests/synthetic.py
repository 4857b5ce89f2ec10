"""Small synthetic inspection data in MVTec AD layout: textured tiles, some scratched or spotted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def textured_tile(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    cells = rng.normal(150, 10, (h // 6 + 1, w // 6 + 1))
    img = np.kron(cells, np.ones((6, 6)))[:h, :w] + rng.normal(0, 3, (h, w))
    return np.repeat(img.clip(0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def add_defect(
    rng: np.random.Generator, img: np.ndarray, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    out, mask = img.copy(), np.zeros((h, w), np.uint8)
    if kind == "scratch":
        y, x0 = rng.integers(h // 4, 3 * h // 4), rng.integers(2, w // 3)
        mask[y : y + 3, x0 : x0 + w // 2] = 255
        out[mask > 0] = 25
    else:  # spot
        cy, cx = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
        yy, xx = np.ogrid[:h, :w]
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= (min(h, w) // 8) ** 2] = 255
        out[mask > 0] = 240
    return out, mask


def make_dataset(
    root: Path,
    *,
    n_train: int = 24,
    n_good: int = 6,
    n_defect: int = 3,
    seed: int = 0,
    shape: tuple[int, int] = (72, 96),
) -> Path:
    """Write train/good, test/good, test/{scratch,spot} and ground_truth masks under ``root``."""
    rng = np.random.default_rng(seed)
    h, w = shape
    for i in range(n_train):
        _save(root / "train" / "good" / f"{i:03d}.png", textured_tile(rng, h, w))
    for i in range(n_good):
        _save(root / "test" / "good" / f"{i:03d}.png", textured_tile(rng, h, w))
    for kind in ("scratch", "spot"):
        for i in range(n_defect):
            img, mask = add_defect(rng, textured_tile(rng, h, w), kind)
            _save(root / "test" / kind / f"{i:03d}.png", img)
            _save(root / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    return root


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
