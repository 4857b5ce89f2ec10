"""End-to-end benchmark of the inspection cluster on a simulated 4-camera line (prints JSON).

    python -m bench.pipeline --data ../shared/data/mtd --products 60 --json bench-out/pipeline.json

In one run, ``--rounds`` times: the cluster inspects the line (Ray actors over the embedded
Redis), then the same model scores the same views standalone, in as many single-threaded
processes as the line has scorers (no Ray, no streams in between), then the same processes run
all of the line's stages on their share of the cameras (video to scores, no Ray, no Redis).
Then the simulator's ground-truth crops (cut at its true boxes) are scored offline by the line's
own model at its own threshold: ``accuracy_gap_points`` = the pipeline's product accuracy minus
that, with the model and the threshold held and only the crops different, is what the front end
(gate, detector, matting) and the streaming cost or gain. ``accuracy_gap_points_ci95`` is how far
it moves with the products drawn (a bootstrap over the validation line's products, where the
line's threshold is chosen again and judges both, and over the test line's, paired). A
*reference model* that learned, by the same recipe, from true-box crops of the same training
line scores them too, at its own threshold (``reference_*``): what a model that never saw the
front end's crops would make of ideal ones; its gap also holds where two validation runs put two
thresholds. ``*_accuracy_hindsight``, at the best threshold for the test line's own scores, tells
the ranking's share of a gap from the validation line's (where it put the threshold).
``throughput_ratio`` = pipeline products/s over standalone scoring's: what the line adds to
scoring, its front end included;
``orchestration_ratio`` = pipeline products/s over the standalone stages': what Ray and Redis
cost (median round). ``maps_cost_share`` = 1 - the line's products/s over its products/s with
``regions: off`` (no defect maps drawn), both in the round: what drawing a map for every view
and cutting its regions costs the line; ``standalone_maps_cost_share``, the same for scoring
alone. The pipeline's products/s counts from the first frame published to the
last verdict; the cameras are not paced (they deliver as fast as they decode), so the line runs
as fast as its slowest stage.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import ray
import torch

from bench.report import emit
from cluster.demo import (
    DEMO_CROPS,
    LINE,
    line_config,
    product_score,
    reusable_line_model,
    simulate_test_line,
    summarize,
    train_line_model,
    validation_products,
)
from cluster.runtime.graph import drain_and_stop, line_cpus, start_line
from cluster.runtime.settings import CameraConfig, LineConfig, ReplicaConfig
from cluster.transport.bus import StreamBus
from cluster.transport.connection import EmbeddedRedis, RedisAccess
from cluster.transport.streams import Streams, reset_line
from schemas import CameraFrame, ProductView, RegionDetail, Verdict
from workers.differnet.store import load_model
from workers.frontend.stages import CameraIngest, DetectMatte, NoProductFound
from workers.images import encode_png
from workers.line.scoring import ViewScorer
from workers.simulation.harvest import true_box_crops
from workers.simulation.simulate import parse_frame_size
from workers.threshold import accuracy_gap_interval, auroc, best_accuracy


def ground_truth_crops(line_dir: Path) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
    """Per product, each camera's (RGB crop, mask) cut at the simulator's box."""
    manifest = json.loads((line_dir / "manifest.json").read_text())
    crops: dict[int, list] = {}
    for _, seq, cut in true_box_crops(line_dir, manifest, DEMO_CROPS):
        crops.setdefault(seq, []).append((np.ascontiguousarray(cut.crop[:, :, ::-1]), cut.mask))
    return crops


def accuracy_at(scores: dict[int, float], truth: dict[int, int], threshold: float) -> float:
    return float(np.mean([(score >= threshold) == truth[q] for q, score in scores.items()]))


def product_scores(scorer: ViewScorer, crops: dict[int, list]) -> dict[int, float]:
    """Each product's worst (highest) view score, by product sequence number."""
    scores: dict[int, float] = {}
    for view in scorer.score(as_views(crops)):
        scores[view.product_seq] = max(scores.get(view.product_seq, float("-inf")), view.score)
    return dict(sorted(scores.items()))


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
                    mask_shrink=DEMO_CROPS.mask_shrink,
                )
            )
    return views


