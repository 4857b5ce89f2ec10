"""End-to-end benchmark of the inspection cluster on a simulated 4-camera line (prints JSON).

    python -m bench.pipeline --data ../shared/data/mtd --products 60 --json bench-out/pipeline.json

In one run: the cluster inspects the line (Ray actors over the embedded Redis), then the same
model scores the same views standalone (no Ray, no Redis), and then the simulator's
ground-truth crops offline. ``throughput_ratio`` = pipeline products/s over standalone
products/s: what orchestration and messaging cost. The pipeline's products/s counts from the
first frame published to the last verdict; the cameras are not paced (they deliver as fast as
they decode), so the line runs as fast as its slowest stage.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import ray

from bench.report import emit
from cluster.config import ReplicaConfig
from cluster.demo import line_config, simulate_test_line, summarize, train_line_model
from cluster.graph import drain_and_stop, line_cpus, replay_line, start_line
from cluster.redis_conn import EmbeddedRedis, client_from_url
from cluster.streams import Streams
from schemas import ProductView, Verdict
from workers.detect import read_frames
from workers.differnet.store import load_model
from workers.images import encode_png
from workers.matte import matte
from workers.stages import ViewScorer
from workers.threshold import auroc


def ground_truth_crops(
    line_dir: Path, manifest: dict
) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
    """Per product, each camera's crop cut as the front end cuts, but at the simulator's box.

    The frame is the one nearest the centre crossing; the mask is the true box, filled; the
    matting (margin, 10 % shrink) is the pipeline's. Only detection and the gate's mask differ.
    """
    width = manifest["spec"]["width"]
    wanted: dict[str, dict[int, int]] = {}
    for p in manifest["products"]:
        for cam, view in p["views"].items():
            boxes = {int(f): b for f, b in view["bboxes"].items()}
            best = min(boxes, key=lambda f: abs(boxes[f][0] + boxes[f][2] / 2 - width / 2))
            wanted.setdefault(cam, {})[best] = p["seq"]
    crops: dict[int, list] = {}
    for cam, frames in wanted.items():
        for index, frame in read_frames(line_dir / f"{cam}.mp4"):
            if index in frames:
                seq = frames[index]
                x, y, w, h = manifest["products"][seq]["views"][cam]["bboxes"][str(index)]
                box_mask = np.zeros(frame.shape[:2], np.uint8)
                box_mask[y : y + h, x : x + w] = 255
                result = matte(frame, (x, y, w, h), box_mask)
                crops.setdefault(seq, []).append(
                    (np.ascontiguousarray(result.crop[:, :, ::-1]), result.mask)
                )
    return crops


def as_views(crops: dict[int, list]) -> list[ProductView]:
    views = []
    for seq, items in crops.items():
        for i, (rgb, mask) in enumerate(items):
            h, w = mask.shape
            views.append(
                ProductView(
                    product_id=f"gt:{seq}",
                    line="gt",
                    camera=f"cam{i}",
                    product_seq=seq,
                    captured_at=0.0,
                    codec="png",
                    shape=(h, w, 4),
                    image=encode_png(rgb, mask),
                    bbox={"x": 0, "y": 0, "w": w, "h": h},
                    mask_coverage=float((mask > 0).mean()),
                    mask_shrink=0.1,
                )
            )
    return views


def steady_window_s(client, streams: Streams, cameras: list[str]) -> float:
    """Seconds from the first frame any camera published to the last verdict, by Redis's clock.

    Actor start-up is left out, as model loading is left out of the standalone figure: a line
    runs for months, it starts once.
    """

    def entry_ms(entries) -> int:
        return int(entries[0][0].split(b"-")[0])

    first = min(entry_ms(client.xrange(streams.frames(c), count=1)) for c in cameras)
    return (entry_ms(client.xrevrange(streams.verdicts, count=1)) - first) / 1e3


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("bench-out/pipeline"))
    p.add_argument("--products", type=int, default=60)
    p.add_argument("--train-products", type=int, default=120)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--score-replicas",
        type=int,
        default=os.cpu_count() or 1,
        help="single-threaded scorers (default: one per core, as a CPU-only line is set up)",
    )
    args = p.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "model" / "model.json").exists():
        train_line_model(
            args.data,
            out,
            train_products=args.train_products,
            epochs=args.epochs,
            seed=args.seed,
            progress=lambda *a: None,
        )
    bundle = load_model(out / "model")
    manifest = simulate_test_line(args.data, out, args.products, args.seed)
    line = line_config(
        out / "line-test", manifest["cameras"], ReplicaConfig(score=args.score_replicas)
    )

    with EmbeddedRedis(out / "redis") as server:
        client = client_from_url(server.url)
        s = Streams(line.id)
        replay_line(client, line, out / "model")
        ray.init(
            num_cpus=max(2, int(line_cpus(line) + 1)),
            include_dashboard=False,
            logging_level="WARNING",
        )
        try:
            running = start_line(line, server.url, out / "model")
            drain_and_stop(client, [running], timeout_s=3600)
        finally:
            ray.shutdown()
        pipeline_s = steady_window_s(client, s, manifest["cameras"])
        verdicts = [Verdict.from_entry(f) for _, f in client.xrange(s.verdicts)]
        views = [ProductView.from_entry(f) for _, f in client.xrange(s.views)]
    summary = summarize(manifest, verdicts, pipeline_s, 0)

    # The same model on the same views, standalone: the cost of scoring alone.
    scorer = ViewScorer(bundle)
    t0 = time.monotonic()
    for i in range(0, len(views), 8):
        scorer.score(views[i : i + 8])
    standalone_s = time.monotonic() - t0
    standalone_pps = (len(views) / len(manifest["cameras"])) / standalone_s

    # The simulator's ground-truth crops, offline.
    gt = ground_truth_crops(out / "line-test", manifest)
    gt_scores: dict[int, list] = {}
    for score in scorer.score(as_views(gt)):
        gt_scores.setdefault(score.product_seq, []).append(score)
    truth = {p["seq"]: p["defective"] for p in manifest["products"]}
    gt_decisions = [any(v.is_defect for v in gt_scores[q]) for q in sorted(gt_scores)]
    gt_truth = [truth[q] for q in sorted(gt_scores)]
    gt_product_scores = [
        max(v.score - v.threshold for v in gt_scores[q]) for q in sorted(gt_scores)
    ]

    result = {
        "products": args.products,
        "verdicts": summary.verdicts,
        "exactly_one_verdict_per_product": sorted(v.product_seq for v in verdicts)
        == list(range(args.products)),
        "products_per_s": summary.products_per_s,
        "latency_p50_s": summary.latency_p50_s,
        "latency_p99_s": summary.latency_p99_s,
        "product_accuracy": summary.product_accuracy,
        "product_auroc": summary.product_auroc,
        "standalone_products_per_s": standalone_pps,
        "throughput_ratio": summary.products_per_s / standalone_pps,
        "ground_truth_crops_product_accuracy": float(
            np.mean([d == t for d, t in zip(gt_decisions, gt_truth, strict=True)])
        ),
        "ground_truth_crops_product_auroc": auroc(gt_product_scores, [int(t) for t in gt_truth]),
        "model_version": bundle.version,
        "score_replicas": args.score_replicas,
        "note": "pipeline window: first frame published to last verdict (Redis clock); "
        "sources not paced",
    }
    return emit(result, args.json)


if __name__ == "__main__":
    main()
