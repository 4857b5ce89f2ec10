"""A simulated line's truth as a labelled detector training set (YOLO format).

What a plant gets from correcting labels in CVAT, the simulator knows exactly: every product's
box in every frame. Things that are not products (gloves, tools) are left unlabelled, so a
detector learns them as background.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2

from workers.frontend.detect import read_frames, yolo_line
from workers.simulation.simulate import camera_videos


def truth_labels(line_dir: Path, out: Path, *, every: int = 2) -> dict:
    """Every ``every``-th frame of each camera of the line in ``line_dir``, as
    ``out/images/*.jpg`` and ``out/labels/*.txt`` (class 0: product). Returns counts."""
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    manifest = json.loads((Path(line_dir) / "manifest.json").read_text())
    images, labels = Path(out) / "images", Path(out) / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    (Path(out) / "data.yaml").write_text("names:\n  0: product\n")
    counts = {"frames": 0, "boxes": 0, "with_distractor": 0}
    for cam, video in camera_videos(line_dir).items():
        boxes = [p["views"][cam]["bboxes"] for p in manifest["products"]]
        others = [d["views"][cam]["bboxes"] for d in manifest.get("distractors", [])]
        for index, frame in read_frames(video):
            if index % every:
                continue
            key = str(index)
            shown = [tuple(b[key]) for b in boxes if key in b]
            name = f"{cam}_f{index:06d}"
            cv2.imwrite(str(images / f"{name}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
            (labels / f"{name}.txt").write_text(
                "".join(yolo_line(b, frame.shape[:2]) for b in shown)
            )
            counts["frames"] += 1
            counts["boxes"] += len(shown)
            counts["with_distractor"] += any(key in b for b in others)
    return counts