_standalone: ViewScorer | None = None


def _load_scorer(model_dir: str) -> None:
    # One thread, as Ray gives a scorer that asks for one CPU.
    global _standalone
    torch.set_num_threads(1)
    _standalone = ViewScorer(load_model(Path(model_dir)))


def _score_share(
    access: RedisAccess, stream: str, share: int, shares: int, regions: RegionDetail
) -> float:
    """Score every ``shares``-th view from ``share`` on; the seconds that took."""
    views = [v for _, v in StreamBus(access.connect()).read(stream, ProductView)][share::shares]
    _standalone.regions = regions
    t0 = time.monotonic()
    for i in range(0, len(views), 8):
        _standalone.score(views[i : i + 8])
    return time.monotonic() - t0


def standalone_scoring_s(
    pool: ProcessPoolExecutor,
    workers: int,
    access: RedisAccess,
    stream: str,
    regions: RegionDetail = "outlines",
) -> float:
    """The line's views scored by ``workers`` processes as the line's scorers are set up (one
    thread each, batches of 8), side by side, without Ray or streams in between."""
    shares = [
        pool.submit(_score_share, access, stream, i, workers, regions) for i in range(workers)
    ]
    return max(f.result() for f in shares)


def _run_stages(cameras: list[CameraConfig]) -> float:
    """These cameras through the line's stages in this process: ingest (decode, gate), detect +
    matte, then scoring in batches of 8. The seconds that took."""
    t0 = time.monotonic()
    views = []
    for camera in cameras:
        cut = DetectMatte(crops=DEMO_CROPS)
        ingest = CameraIngest(LINE, camera.id, camera.source, frame_stride=camera.frame_stride)
        for frame in ingest.frames():
            try:
                views.append(cut.process(frame))
            except NoProductFound:
                pass  # as the line's actor, which dead-letters it
    for i in range(0, len(views), 8):
        _standalone.score(views[i : i + 8])
    return time.monotonic() - t0


def standalone_stages_s(pool: ProcessPoolExecutor, workers: int, line: LineConfig) -> float:
    """All of the line's work but the aggregation, without Ray or Redis: ``workers`` processes,
    each taking its share of the cameras from video to scores."""
    cameras = line.cameras
    shares = [pool.submit(_run_stages, cameras[i::workers]) for i in range(workers)]
    return max(f.result() for f in shares)


def steady_window_s(client, streams: Streams, cameras: list[str]) -> float:
    """Seconds from the first frame any camera published to the last verdict, by Redis's clock.

    Actor start-up is left out, as model loading is left out of the standalone figure: a line
    runs for months, it starts once.
    """

    bus = StreamBus(client)

    def entry_ms(entries) -> int:
        return int(entries[0][0].split("-")[0])

    first = min(entry_ms(bus.read(streams.frames(c), CameraFrame, count=1)) for c in cameras)
    return (entry_ms(bus.newest(streams.verdicts, Verdict)) - first) / 1e3


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("bench-out/pipeline"))
    p.add_argument("--products", type=int, default=60)
    p.add_argument(
        "--train-products", type=int, help="default: every training image twice (380 on MTD)"
    )
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--size", help="cameras' frame size WxH (default: the simulator's, 480x270)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="pipeline + standalone, alternated")
    p.add_argument(
        "--score-replicas",
        type=int,
        default=os.cpu_count() or 1,
        help="single-threaded scorers (default: one per core, as a CPU-only line is set up)",
    )
    return p.parse_args(argv)


def _train_models(args, frame_size) -> Path:
    """The line's model learns from crops its front end cut; the reference model, from crops
    cut at the simulator's boxes (same training and validation lines, same recipe). The
    reference model's folder."""
    reference = args.out / "true-boxes"
    for work, boxes in ((args.out, "detected"), (reference, "true")):
        if reusable_line_model(work / "model", boxes) is None:
            train_line_model(
                args.data,
                work,
                train_products=args.train_products,
                epochs=args.epochs,
                seed=args.seed,
                progress=lambda *a: None,
                frame_size=frame_size,
                boxes=boxes,
            )
    return reference


