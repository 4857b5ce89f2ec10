"""Finding the product in a frame: Ultralytics YOLO from the user's weights, or contours.

Both return :class:`Detection` boxes, best first. ``bootstrap_yolo`` gives a line a YOLO without
hand labelling: the contour detector labels the products of a few videos, and a YOLOv8n built from
``yolov8n.yaml`` (no pretrained weights, nothing downloaded) trains on those labels.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from workers.frontend.motion import MotionGate
from workers.weights import WeightsError, sha256_of, verified


@dataclass(frozen=True)
class Detection:
    bbox: tuple[int, int, int, int]  # x, y, w, h
    confidence: float
    label: str = "product"


class Detector(Protocol):
    def detect(self, frame: np.ndarray, foreground: np.ndarray | None = None) -> list[Detection]:
        """Products in a BGR frame, best first; ``foreground`` is the gate's mask if known."""
        ...


class ContourDetector:
    """The largest foreground region, for lines without YOLO weights.

    Uses the motion gate's foreground mask when given, otherwise the difference from a
    background plate.
    """

    def __init__(
        self,
        background: np.ndarray | None = None,
        *,
        diff_threshold: int = 30,
        min_area_fraction: float = 0.01,
    ):
        self.background = background
        self.diff_threshold = diff_threshold
        self.min_area_fraction = min_area_fraction

    def detect(self, frame: np.ndarray, foreground: np.ndarray | None = None) -> list[Detection]:
        if foreground is None:
            if self.background is None or self.background.shape != frame.shape:
                raise ValueError(
                    "the contour detector needs a foreground mask or a background plate"
                )
            diff = cv2.absdiff(frame, self.background).max(axis=2)
            foreground = (diff > self.diff_threshold).astype(np.uint8) * 255
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
            foreground = cv2.morphologyEx(foreground, cv2.MORPH_CLOSE, kernel)
        contours, _ = cv2.findContours(
            (foreground > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        min_area = self.min_area_fraction * foreground.size
        found = []
        for c in contours:
            area = cv2.contourArea(c)
            if area >= min_area:
                x, y, w, h = cv2.boundingRect(c)
                found.append((area, Detection((x, y, w, h), min(1.0, area / (w * h)))))
        return [d for _, d in sorted(found, key=lambda t: -t[0])]


class YoloDetector:
    """Ultralytics YOLO from a local weights file (.pt or an exported format)."""

    def __init__(
        self,
        weights: Path,
        sha256: str,
        *,
        classes: list[int] | None = None,
        confidence: float = 0.25,
        image_size: int = 640,
        device: str | None = None,
    ):
        from ultralytics import YOLO
        from ultralytics.nn.tasks import torch_safe_load

        from workers.devices import choose_device

        weights = verified(weights, sha256, "YOLO weights")
        # Ultralytics unpickles checkpoints in full; the file is first read with torch's
        # weights_only loader against Ultralytics' allow-list of its own model classes, which
        # refuses a checkpoint that would run anything else.
        try:
            torch_safe_load(str(weights), safe_only=True)
        except Exception as exc:  # torch's UnpicklingError, or anything a broken file raises
            raise WeightsError(f"{weights}: not loadable as plain YOLO weights ({exc})") from None
        self.model = YOLO(str(weights))
        self.classes = classes
        self.confidence = confidence
        self.image_size = image_size
        self.device = str(choose_device(device))

    def detect(self, frame: np.ndarray, foreground: np.ndarray | None = None) -> list[Detection]:
        result = self.model.predict(
            frame,
            conf=self.confidence,
            classes=self.classes,
            imgsz=self.image_size,
            device=self.device,
            verbose=False,
        )[0]
        out = []
        for (x0, y0, x1, y1), conf, cls in zip(
            result.boxes.xyxy.tolist(),
            result.boxes.conf.tolist(),
            result.boxes.cls.tolist(),
            strict=True,
        ):
            box = (int(x0), int(y0), max(1, int(x1 - x0)), max(1, int(y1 - y0)))
            out.append(Detection(box, float(conf), result.names.get(int(cls), str(int(cls)))))
        return sorted(out, key=lambda d: -d.confidence)


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    ix = max(0, min(ax0 + aw, bx0 + bw) - max(ax0, bx0))
    iy = max(0, min(ay0 + ah, by0 + bh) - max(ay0, by0))
    inter = ix * iy
    union = aw * ah + bw * bh - inter
    return inter / union if union else 0.0


def read_frames(video: Path) -> Iterable[tuple[int, np.ndarray]]:
    """Frames of a video file; a missing, unreadable or empty file is a clear error."""
    if not Path(video).is_file():
        raise FileNotFoundError(f"{video}: no such video file")
    capture = cv2.VideoCapture(str(video))
    if not capture.isOpened():
        raise ValueError(f"{video}: OpenCV cannot open this video")
    index = 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            yield index, frame
            index += 1
    finally:
        capture.release()
    if index == 0:
        raise ValueError(f"{video}: no frames (empty or unreadable video)")


def bootstrap_yolo(
    videos: list[Path],
    out: Path,
    *,
    epochs: int = 1,
    image_size: int = 320,
    work_dir: Path | None = None,
    seed: int = 0,
) -> dict:
    """Auto-label the products of ``videos`` with the gate + contour detector and train YOLOv8n.

    Returns counts and where the weights went. Every trigger frame becomes a labelled image; a
    few empty-belt frames become negatives.
    """
    from ultralytics import YOLO

    work = Path(work_dir or Path(out).with_suffix(".bootstrap"))
    if work.exists():
        shutil.rmtree(work)
    images, labels = work / "images" / "train", work / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    detector = ContourDetector()
    n_pos = n_neg = 0
    for v, video in enumerate(videos):
        gate = MotionGate()
        for index, frame in read_frames(video):
            trigger = gate.update(index, frame)
            name = f"v{v}_f{index:06d}"
            if trigger is not None:
                dets = detector.detect(frame, trigger.composite_mask)
                if not dets:
                    continue
                h, w = frame.shape[:2]
                x, y, bw, bh = dets[0].bbox
                cv2.imwrite(str(images / f"{name}.jpg"), frame)
                (labels / f"{name}.txt").write_text(
                    f"0 {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}\n"
                )
                n_pos += 1
            elif (
                index % 25 == 10 and gate.objects_in_view == 0
            ):  # an empty belt: a negative example
                cv2.imwrite(str(images / f"{name}.jpg"), frame)
                (labels / f"{name}.txt").write_text("")
                n_neg += 1
    if n_pos == 0:
        raise ValueError("no product was found in the videos: nothing to train on")
    (work / "data.yaml").write_text(
        f"path: {work.resolve()}\ntrain: images/train\nval: images/train\nnames:\n  0: product\n"
    )
    model = YOLO("yolov8n.yaml")
    model.train(
        data=str(work / "data.yaml"),
        epochs=epochs,
        imgsz=image_size,
        batch=8,
        device="cpu",
        amp=False,
        plots=False,
        workers=0,
        seed=seed,
        project=str(work / "runs"),
        name="train",
        exist_ok=True,
        verbose=False,
        val=False,
    )
    trained = work / "runs" / "train" / "weights" / "last.pt"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(trained, out)
    return {
        "weights": str(out),
        "sha256": sha256_of(Path(out)),  # what the line file records as yolo_weights_sha256
        "labelled_products": n_pos,
        "negatives": n_neg,
        "epochs": epochs,
    }
