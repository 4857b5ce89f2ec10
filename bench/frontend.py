"""Front-end benchmark on a simulated line (prints JSON).

    python -m bench.frontend --data ../shared/data/mtd --json bench-out/frontend.json

Reports how often each product triggers exactly once per camera, the detector's crop IoU against
the simulator's boxes, how much conveyor survives matting, and milliseconds per frame per stage
(decode and gate on every ``--frame-stride``-th frame; detector and matting once per product),
with the whole front end's cost per frame the cameras recorded.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from bench.report import emit
from workers.frontend.detect import ContourDetector, iou
from workers.frontend.matte import matte
from workers.frontend.motion import MotionGate
from workers.frontend.sources import open_source
from workers.simulation.simulate import LineSpec, camera_videos, parse_frame_size, simulate_line


@dataclass
class Tally:
    """What one pass over the cameras' recordings found, and the seconds each stage took."""

    exactly_once: list[bool] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)
    belt_left: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("decode", "gate", "detect", "matte"), 0.0)
    )
    frames: int = 0
    triggers: int = 0


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
    args = p.parse_args(argv)

    width, height = parse_frame_size(args.size)
    spec = LineSpec(
        products=args.products, cameras=args.cameras, seed=args.seed, width=width, height=height
    )
    manifest = simulate_line(args.data, args.out, spec)
    tally = Tally()
    for cam, video in camera_videos(args.out).items():
        counts = dict.fromkeys(range(args.products), 0)
        _camera(video, cam, manifest, args.frame_stride, counts, tally)
        tally.exactly_once += [c == 1 for c in counts.values()]
    return emit(_report(args, manifest, (width, height), tally), args.json)


def _camera(video: Path, cam: str, manifest: dict, stride: int, counts: dict, tally: Tally):
    """One camera's recording as the camera ingest reads it: MJPEG decoded at the gate's size,
    the JPEG kept; each triggered product detected and matted."""
    gate = MotionGate()
    t = time.perf_counter()
    for source_frame in open_source(str(video), stride, gate.work_width):
        index, frame = source_frame.index, source_frame.image
        tally.seconds["decode"] += time.perf_counter() - t
        tally.frames += 1
        t = time.perf_counter()
        trigger = gate.update(index, frame, source_frame.shape[:2])
        tally.seconds["gate"] += time.perf_counter() - t
        if trigger is not None:
            tally.triggers += 1
            t = time.perf_counter()
            # Detect + matte decode the gated frame in full, once per product.
            if source_frame.jpeg is not None:
                frame = cv2.imdecode(np.frombuffer(source_frame.jpeg, np.uint8), cv2.IMREAD_COLOR)
            tally.seconds["decode"] += time.perf_counter() - t
            _product(frame, index, cam, trigger, manifest, counts, tally)
        t = time.perf_counter()


def _product(frame, index: int, cam: str, trigger, manifest: dict, counts: dict, tally: Tally):
    """Detect and matte a triggered product; score the crop against the simulator's box."""
    t = time.perf_counter()
    found = ContourDetector().detect(frame, trigger.composite_mask)
    tally.seconds["detect"] += time.perf_counter() - t
    # Which product is it? The one whose true box is in this frame.
    truth = [
        (pr["seq"], pr["views"][cam]["bboxes"][str(index)])
        for pr in manifest["products"]
        if str(index) in pr["views"][cam]["bboxes"]
    ]
    if not (found and truth):
        return
    seq, box = max(truth, key=lambda sb: iou(found[0].bbox, tuple(sb[1])))
    counts[seq] += 1
    tally.ious.append(iou(found[0].bbox, tuple(box)))
    t = time.perf_counter()
    result = matte(frame, found[0].bbox, trigger.composite_mask)
    tally.seconds["matte"] += time.perf_counter() - t
    x, y, w, h = result.box
    inside = np.zeros((h, w), bool)
    tx, ty, tw, th = box
    inside[max(0, ty - y) : max(0, ty - y + th), max(0, tx - x) : max(0, tx - x + tw)] = True
    kept = result.mask > 0
    tally.belt_left.append(float((kept & ~inside).sum() / max(1, kept.sum())))


def _report(args, manifest: dict, size: tuple[int, int], tally: Tally) -> dict:
    s, frames, triggers = tally.seconds, tally.frames, max(1, tally.triggers)
    recorded = manifest["frames"] * args.cameras
    return {
        "products": args.products,
        "cameras": args.cameras,
        "frame_stride": args.frame_stride,
        "frame_size": list(size),
        "frames_recorded": recorded,
        "frames_gated": frames,
        "trigger_exactly_once_rate": float(np.mean(tally.exactly_once)),
        "crop_iou_mean": float(np.mean(tally.ious)) if tally.ious else 0.0,
        "crop_iou_min": float(np.min(tally.ious)) if tally.ious else 0.0,
        "background_left_fraction": float(np.mean(tally.belt_left)) if tally.belt_left else 1.0,
        "ms_per_frame": {
            "decode": 1000 * s["decode"] / frames,
            "gate": 1000 * s["gate"] / frames,
            "detect_per_product": 1000 * s["detect"] / triggers,
            "matte_per_product": 1000 * s["matte"] / triggers,
            "front_end_per_frame": 1000 * (s["gate"] + s["detect"] + s["matte"]) / frames,
        },
        # Everything the front end spends, decoding included, per frame the cameras recorded.
        "front_end_ms_per_recorded_frame": 1000 * sum(s.values()) / recorded,
    }


if __name__ == "__main__":
    main()
