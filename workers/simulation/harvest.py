"""Collecting matted product crops from line videos, as a data set in MVTec AD layout.

A line learns from its own cameras: the crops the front end cuts from good products are what
its scorer must call normal. With a simulator manifest, each crop is filed under the truth of
its view (``good`` or the defect's category).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np

from workers.contract import CropSpec
from workers.frontend.detect import (
    ContourDetector,
    Detection,
    Detector,
    iou,
    read_frames,
    triggering_product,
)
from workers.frontend.matte import Matted, matte
from workers.frontend.stages import CameraIngest, DetectMatte, NoProductFound
from workers.images import encode_png
from workers.simulation.simulate import camera_videos

Boxes = Literal["detected", "true"]


def harvest_crops(
    line_dir: Path,
    out: Path,
    split: str,
    crops: CropSpec = CropSpec(),
    frame_stride: int = 1,
    boxes: Boxes = "detected",
    box_jitter: float = 0.0,
    detector: Detector | None = None,
) -> dict[str, int]:
    """Crops of every product in ``line_dir`` (videos, manifest) into ``out/split/<category>``.

    ``boxes="detected"``: the crops are cut by the line's own stages (ingest, detect + matte,
    as ``crops`` says), so that they are what its scorer will see. ``boxes="true"``: cut at the
    simulator's boxes instead (``true_box_crops``), the reference a front end is measured
    against. Either way, RGBA PNGs whose alpha is the product mask, named
    ``<camera>_<product seq>.png``. Returns counts per category.
    ``box_jitter``: each side of a detected box moves by up to this share of the frame's width
    at random (``JitteredDetector``), for crops a model learns from. ``detector``: the line's
    (YOLO where ``crops.box_source`` says so) [contours].
    """
    manifest = json.loads((Path(line_dir) / "manifest.json").read_text())
    counts: dict[str, int] = {}
    cut = _crops(line_dir, manifest, crops, frame_stride, boxes, box_jitter, detector)
    for cam, seq, png in cut:
        category = manifest["products"][seq]["views"][cam]["category"]
        folder = Path(out) / split / category
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{cam}_{seq:05d}.png").write_bytes(png)
        counts[category] = counts.get(category, 0) + 1
    return counts


def _crops(
    line_dir: Path,
    manifest: dict,
    crops: CropSpec,
    frame_stride: int,
    boxes: Boxes,
    box_jitter: float,
    detector: Detector | None,
) -> Iterator[tuple[str, int, bytes]]:
    """(camera, product seq, RGBA PNG) of every view the chosen boxes cut."""
    if boxes == "true":
        for cam, seq, cut in true_box_crops(line_dir, manifest, crops):
            yield cam, seq, encode_png(np.ascontiguousarray(cut.crop[:, :, ::-1]), cut.mask)
        return
    detector = detector or ContourDetector()
    if box_jitter:
        detector = JitteredDetector(detector, box_jitter, seed=manifest["spec"]["seed"])
    cut = DetectMatte(detector, crops)
    for cam, video in camera_videos(line_dir).items():
        seen: set[int] = set()
        for frame in CameraIngest("harvest", cam, str(video), frame_stride=frame_stride).frames():
            try:
                view = cut.process(frame)
            except NoProductFound:
                continue
            # The product is the one the simulator has under the view's box in that frame, not
            # the gate's count: on a hard scene the gate counts gloves and misses touching
            # products, and every later count would name another product's category.
            seq = _product_at(manifest, cam, frame.sequence, view.bbox)
            if seq is None or seq in seen:
                continue  # a glove, a stray box, or a product triggered twice
            seen.add(seq)
            yield cam, seq, view.image


def _product_at(manifest: dict, cam: str, index: int, bbox) -> int | None:
    """The product whose true box in frame ``index`` overlaps ``bbox`` most (IoU >= 0.3)."""
    box = (bbox.x, bbox.y, bbox.w, bbox.h)
    shown = [
        (iou(box, tuple(p["views"][cam]["bboxes"][str(index)])), p["seq"])
        for p in manifest["products"]
        if str(index) in p["views"][cam]["bboxes"]
    ]
    overlap, seq = max(shown, default=(0.0, None))
    return seq if overlap >= 0.3 else None


class JitteredDetector(Detector):
    """Another detector's best box with each side moved by up to ``share`` of the frame's width,
    at random: crops whose borders vary as much as the front end's boxes do between products,
    so that a model does not learn one product's border to the pixel (docs/benchmarks.md, "The
    whole line")."""

    def __init__(self, detector: Detector, share: float, seed: int):
        self.detector = detector
        self.share = share
        self.rng = np.random.default_rng(seed)

    def detect(self, frame: np.ndarray, foreground: np.ndarray | None = None) -> list[Detection]:
        product = triggering_product(self.detector.detect(frame, foreground), foreground)
        if product is None:
            return []
        fh, fw = frame.shape[:2]
        reach = max(1, round(self.share * fw))
        x, y, w, h = product.bbox
        dx0, dy0, dx1, dy1 = self.rng.integers(-reach, reach + 1, size=4)
        x0, y0 = min(max(0, x + dx0), x + w - 2), min(max(0, y + dy0), y + h - 2)
        x1, y1 = max(min(fw, x + w + dx1), x0 + 2), max(min(fh, y + h + dy1), y0 + 2)
        return [replace(product, bbox=(int(x0), int(y0), int(x1 - x0), int(y1 - y0)))]


def true_box_crops(
    line_dir: Path, manifest: dict, crops: CropSpec = CropSpec()
) -> Iterator[tuple[str, int, Matted]]:
    """(camera, product seq, crop) of every view, cut as the front end cuts but at the
    simulator's box: the frame nearest the product's centre crossing, the true box as the
    mask (whatever ``crops.mask_shape``), the front end's margin, shrink and size."""
    width = manifest["spec"]["width"]
    wanted: dict[str, dict[int, int]] = {}  # camera -> frame index -> product seq
    for p in manifest["products"]:
        for cam, view in p["views"].items():
            boxes = {int(f): b for f, b in view["bboxes"].items()}
            best = min(boxes, key=lambda f: abs(boxes[f][0] + boxes[f][2] / 2 - width / 2))
            wanted.setdefault(cam, {})[best] = p["seq"]
    for cam, video in camera_videos(line_dir).items():
        frames = wanted.get(cam, {})
        for index, frame in read_frames(video):
            if index in frames:
                seq = frames[index]
                x, y, w, h = manifest["products"][seq]["views"][cam]["bboxes"][str(index)]
                cut = matte(
                    frame,
                    (x, y, w, h),
                    None,
                    shrink=crops.mask_shrink,
                    margin=crops.box_margin,
                    max_side=crops.view_max_side,
                    shape="box",
                )
                yield cam, seq, cut
