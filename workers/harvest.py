"""Collecting matted product crops from line videos, as a data set in MVTec AD layout.

A line learns from its own cameras: the crops the front end cuts from good products are what
its scorer must call normal. With a simulator manifest, each crop is filed under the truth of
its view (``good`` or the defect's category).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from .detect import ContourDetector, read_frames
from .matte import matte
from .motion import MotionGate
from .simulate import camera_videos


def harvest_crops(line_dir: Path, out: Path, split: str, shrink: float = 0.1) -> dict[str, int]:
    """Crops of every product in ``line_dir`` (videos, manifest) into ``out/split/<category>``.

    Crops are RGBA PNGs whose alpha is the product mask, shrunk by ``shrink`` per side as the
    line's matting does. Returns counts per category.
    """
    manifest = json.loads((Path(line_dir) / "manifest.json").read_text())
    detector = ContourDetector()
    counts: dict[str, int] = {}
    for cam, video in camera_videos(line_dir).items():
        gate = MotionGate()
        for index, frame in read_frames(video):
            trigger = gate.update(index, frame)
            if trigger is None:
                continue
            found = detector.detect(frame, trigger.composite_mask)
            if not found or trigger.product_seq >= len(manifest["products"]):
                continue
            category = manifest["products"][trigger.product_seq]["views"][cam]["category"]
            result = matte(frame, found[0].bbox, trigger.composite_mask, shrink=shrink)
            folder = Path(out) / split / category
            folder.mkdir(parents=True, exist_ok=True)
            rgba = np.dstack([result.crop, result.mask])
            cv2.imwrite(str(folder / f"{cam}_{trigger.product_seq:05d}.png"), rgba)
            counts[category] = counts.get(category, 0) + 1
    return counts