def _inspect(args, server, line: LineConfig, manifest: dict) -> float:
    """The line through the cluster, its streams emptied first; the window's seconds."""
    client = server.access.connect()
    reset_line(client, line.id, [c.id for c in line.cameras])
    # Ray is up only while the line runs: its own processes take some CPU too.
    cpus = max(2, int(line_cpus(line) + 1))
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
    try:
        running = start_line(line, server.access, args.out / "model", activate=True)
        drain_and_stop([running], timeout_s=3600)
    finally:
        ray.shutdown()
    return steady_window_s(client, Streams(line.id), manifest["cameras"])


def _one_round(args, server, line: LineConfig, manifest: dict, pool, workers: int) -> dict:
    """The line through the cluster without defect maps, then as set up; then the same model
    scoring the same views standalone, then the same stages standalone. The round's figures,
    its verdicts and summary."""
    client = server.access.connect()
    s = Streams(line.id)
    unmapped_s = _inspect(args, server, line.model_copy(update={"regions": "off"}), manifest)
    pipeline_s = _inspect(args, server, line, manifest)
    verdicts = [v for _, v in StreamBus(client).read(s.verdicts, Verdict)]
    views = [v for _, v in StreamBus(client).read(s.views, ProductView)]
    summary = summarize(manifest, verdicts, pipeline_s, 0)
    # The same model on the same views, standalone: the cost of scoring alone.
    products = len(views) / len(manifest["cameras"])
    standalone_pps = products / standalone_scoring_s(pool, workers, server.access, s.views)
    unmapped_pps = products / standalone_scoring_s(pool, workers, server.access, s.views, "off")
    # The same stages standalone: what Ray and Redis themselves cost.
    stages_pps = args.products / standalone_stages_s(pool, workers, line)
    figures = {
        "products_per_s": summary.products_per_s,
        "standalone_products_per_s": standalone_pps,
        "throughput_ratio": summary.products_per_s / standalone_pps,
        "stages_standalone_products_per_s": stages_pps,
        "orchestration_ratio": summary.products_per_s / stages_pps,
        "maps_cost_share": 1 - unmapped_s / pipeline_s,
        "standalone_maps_cost_share": 1 - standalone_pps / unmapped_pps,
        "exactly_one_verdict_per_product": sorted(v.product_seq for v in verdicts)
        == list(range(args.products)),
    }
    return {"figures": figures, "verdicts": verdicts, "summary": summary}


def _rounds(args, line: LineConfig, manifest: dict) -> list[dict]:
    """Rounds alternate the pipeline with standalone scoring, so that drift in the machine's
    speed (a shared host's neighbours) falls on both sides of each ratio."""
    workers = args.score_replicas
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_load_scorer,
        initargs=(str(args.out / "model"),),
    )
    # Every worker process started and its model loaded before anything is timed.
    list(pool.map(time.sleep, [1.0] * workers))
    try:
        with EmbeddedRedis(args.out / "redis") as server:
            return [
                _one_round(args, server, line, manifest, pool, workers) for _ in range(args.rounds)
            ]
    finally:
        pool.shutdown()


