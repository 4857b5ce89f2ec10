"""Accuracy benchmark of the DifferNet scorer on a folder in MVTec AD layout (prints JSON).

The test set is split in two halves per category: one validates (epoch choice, threshold),
the other measures. Nothing chosen is chosen on the measured half.

    python -m bench.accuracy --data ../shared/data/mtd --json bench-out/accuracy.json
        [--layout strips]    # also long images of 3 to 5 tiles (bench/strips.py); the model
                             # then learns from good strips of training tiles too
        [--good-strips 1]    # how many, per training tile
        [--flow-images N]    # the flow learns from a draw of N training images, the memory all
        [--unseen-good]      # train without the other shots of the test's good tiles
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

from bench.report import emit
from workers.datasets import (
    Sample,
    list_test_samples,
    list_train_samples,
    split_stratified,
    without_shots_of,
)
from workers.differnet.config import DEFAULT_TAPS, DifferNetConfig
from workers.differnet.model import ScoredImage, TiledImage, gathered, units
from workers.differnet.recipes import evaluate_folder, load_samples, train_from_folder
from workers.differnet.store import check_model, load_model
from workers.differnet.training import TrainingOptions
from workers.images import load_image
from workers.threshold import auroc

DEFAULT = DifferNetConfig()  # the flags' defaults, and what a model's folder name leaves out


def products_auroc(
    images: list[dict], *, views: int = 4, defect_rate: float = 0.25, n: int = 4000, seed: int = 0
) -> float:
    """AUROC over products of ``views`` images, defective if any view is, from image scores.

    Products are drawn as the line simulator draws them: a defective product shows a defect in
    one view (two in a third of them), good images elsewhere; a product scores its worst view.
    Each good product has ``views`` chances of a false alarm, so this is what the scorer can
    give a line at best, whatever the cameras and the matting.
    """
    rng = random.Random(seed)
    good = [i["score"] for i in images if i["category"] == "good"]
    bad = [i["score"] for i in images if i["category"] != "good"]
    scores, labels = [], []
    for _ in range(n):
        defective = rng.random() < defect_rate
        k = rng.choice([1, 1, 2]) if defective else 0
        drawn = [rng.choice(bad) for _ in range(k)] + [rng.choice(good) for _ in range(views - k)]
        scores.append(max(drawn))
        labels.append(int(defective))
    return auroc(scores, labels)


def score_parts_auroc(bundle, images: list[dict]) -> dict:
    """AUROC of the flow alone and of the patch memory alone, on the images of ``images``,
    overall and per defect type (its images against the goods)."""
    model = bundle.model
    if not model.uses_memory:
        return {}
    samples = [Sample(Path(i["path"]), i["category"]) for i in images]
    prepared = load_samples(samples).prepared(model)
    tiles = units(prepared)
    flow = [r for i in range(0, len(tiles), 8) for r in model.flow_scores(tiles[i : i + 8])]
    memory = [ScoredImage(model.memory.score(im.for_memory)) for im in tiles]
    flow, memory = ([r.score for r in gathered(prepared, s)] for s in (flow, memory))
    kinds = [s.category for s in samples]

    def over(scores: list[float], keep) -> float:
        chosen = [(x, k) for x, k in zip(scores, kinds, strict=True) if keep(k)]
        return auroc([x for x, _ in chosen], [int(k != "good") for _, k in chosen])

    types = sorted(set(kinds) - {"good"})
    result = {}
    for name, scores in (("flow", flow), ("memory", memory)):
        result[f"image_auroc_{name}_alone"] = over(scores, lambda k: True)
        result[f"per_defect_auroc_{name}_alone"] = {
            t: over(scores, lambda k, t=t: k in ("good", t)) for t in types
        }
    return result


def _memory_arguments(p: argparse.ArgumentParser) -> None:
    """The patch memory's settings."""
    p.add_argument(
        "--memory-size",
        type=int,
        default=DEFAULT.memory_size,
        help="patch memory positions (0: the flow alone)",
    )
    p.add_argument(
        "--memory-draw",
        choices=["random", "coverage"],
        default=DEFAULT.memory_draw,
        help="how training draws the memory's positions",
    )
    p.add_argument(
        "--memory-side",
        type=int,
        default=DEFAULT.memory_side,
        help="the patch memory compares each image at this side's area in pixels",
    )
    p.add_argument(
        "--memory-border",
        choices=["zeros", "valid"],
        default=DEFAULT.memory_border,
        help="how the memory averages a position at the image's edge",
    )
    p.add_argument(
        "--memory-peak-share",
        type=float,
        default=DEFAULT.memory_peak_share,
        help="share of an image's memory score from its farthest positions (0: their mean)",
    )


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("bench-out/accuracy"))
    p.add_argument("--head", choices=["differnet", "local"], default="differnet")
    p.add_argument(
        "--backbone",
        choices=[b for b in DEFAULT_TAPS if b.startswith("efficientnet")],
        default=DEFAULT.backbone,
    )
    p.add_argument("--shots", type=int, default=None)
    p.add_argument("--tta", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--image-size", type=int, default=320)
    p.add_argument("--train-transforms", type=int, default=DEFAULT.train_transforms)
    _memory_arguments(p)
    p.add_argument(
        "--exposure-target",
        type=float,
        default=None,
        help="bring each image to this median product luminance first [as captured]",
    )
    p.add_argument(
        "--flow-images",
        type=int,
        default=None,
        help="the flow learns from a seeded draw of this many training images [all]",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--unseen-good",
        action="store_true",
        help="train without the other shots of the test's good tiles (workers/datasets.py)",
    )
    p.add_argument("--reuse", action="store_true", help="evaluate the model a previous run trained")
    p.add_argument(
        "--layout",
        choices=["tiles", "strips"],
        default="tiles",
        help="strips: also score long images of 3 to 5 measured tiles side by side",
    )
    p.add_argument(
        "--strip-light",
        choices=["captured", "matched"],
        default="captured",
        help="matched: each tile of a strip brought to the strip's median luminance",
    )
    p.add_argument(
        "--good-strips",
        type=float,
        default=1.0,
        help="good strips the strips model learns from, per training tile",
    )
    return p.parse_args(argv)


def _log(task: str, done: int, total: int) -> None:
    if done == total or done % 400 == 0 or task == "train":
        print(f"[{time.strftime('%H:%M:%S')}] {task} {done}/{total}", file=sys.stderr, flush=True)


def _trained(args, config: DifferNetConfig, val: list[Sample], model_dir: Path, data: Path):
    """The model's metadata and its training seconds: trained now, or reused with ``--reuse``."""
    if args.reuse and (model_dir / "model.json").exists():
        meta, saved, _ = check_model(model_dir)
        if saved != config:
            differ = sorted(k for k, v in config if getattr(saved, k) != v)
            sys.exit(f"--reuse: {model_dir} was trained with other {', '.join(differ)}")
        return meta, meta["training"]["train_seconds"]
    t0 = time.perf_counter()
    meta = train_from_folder(
        data,
        model_dir,
        config,
        TrainingOptions(epochs=args.epochs, seed=args.seed, flow_images=args.flow_images),
        shots=args.shots,
        validation=val,
        progress=_log,
    )
    return meta, time.perf_counter() - t0


def _training_folder(args, test: list[Sample], folder: Path) -> Path:
    """A training folder of the tiles (less the shots of the test's good tiles with
    ``--unseen-good``) and, with ``--layout strips``, good strips made of them."""
    from bench.strips import training_set

    train = list_train_samples(args.data)
    if args.unseen_good:
        train = without_shots_of(train, test)
    strips = round(len(train) * args.good_strips) if args.layout == "strips" else 0
    return training_set(train, folder, strips, args.seed, args.strip_light)


def _tta_curve(bundle, config, args, val: list[Sample], measured: list[Sample]):
    """Image AUROC and time per image at each ``--tta``; leaves the model at the default T
    (or the largest asked), which it returns with the curve."""
    val_good = load_samples([s for s in val if not s.is_defect]).prepared(bundle.model)

    def use_tta(t: int) -> None:
        # The flow's score spreads less with more transforms: standardise it for this T again.
        bundle.model.config = config.model_copy(update={"tta": t})
        if bundle.model.uses_memory:
            bundle.model.calibrate(val_good)

    curve = []
    for t in sorted(args.tta):
        use_tta(t)
        r = evaluate_folder(bundle, args.data, samples=measured, out_dir=None, pixel_metrics=False)
        point = {k: r[k] for k in ("image_auroc", "score_ms_per_image")}
        curve.append({"tta": t} | point)
        print(f"tta {t}: {curve[-1]}", file=sys.stderr, flush=True)
    best_t = DEFAULT.tta if DEFAULT.tta in args.tta else max(args.tta)
    use_tta(best_t)
    return curve, best_t


def _model_name(args) -> str:
    """The model's folder: what it was trained with, so that ``--reuse`` finds only its own."""
    name = f"model-{args.head}-{args.shots or 'all'}-k{args.train_transforms}-m{args.memory_size}"
    if args.memory_draw != "random":
        name += f"-{args.memory_draw}"
    if args.memory_side != DEFAULT.memory_side:
        name += f"-s{args.memory_side}"
    if args.memory_border != DEFAULT.memory_border:
        name += f"-b{args.memory_border}"
    if args.memory_peak_share != DEFAULT.memory_peak_share:
        name += f"-p{args.memory_peak_share:g}"
    if args.backbone != DEFAULT.backbone:
        name += "-" + args.backbone.removeprefix("efficientnet-")
    if args.exposure_target is not None:
        name += f"-e{args.exposure_target:g}"
    if args.flow_images is not None:
        name += f"-f{args.flow_images}"
    if args.unseen_good:
        name += "-unseen"
    if args.layout == "strips":
        name += "-strips"
    return name


def main(argv: list[str] | None = None) -> dict:
    args = _arguments(argv)
    torch.set_num_threads(torch.get_num_threads())
    val, measured = split_stratified(list_test_samples(args.data), 0.5, args.seed)
    config = DifferNetConfig(
        backbone=args.backbone,
        head=args.head,
        image_size=args.image_size,
        train_transforms=args.train_transforms,
        memory_size=args.memory_size,
        memory_draw=args.memory_draw,
        memory_side=args.memory_side,
        memory_border=args.memory_border,
        memory_peak_share=args.memory_peak_share,
        exposure_target=args.exposure_target,
    )
    name = _model_name(args)
    data = args.data
    if args.layout == "strips" or args.unseen_good:
        data = _training_folder(args, val + measured, args.out / f"train-{name}-{args.seed}")
    if args.layout == "strips":
        from bench.strips import build_strips

        val_strips = args.out / f"strips-val-{args.seed}"
        val = val + build_strips(val, val_strips, args.seed, args.strip_light)
    model_dir = args.out / name
    meta, train_seconds = _trained(args, config, val, model_dir, data)
    print(f"[{time.strftime('%H:%M:%S')}] trained: {meta['metrics']}", file=sys.stderr, flush=True)
    bundle = load_model(model_dir)
    curve, best_t = _tta_curve(bundle, config, args, val, measured)
    # The full evaluation (pixel AUROC needs a backward pass per image) runs at the default T.
    sources = ["memory", "gradient"] if bundle.model.uses_memory else None
    full = evaluate_folder(
        bundle,
        args.data,
        samples=measured,
        out_dir=args.out / f"eval-{args.head}",
        map_sources=sources,
    )
    result = {
        "data": str(args.data),
        "memory_size": args.memory_size,
        "memory_draw": args.memory_draw,
        "memory_side": args.memory_side,
        "memory_border": args.memory_border,
        "memory_peak_share": args.memory_peak_share,
        "head": args.head,
        "backbone": args.backbone,
        "shots": args.shots,
        "n_train": meta["training"]["n_images"],
        "unseen_good": args.unseen_good,
        "flow_images": meta["training"].get("flow_images"),
        "n_val": len(val),
        "n_measured": len(measured),
        "epochs": args.epochs,
        "best_epoch": meta["training"]["best_epoch"],
        "image_size": args.image_size,
        "train_transforms": args.train_transforms,
        "tta": best_t,
        "image_auroc": full["image_auroc"],
        "per_defect_auroc": full["per_defect_auroc"],
        "pixel_auroc": full.get("pixel_auroc"),
        "pixel_aupro": full.get("pixel_aupro"),
        "map_source": bundle.model.map_source,
        "pixel_by_map_source": full.get("pixel"),
        "accuracy_at_model_threshold": full["model_threshold_accuracy"],
        "train_seconds": round(train_seconds, 1),
        "embed_seconds": meta["training"]["embed_seconds"],
        "score_ms_per_image": full["score_ms_per_image"],
        "auroc_vs_tta": curve,
        **score_parts_auroc(bundle, full["images"]),
        "product_auroc_4_views": products_auroc(full["images"], seed=args.seed),
        "torch_threads": torch.get_num_threads(),
        "device": str(bundle.model.device),
    }
    if args.layout == "strips":
        result["strips"] = _strips(bundle, args, measured)
    return emit(result, args.json)


def _strips(bundle, args, measured: list[Sample]) -> dict:
    """Image (and pixel) metrics on strips built from the measured half only."""
    from bench.strips import build_strips

    out = args.out / f"strips-{args.seed}"
    strips = build_strips(measured, out, args.seed, args.strip_light)
    # The model's own maps only: a gradient map of every tile of every strip takes an hour here.
    r = evaluate_folder(bundle, out, samples=strips, out_dir=None)
    keys = ("image_auroc", "per_defect_auroc", "pixel_auroc", "pixel_aupro", "score_ms_per_image")
    tiled = sum(isinstance(bundle.model.prepare(load_image(s.path)), TiledImage) for s in strips)
    return (
        {k: r.get(k) for k in keys}
        | score_parts_auroc(bundle, r["images"])
        | {"n_strips": len(strips), "n_tiled": tiled, "pixel": r.get("pixel")}
    )


if __name__ == "__main__":
    main()
