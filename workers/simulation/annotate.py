"""Annotated videos: every frame with the product's box and its verdict, as QA would watch it."""

from __future__ import annotations

from pathlib import Path

import cv2

from workers.frontend.detect import read_frames
from workers.frontend.motion import MotionGate

COLOURS = {"good": (60, 200, 60), "defect": (40, 40, 230), "unknown": (0, 200, 230)}


def annotate_video(video: Path, out: Path, decisions: dict[int, str], fps: float = 15.0) -> int:
    """Draw each product's box and verdict on every frame it is seen; returns frames written.

    The same motion gate as the ingest tells which product a blob is: before it crosses the
    centre it is the next product, after it the one just counted.
    """
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
