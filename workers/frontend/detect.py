"""Finding the product in a frame: Ultralytics YOLO from the user's weights, or contours.

Both return :class:`Detection` boxes, best first; :func:`triggering_product` picks the one the
motion gate fired on. ``bootstrap_yolo`` gives a line a YOLO as a plant can: the contour detector
labels the products where the scene is easy, the plant's corrected labels (YOLO format, as CVAT
exports them) cover the rest, and a YOLOv8n built from ``yolov8n.yaml`` (no pretrained weights,
nothing downloaded) trains on both.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable
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

    def detect_batch(
        self, frames: list[np.ndarray], foregrounds: list[np.ndarray | None]
    ) -> list[list[Detection]]:
        """:meth:`detect` for several frames at once (a network takes them as one batch)."""
        return [self.detect(f, m) for f, m in zip(frames, foregrounds, strict=True)]


# A detection is the gate's product when the gate's mask covers at least this share of its box:
# a product elsewhere in the frame, beside a thing the gate fired on, is not it.
MIN_MASK_COVER = 0.5


def triggering_product(found: list[Detection], mask: np.ndarray | None) -> Detection | None:
    """Which of a gated frame's detections the gate fired on: of those its mask covers, the one
    nearest the centre line the gate watches (where products touch, the gate sees one blob and
    fires when its middle crosses: the product nearest the line is then the one to take; the
    most confident one instead was another trigger's as often, bench.frontend). None when no
    detection is under the mask: the gate fired on something that is not a product (a glove, a
    tool, a shadow)."""
    if mask is None:
        return found[0] if found else None
    width = mask.shape[1]
    under = []
    for d in found:
        x, y, w, h = d.bbox
        cover = np.count_nonzero(mask[y : y + h, x : x + w]) / max(1, w * h)
        if cover >= MIN_MASK_COVER:
            under.append(d)
    return min(under, key=lambda d: abs(d.bbox[0] + d.bbox[2] / 2 - width / 2), default=None)


class ContourDetector(Detector):
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


class YoloDetector(Detector):
    """Ultralytics YOLO from a local weights file (.pt or an exported format)."""

    def __init__(
        self,
        weights: Path,
        sha256: str,
        *,
        classes: list[int] | None = None,
        confidence: float = 0.25,
        image_size: int | None = None,
        device: str | None = None,
    ):
        """``image_size``: the network's input size [the size the weights were trained at]."""
        YOLO = ultralytics_yolo()
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
        keep_threads(self.model)
        self.classes = classes
        self.confidence = confidence
        self.image_size = image_size
        self.device = str(choose_device(device))

    def detect(self, frame: np.ndarray, foreground: np.ndarray | None = None) -> list[Detection]:
        return self.detect_batch([frame], [foreground])[0]

    def detect_batch(
        self, frames: list[np.ndarray], foregrounds: list[np.ndarray | None]
    ) -> list[list[Detection]]:
        """The frames as one batch through the network (the gate's masks are not needed)."""
        size = {"imgsz": self.image_size} if self.image_size else {}
        results = self.model.predict(
            frames,
            conf=self.confidence,
            classes=self.classes,
            device=self.device,
            verbose=False,
            **size,
        )
        return [self._detections(r) for r in results]

    @staticmethod
    def _detections(result) -> list[Detection]:
        out = []
        for corners, conf, cls in zip(
            result.boxes.xyxy.tolist(),
            result.boxes.conf.tolist(),
            result.boxes.cls.tolist(),
            strict=True,
        ):
            box = pixel_box(corners)
            out.append(Detection(box, float(conf), result.names.get(int(cls), str(int(cls)))))
        return sorted(out, key=lambda d: -d.confidence)


def ultralytics_yolo():
    """Ultralytics' ``YOLO`` class, imported without its thread setting: on import, Ultralytics
    sets ``OMP_NUM_THREADS=1`` where the environment has none, and a torch imported after that
    runs on one thread for the whole process (YOLO and the scorer alike). Torch is imported
    first, as the process's environment has it, and the variable is dropped again."""
    import torch  # noqa: F401  (takes its thread count from the environment on import)

    given = "OMP_NUM_THREADS" in os.environ
    from ultralytics import YOLO

    if not given:
        os.environ.pop("OMP_NUM_THREADS", None)
    return YOLO


def keep_threads(model) -> None:
    """Keep the process's torch thread count through ``model``'s training and prediction.

    Ultralytics sets torch's threads to one less than the machine's cores (at most 8) whenever it
    picks the CPU, for the whole process and past what Ray gave the actor: on 2 cores that is
    one, half the machine, for YOLO and for whatever runs after it in the process. Its
    callbacks at the start of training and of each prediction, and at the end of training (after
    its last check chose the CPU again), run after that choice: there the count the process had
    is put back."""
    import torch

    threads = torch.get_num_threads()

    def put_back(_) -> None:
        torch.set_num_threads(threads)

    for event in ("on_train_start", "on_train_end", "on_predict_start"):
        model.add_callback(event, put_back)


def pixel_box(corners: Iterable[float]) -> tuple[int, int, int, int]:
    """A box given by its corners in sub-pixel coordinates (x0, y0, x1, y1, as a network
    predicts it) as whole pixels (x, y, w, h), each edge to the nearest pixel border. Truncating
    the corner and the size instead would move every box up and left and shrink it by a pixel,
    on average, and every crop with it."""
    x0, y0, x1, y1 = (round(v) for v in corners)
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def intersection(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """The area two boxes (x, y, w, h) share."""
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    ix = max(0, min(ax0 + aw, bx0 + bw) - max(ax0, bx0))
    iy = max(0, min(ay0 + ah, by0 + bh) - max(ay0, by0))
    return ix * iy


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    inter = intersection(a, b)
    union = a[2] * a[3] + b[2] * b[3] - inter
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


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def _training_set(work: Path, videos: list[Path], labelled: list[Path]) -> tuple[int, int, int]:
    """Ultralytics' dataset under ``work``: the auto-labelled frames of ``videos`` and the
    ``labelled`` folders. Returns (auto-labelled, given labelled, negatives)."""
    if work.exists():
        shutil.rmtree(work)
    images, labels = work / "images" / "train", work / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    auto, negatives = auto_label(videos, images, labels)
    given = 0
    for i, folder in enumerate(labelled):
        pos, neg = import_labels(folder, images, labels, f"given{i}")
        given, negatives = given + pos, negatives + neg
    if auto + given == 0:
        raise ValueError("no product was found or labelled: nothing to train on")
    # Ultralytics validates after the last epoch whatever `val` says: on one image, as nothing
    # here is judged by it (bench.frontend measures the detector on the line).
    first = next(p for p in sorted(images.iterdir()) if (labels / f"{p.stem}.txt").read_text())
    (work / "images" / "val").mkdir()
    (work / "labels" / "val").mkdir()
    shutil.copyfile(first, work / "images" / "val" / first.name)
    shutil.copyfile(labels / f"{first.stem}.txt", work / "labels" / "val" / f"{first.stem}.txt")
    (work / "data.yaml").write_text(
        f"path: {work.resolve()}\ntrain: images/train\nval: images/val\nnames:\n  0: product\n"
    )
    return auto, given, negatives


def auto_label(videos: list[Path], images: Path, labels: Path) -> tuple[int, int]:
    """Label the products of ``videos`` where the scene is easy: a trigger frame in which the
    gate sees one thing alone, boxed by the contour detector; a few empty-belt frames become
    negatives. Returns (labelled frames, negatives)."""
    detector = ContourDetector()
    n_pos = n_neg = 0
    for v, video in enumerate(videos):
        gate = MotionGate()
        for index, frame in read_frames(video):
            trigger = gate.update(index, frame)
            name = f"auto{v}_f{index:06d}"
            if trigger is not None and gate.objects_in_view == 1:
                dets = detector.detect(frame, trigger.composite_mask)
                if not dets:
                    continue
                cv2.imwrite(str(images / f"{name}.jpg"), frame)
                (labels / f"{name}.txt").write_text(yolo_line(dets[0].bbox, frame.shape[:2]))
                n_pos += 1
            elif index % 25 == 10 and gate.objects_in_view == 0:
                cv2.imwrite(str(images / f"{name}.jpg"), frame)
                (labels / f"{name}.txt").write_text("")
                n_neg += 1
    return n_pos, n_neg


def yolo_line(bbox: tuple[int, int, int, int], shape: tuple[int, int], cls: int = 0) -> str:
    """A box as a line of a YOLO label file: class, centre and size as shares of the frame."""
    h, w = shape
    x, y, bw, bh = bbox
    return f"{cls} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}\n"


def _class_names(folder: Path) -> list[str] | None:
    """The label set's class names: CVAT's ``obj.names`` or an Ultralytics ``data.yaml``."""
    import yaml

    if (folder / "obj.names").is_file():
        return [n.strip() for n in (folder / "obj.names").read_text().splitlines() if n.strip()]
    for name in ("data.yaml", "dataset.yaml"):
        if (folder / name).is_file():
            names = (yaml.safe_load((folder / name).read_text()) or {}).get("names")
            if isinstance(names, dict):
                return [names[k] for k in sorted(names)]
            if isinstance(names, list):
                return names
    return None


def _label_file(image: Path) -> Path | None:
    """An image's label file: beside it, or under ``labels/`` where it is under ``images/``."""
    beside = image.with_suffix(".txt")
    if beside.is_file():
        return beside
    parts = list(image.parts)
    if "images" in parts:
        parts[len(parts) - 1 - parts[::-1].index("images")] = "labels"
        mirrored = Path(*parts).with_suffix(".txt")
        if mirrored.is_file():
            return mirrored
    return None


def import_labels(folder: Path, images: Path, labels: Path, prefix: str) -> tuple[int, int]:
    """Copy a labelled set in YOLO format (Ultralytics' layout or CVAT's "YOLO 1.1" export)
    into the training set, keeping the product class only (other classes, a glove say, are
    background to a product detector). An image without a label file is a negative. A
    malformed line is an error naming its file and line. Returns (with products, negatives)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such labels folder")
    names = _class_names(folder)
    if names is None or len(names) == 1:
        product = 0
    elif "product" in names:
        product = names.index("product")
    else:
        raise ValueError(f"{folder}: no class named 'product' among {names}")
    n_pos = n_neg = 0
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for index, image in enumerate(found):
        kept = []
        source = _label_file(image)
        lines = source.read_text().splitlines() if source else []
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                cls, *box = int(fields[0]), *(float(v) for v in fields[1:])
            except ValueError:
                cls, box = -1, []
            if len(box) != 4 or cls < 0 or not all(0 <= v <= 1 for v in box):
                raise ValueError(f"{source}:{number}: not a YOLO box line: {line!r}")
            if cls == product:
                kept.append(f"0 {' '.join(fields[1:])}\n")
        name = f"{prefix}_{index:06d}"
        shutil.copyfile(image, images / f"{name}{image.suffix.lower()}")
        (labels / f"{name}.txt").write_text("".join(kept))
        n_pos += bool(kept)
        n_neg += not kept
    if n_pos + n_neg == 0:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return n_pos, n_neg


def bootstrap_yolo(
    videos: list[Path],
    out: Path,
    *,
    labelled: list[Path] = (),
    epochs: int = 1,
    image_size: int = 320,
    architecture: str = "yolov8n.yaml",
    batch: int = 16,
    work_dir: Path | None = None,
    seed: int = 0,
    device: str | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
) -> dict:
    """Train a YOLO built from ``architecture`` (an Ultralytics model YAML: ``yolov8n.yaml``,
    ``yolov8s.yaml`` or a file; no pretrained weights, nothing downloaded) on the products of
    ``videos``, labelled automatically where the scene is easy, and on the ``labelled`` folders
    (YOLO format: a plant's corrected labels for the rest). ``on_epoch`` hears (epochs done,
    epochs). Returns counts, where the weights went and their sha256."""
    from workers.devices import choose_device

    YOLO = ultralytics_yolo()
    work = Path(work_dir or Path(out).with_suffix(".bootstrap"))
    auto, given, negatives = _training_set(work, videos, labelled)
    model = YOLO(architecture)
    keep_threads(model)
    if on_epoch is not None:
        model.add_callback("on_train_epoch_end", lambda t: on_epoch(t.epoch + 1, t.epochs))
    # Ultralytics' own log and progress bars only at WARNING: the caller shows the progress.
    ultralytics_log = logging.getLogger("ultralytics")
    level = ultralytics_log.level
    ultralytics_log.setLevel(logging.WARNING)
    try:
        model.train(
            data=str(work / "data.yaml"),
            epochs=epochs,
            imgsz=image_size,
            batch=batch,
            device=str(choose_device(device)),
            amp=False,  # Ultralytics' AMP check downloads a model
            # A short run from scratch: one warm-up epoch (of 3), mosaics off for the last five.
            warmup_epochs=1,
            close_mosaic=5,
            plots=False,
            workers=0,
            seed=seed,
            # Absolute: Ultralytics puts a relative project under its own runs folder.
            project=str((work / "runs").resolve()),
            name="train",
            exist_ok=True,
            verbose=False,
            val=False,
        )
    finally:
        ultralytics_log.setLevel(level)
    trained = work / "runs" / "train" / "weights" / "last.pt"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(trained, out)
    return {
        "weights": str(out),
        "sha256": sha256_of(Path(out)),  # what the line file records as yolo_weights_sha256
        "auto_labelled": auto,
        "given_labelled": given,
        "negatives": negatives,
        "epochs": epochs,
        "image_size": image_size,
        "architecture": architecture,
    }
