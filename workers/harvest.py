"""Collecting matted product crops from line videos, as a data set in MVTec AD layout.

A line learns from its own cameras: the crops the front end cuts from good products are what
its scorer must call normal. With a simulator manifest, each crop is filed under the truth of
its view (``good`` or the defect's category).
"""

from __future__ import annotations

import json
from pathlib import Path

from .simulate import camera_videos
from .stages import CameraIngest, DetectMatte, NoProductFound


def harvest_crops(
    line_dir: Path, out: Path, split: str, shrink: float = 0.1, frame_stride: int = 1
) -> dict[str, int]:
    """Crops of every product in ``line_dir`` (videos, manifest) into ``out/split/<category>``.

    The crops are cut by the line's own stages (ingest, detect + matte), so that they are what
    its scorer will see: RGBA PNGs whose alpha is the product mask, shrunk by ``shrink`` per
    side. Returns counts per category.
    """
    manifest = json.loads((Path(line_dir) / "manifest.json").read_text())
    cut = DetectMatte(shrink=shrink)
    counts: dict[str, int] = {}
    for cam, video in camera_videos(line_dir).items():
        for frame in CameraIngest("harvest", cam, str(video), frame_stride=frame_stride).frames():
            if frame.product_seq >= len(manifest["products"]):
                continue  # a double trigger: the simulator knows no such product
            try:
                view = cut.process(frame)
            except NoProductFound:
                continue
            category = manifest["products"][frame.product_seq]["views"][cam]["category"]
            folder = Path(out) / split / category
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{cam}_{frame.product_seq:05d}.png").write_bytes(view.image)
            counts[category] = counts.get(category, 0) + 1
    return counts