def _true_boxes(args, bundle, reference: Path, verdicts, summary, truth) -> dict:
    """The simulator's true boxes, scored offline by the line's model at its own threshold, and
    by the reference model (which learned from true-box crops) at its own; the gaps with their
    95 % intervals (the thresholds chosen again on each draw of the validation line's products,
    by the line's rule: one threshold for both sides when the model is held, one per model
    against the reference)."""
    line_scores = {v.product_seq: max(r.score for r in v.views) for v in verdicts if v.views}
    test_crops = ground_truth_crops(args.out / "line-test")
    gt = product_scores(ViewScorer(bundle), test_crops)
    gt_accuracy = accuracy_at(gt, truth, bundle.threshold)
    reference_bundle = load_model(reference / "model")
    ref = product_scores(ViewScorer(reference_bundle), test_crops)
    ref_accuracy = accuracy_at(ref, truth, reference_bundle.threshold)
    line_val = validation_products(bundle, args.out / "crops")
    ref_val = validation_products(reference_bundle, reference / "crops")
    line_val_scores = {q: s for q, (s, _) in line_val.items()}
    val_truth = {q: int(bad) for q, (_, bad) in line_val.items()}
    gap = accuracy_gap_interval(
        (line_val_scores, line_val_scores), val_truth, (line_scores, gt), truth
    )
    ref_val_scores = {q: s for q, (s, _) in ref_val.items()}
    ref_gap = accuracy_gap_interval(
        (line_val_scores, ref_val_scores), val_truth, (line_scores, ref), truth
    )

    def points(x: float) -> float:
        return round(100 * x, 2)

    return {
        "true_boxes_product_accuracy": gt_accuracy,
        "true_boxes_product_accuracy_hindsight": best_accuracy(
            list(gt.values()), [truth[q] for q in gt]
        ),
        "true_boxes_product_auroc": auroc(list(gt.values()), [truth[q] for q in gt]),
        "accuracy_gap_points": points(summary.product_accuracy - gt_accuracy),
        "accuracy_gap_points_ci95": [points(gap[0]), points(gap[1])],
        "reference_product_accuracy": ref_accuracy,
        "reference_product_accuracy_hindsight": best_accuracy(
            list(ref.values()), [truth[q] for q in ref]
        ),
        "reference_product_auroc": auroc(list(ref.values()), [truth[q] for q in ref]),
        "reference_accuracy_gap_points": points(summary.product_accuracy - ref_accuracy),
        "reference_accuracy_gap_points_ci95": [points(ref_gap[0]), points(ref_gap[1])],
    }


def main(argv: list[str] | None = None) -> dict:
    args = _arguments(argv)
    frame_size = parse_frame_size(args.size) if args.size else None
    args.out.mkdir(parents=True, exist_ok=True)
    reference = _train_models(args, frame_size)
    bundle = load_model(args.out / "model")
    manifest = simulate_test_line(args.data, args.out, args.products, args.seed, frame_size)
    line = line_config(
        args.out / "line-test", manifest["cameras"], ReplicaConfig(score=args.score_replicas)
    )
    # The run's views (scored again offline) and first frames (the window) are read back after
    # it: they stay in Redis for the whole bench.
    line = line.model_copy(update={"keep_processed_images_s": 7 * 24 * 3600.0})
    rounds = _rounds(args, line, manifest)
    # The median round reports; the verdicts and summary are the last round's.
    figures = [r["figures"] for r in rounds]
    median = sorted(figures, key=lambda r: r["throughput_ratio"])[len(figures) // 2]
    verdicts, summary = rounds[-1]["verdicts"], rounds[-1]["summary"]
    truth = {p["seq"]: int(p["defective"]) for p in manifest["products"]}
    result = {
        "products": args.products,
        "verdicts": summary.verdicts,
        "exactly_one_verdict_per_product": all(
            r["exactly_one_verdict_per_product"] for r in figures
        ),
        **{k: median[k] for k in median if k != "exactly_one_verdict_per_product"},
        "rounds": figures,
        "latency_p50_s": summary.latency_p50_s,
        "latency_p99_s": summary.latency_p99_s,
        "product_accuracy": summary.product_accuracy,
        "product_auroc": summary.product_auroc,
        "product_auroc_ci95": summary.product_auroc_ci95,
        "product_accuracy_hindsight": best_accuracy(
            [product_score(v) for v in verdicts], [truth[v.product_seq] for v in verdicts]
        ),
        **_true_boxes(args, bundle, reference, verdicts, summary, truth),
        "model_version": bundle.version,
        "score_replicas": args.score_replicas,
        "frame_size": [manifest["spec"]["width"], manifest["spec"]["height"]],
        "note": "pipeline window: first frame published to last verdict (Redis clock); "
        "sources not paced",
    }
    return emit(result, args.json)


if __name__ == "__main__":
    main()
