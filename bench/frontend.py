"""Front-end benchmark on simulated lines, per scene and detector (prints JSON).

    python -m bench.frontend --data ../shared/data/mtd --json bench-out/frontend.json \
        --scene easy hard --detector contour yolo --trigger motion tracking

For every scene, detector and trigger (``tracking``: YOLO on every frame with motion, each
product tracked across the centre line; YOLO only), one row: how often each product triggers
exactly once per camera, products missed, views of things that are not products (distractors,
merged or stray boxes), the chosen box's IoU against the simulator's, how much conveyor
survives matting, and milliseconds per frame per stage (decode and gate on every
``--frame-stride``-th frame, a tracking gate's detector included; the detector and matting
once per gated frame that fired). Without ``--yolo-weights``, a YOLOv8n is trained first on
the truth of a separate line of each scene (another seed; every ``--train-every``-th frame of
``--train-cameras`` cameras): its training time is in the result.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.report import emit
from workers.frontend.detect import (
    ContourDetector,
    Detector,
    YoloDetector,
    bootstrap_yolo,
    iou,
    triggering_product,
)
from workers.frontend.matte import matte
from workers.frontend.motion import MotionGate
from workers.frontend.sources import open_source
from workers.frontend.tracking import TrackingGate, gate_frame
from workers.simulation.labels import truth_labels
from workers.simulation.simulate import camera_videos, parse_frame_size, scene_spec, simulate_line
from workers.weights import sha256_of

# A view is of a product when its box overlaps the product's true box this much (IoU).
MATCH_IOU = 0.3


@dataclass
class Tally:
    """What one pass over the cameras' recordings found, and the seconds each stage took."""

    exactly_once: list[bool] = field(default_factory=list)
    missed: int = 0
    ious: list[float] = field(default_factory=list)
    belt_left: list[float] = field(default_factory=list)
    distractor_views: int = 0
    stray_views: int = 0
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("decode", "gate", "detect", "matte"), 0.0)
    )
    frames: int = 0
    triggers: int = 0
    views: int = 0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("bench-out/frontend-line"))
    p.add_argument("--products", type=int, default=40)
    p.add_argument("--cameras", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frame-stride", type=int, default=1, help="the gate sees every n-th frame")
    p.add_argument("--size", default="480x270", help="cameras' frame size WxH")
    p.add_argument("--scene", nargs="+", default=["easy"], choices=["easy", "hard"])
    p.add_argument("--detector", nargs="+", default=["contour"], choices=["contour", "yolo"])
    p.add_argument("--trigger", nargs="+", default=["motion"], choices=["motion", "tracking"])
    p.add_argument("--yolo-weights", type=Path, help="default: train one on the scenes' truth")
    p.add_argument("--yolo-epochs", type=int, default=40)
    p.add_argument("--yolo-image-size", type=int, default=256)
    p.add_argument("--train-products", type=int, default=16, help="per scene, for YOLO")
    p.add_argument("--train-cameras", type=int, default=2, help="per scene, for YOLO")
    p.add_argument("--train-every", type=int, default=4, help="YOLO learns every n-th frame")
    args = p.parse_args(argv)

    width, height = parse_frame_size(args.size)
    lines = {}
    for scene in args.scene:
        spec = scene_spec(
            scene,
            products=args.products,
            cameras=args.cameras,
            seed=args.seed,
            width=width,
            height=height,
        )
        lines[scene] = (args.out / scene, simulate_line(args.data, args.out / scene, spec))
    result: dict = {
        "products": args.products,
        "cameras": args.cameras,
        "frame_stride": args.frame_stride,
        "frame_size": [width, height],
    }
    detectors: dict[str, Detector] = {"contour": ContourDetector()}
    if "yolo" in args.detector:
        weights = args.yolo_weights or _train_yolo(args, (width, height), result)
        detectors["yolo"] = YoloDetector(weights, sha256_of(weights))
    result["rows"] = []
    runs = [
        (scene, name, trigger)
        for scene in lines
        for name in args.detector
        for trigger in args.trigger
        if name == "yolo" or trigger == "motion"
    ]
    for scene, name, trigger in runs:
        line_dir, manifest = lines[scene]
        tally = Tally()
        for cam, video in camera_videos(line_dir).items():
            counts = dict.fromkeys(range(args.products), 0)
            gate = MotionGate()
            if trigger == "tracking":
                gate = TrackingGate(detectors[name], gate)
            _camera(video, cam, manifest, args.frame_stride, gate, detectors[name], counts, tally)
            tally.exactly_once += [c == 1 for c in counts.values()]
            tally.missed += sum(c == 0 for c in counts.values())
        result["rows"].append(_row(scene, name, trigger, manifest, tally))
    return emit(result, args.json)


def _train_yolo(args, size: tuple[int, int], result: dict) -> Path:
    """A YOLOv8n trained on the truth of one more line of each scene (another seed)."""
    work = Path(tempfile.mkdtemp(prefix="bench-yolo-", dir=args.out.parent))
    folders = []
    for scene in args.scene:
        spec = scene_spec(
            scene,
            products=args.train_products,
            cameras=args.train_cameras,
            seed=args.seed + 1000,
            width=size[0],
            height=size[1],
        )
        simulate_line(args.data, work / f"line-{scene}", spec)
        truth_labels(work / f"line-{scene}", work / f"labels-{scene}", every=args.train_every)
        folders.append(work / f"labels-{scene}")
    t = time.perf_counter()
    report = bootstrap_yolo(
        [],
        work / "yolo.pt",
        labelled=folders,
        epochs=args.yolo_epochs,
        image_size=args.yolo_image_size,
    )
    result["yolo_training"] = report | {"seconds": time.perf_counter() - t}
    return work / "yolo.pt"


def _camera(
    video: Path,
    cam: str,
    manifest: dict,
    stride: int,
    gate: MotionGate | TrackingGate,
    detector: Detector,
    counts: dict,
    tally: Tally,
):
    """One camera's recording as the camera ingest reads it: MJPEG decoded at the gate's size,
    the JPEG kept; each gated frame that fired goes to the detector and is matted. A tracking
    gate's detector time (and its decoding of whole frames) counts as the gate's."""
    t = time.perf_counter()
    for source_frame in open_source(str(video), stride, gate.work_width):
        index = source_frame.index
        tally.seconds["decode"] += time.perf_counter() - t
        tally.frames += 1
        t = time.perf_counter()
        triggers = gate_frame(gate, source_frame)
        tally.seconds["gate"] += time.perf_counter() - t
        for trigger in triggers:
            tally.triggers += 1
            t = time.perf_counter()
            # Detect + matte decode the gated frame in full, once per product.
            whole = source_frame.whole()
            tally.seconds["decode"] += time.perf_counter() - t
            _view(whole, index, cam, trigger, manifest, detector, counts, tally)
        t = time.perf_counter()


def _view(frame, index, cam, trigger, manifest, detector, counts: dict, tally: Tally):
    """Detect and matte a gated frame; judge the view against the simulator's boxes."""
    t = time.perf_counter()
    found = detector.detect(frame, trigger.composite_mask)
    product = triggering_product(found, trigger.composite_mask)
    tally.seconds["detect"] += time.perf_counter() - t
    if product is None:
        return
    tally.views += 1
    key = str(index)
    truth = [
        (pr["seq"], tuple(pr["views"][cam]["bboxes"][key]))
        for pr in manifest["products"]
        if key in pr["views"][cam]["bboxes"]
    ]
    seq, box = max(truth, key=lambda sb: iou(product.bbox, sb[1]), default=(None, None))
    if seq is None or iou(product.bbox, box) < MATCH_IOU:
        on_distractor = any(
            iou(product.bbox, tuple(d["views"][cam]["bboxes"][key])) >= MATCH_IOU
            for d in manifest["distractors"]
            if key in d["views"][cam]["bboxes"]
        )
        tally.distractor_views += on_distractor
        tally.stray_views += not on_distractor
        return
    counts[seq] += 1
    tally.ious.append(iou(product.bbox, box))
    t = time.perf_counter()
    result = matte(frame, product.bbox, trigger.composite_mask)
    tally.seconds["matte"] += time.perf_counter() - t
    x, y, w, h = result.box
    inside = np.zeros((h, w), bool)
    tx, ty, tw, th = box
    inside[max(0, ty - y) : max(0, ty - y + th), max(0, tx - x) : max(0, tx - x + tw)] = True
    kept = result.mask > 0
    tally.belt_left.append(float((kept & ~inside).sum() / max(1, kept.sum())))


def _row(scene: str, detector: str, trigger: str, manifest: dict, tally: Tally) -> dict:
    s, frames, triggers = tally.seconds, tally.frames, max(1, tally.triggers)
    cameras = len(manifest["cameras"])
    return {
        "scene": scene,
        "detector": detector,
        "trigger": trigger,
        "frames_gated": frames,
        "trigger_exactly_once_rate": float(np.mean(tally.exactly_once)),
        "missed_product_views": tally.missed,
        "distractors": len(manifest["distractors"]) * cameras,
        "distractor_views": tally.distractor_views,
        "stray_views": tally.stray_views,
        "spurious_rate": (tally.distractor_views + tally.stray_views) / max(1, tally.views),
        "crop_iou_mean": float(np.mean(tally.ious)) if tally.ious else 0.0,
        "crop_iou_min": float(np.min(tally.ious)) if tally.ious else 0.0,
        "background_left_fraction": float(np.mean(tally.belt_left)) if tally.belt_left else 1.0,
        "ms_per_frame": {
            "decode": 1000 * s["decode"] / frames,
            "gate": 1000 * s["gate"] / frames,
            "detect_per_gated_frame": 1000 * s["detect"] / triggers,
            "matte_per_product": 1000 * s["matte"] / triggers,
        },
        # Everything the front end spends, decoding included, per frame the cameras recorded.
        "front_end_ms_per_recorded_frame": 1000 * sum(s.values()) / (manifest["frames"] * cameras),
    }


if __name__ == "__main__":
    main()
