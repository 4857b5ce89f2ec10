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
from pathlib import Path

import cv2
import numpy as np

from bench.report import emit
from workers.frontend.detect import ContourDetector, iou
from workers.frontend.matte import matte
from workers.frontend.motion import MotionGate
from workers.frontend.sources import open_source
from workers.simulation.simulate import LineSpec, camera_videos, parse_frame_size, simulate_line


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
    exactly_once, ious, belt_left = [], [], []
    gate_s = detect_s = matte_s = decode_s = 0.0
    frames = triggers = 0
    detector = ContourDetector()
    for cam, video in camera_videos(args.out).items():
        gate = MotionGate()
        counts = dict.fromkeys(range(args.products), 0)
        t = time.perf_counter()
        # As the camera ingest reads: MJPEG decoded at the gate's size, the JPEG kept.
        for source_frame in open_source(str(video), args.frame_stride, gate.work_width):
            index, frame = source_frame.index, source_frame.image
            decode_s += time.perf_counter() - t
            frames += 1
            t = time.perf_counter()
            trigger = gate.update(index, frame, source_frame.shape[:2])
            gate_s += time.perf_counter() - t
            if trigger is not None:
                triggers += 1
                t = time.perf_counter()
                # Detect + matte decode the gated frame in full, once per product.
                if source_frame.jpeg is not None:
                    jpeg = np.frombuffer(source_frame.jpeg, np.uint8)
                    frame = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
                decode_s += time.perf_counter() - t
                t = time.perf_counter()
                found = detector.detect(frame, trigger.composite_mask)
                detect_s += time.perf_counter() - t
                # Which product is it? The one whose true box is in this frame.
                truth = [
                    (pr["seq"], pr["views"][cam]["bboxes"][str(index)])
                    for pr in manifest["products"]
                    if str(index) in pr["views"][cam]["bboxes"]
                ]
                if found and truth:
                    seq, box = max(truth, key=lambda sb: iou(found[0].bbox, tuple(sb[1])))
                    counts[seq] += 1
                    ious.append(iou(found[0].bbox, tuple(box)))
                    t = time.perf_counter()
                    result = matte(frame, found[0].bbox, trigger.composite_mask)
                    matte_s += time.perf_counter() - t
                    x, y, w, h = result.box
                    inside = np.zeros((h, w), bool)
                    tx, ty, tw, th = box
                    inside[
                        max(0, ty - y) : max(0, ty - y + th), max(0, tx - x) : max(0, tx - x + tw)
                    ] = True
                    kept = result.mask > 0
                    belt_left.append(float((kept & ~inside).sum() / max(1, kept.sum())))
            t = time.perf_counter()
        exactly_once += [c == 1 for c in counts.values()]
    result = {
        "products": args.products,
        "cameras": args.cameras,
        "frame_stride": args.frame_stride,
        "frame_size": [width, height],
        "frames_recorded": manifest["frames"] * args.cameras,
        "frames_gated": frames,
        "trigger_exactly_once_rate": float(np.mean(exactly_once)),
        "crop_iou_mean": float(np.mean(ious)) if ious else 0.0,
        "crop_iou_min": float(np.min(ious)) if ious else 0.0,
        "background_left_fraction": float(np.mean(belt_left)) if belt_left else 1.0,
        "ms_per_frame": {
            "decode": 1000 * decode_s / frames,
            "gate": 1000 * gate_s / frames,
            "detect_per_product": 1000 * detect_s / max(1, triggers),
            "matte_per_product": 1000 * matte_s / max(1, triggers),
            "front_end_per_frame": 1000 * (gate_s + detect_s + matte_s) / frames,
        },
        # Everything the front end spends, decoding included, per frame the cameras recorded.
        "front_end_ms_per_recorded_frame": 1000
        * (decode_s + gate_s + detect_s + matte_s)
        / (manifest["frames"] * args.cameras),
    }
    return emit(result, args.json)


if __name__ == "__main__":
    main()
