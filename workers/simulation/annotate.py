"""Annotated videos: every frame with the product's box, its verdict and its defect regions, as
QA would watch it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from schemas import Region
from workers.frontend.detect import read_frames
from workers.frontend.motion import MotionGate

COLOURS = {"good": (60, 200, 60), "defect": (40, 40, 230), "unknown": (0, 200, 230)}
REGION_COLOUR = (255, 0, 255)

# A region's outline: (x, y) corners in frame pixels (a box is its four corners).
Outline = list[tuple[int, int]]


def frame_outline(region: Region) -> Outline:
    """A region's outline in its frame: the polygon where it has one, else its box's corners."""
    if region.frame_outline is not None:
        return region.frame_outline
    b = region.frame_box
    return [(b.x, b.y), (b.x + b.w, b.y), (b.x + b.w, b.y + b.h), (b.x, b.y + b.h)]


def annotate_video(
    video: Path,
    out: Path,
    decisions: dict[int, str],
    fps: float = 15.0,
    regions: dict[int, list[Outline]] | None = None,
) -> int:
    """Draw each product's box and verdict on every frame it is seen, and the defect regions
    this camera's view of it had (``regions``: outlines by product number, in the pixels of the
    frame it was captured in); returns frames written.

    The same motion gate as the ingest tells which product a blob is: before it crosses the
    centre it is the next product, after it the one just counted. A product is captured as its
    centre crosses the frame's, so its regions move with it from there.
    """
    regions = regions or {}
    gate = MotionGate()
    writer = None
    n = 0
    for index, frame in read_frames(video):
        if writer is None:
            h, w = frame.shape[:2]
            writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        gate.update(index, frame)
        centre = frame.shape[1] / 2
        for blob in gate.blobs:
            seq = gate.products - 1 if blob.centroid[0] >= centre else gate.products
            decision = decisions.get(seq)
            if decision is None:
                continue
            x, y, bw, bh = blob.bbox
            colour = COLOURS.get(decision, (200, 200, 200))
            cv2.rectangle(frame, (x, y), (x + bw, y + bh), colour, 2)
            shift = round(blob.centroid[0] - centre)
            for outline in regions.get(seq, []):
                corners = np.array(outline, np.int32) + np.array([shift, 0], np.int32)
                cv2.polylines(frame, [corners], True, REGION_COLOUR, 1)
            cv2.putText(
                frame,
                f"#{seq} {decision.upper()}",
                (x, max(12, y - 5)),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.5,
                colour,
                1,
                cv2.LINE_AA,
            )
        writer.write(frame)
        n += 1
    if writer is not None:
        writer.release()
    return n
