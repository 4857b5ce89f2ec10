"""Train, evaluate and score from folders: what the CLI and the benchmarks call."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workers.contract import CropSpec
from workers.datasets import Sample, fingerprint, list_test_samples, list_train_samples
from workers.devices import choose_device
from workers.differnet.config import DifferNetConfig
from workers.differnet.model import (
    EMBED_CHUNK,
    EQUAL_SHARES,
    DifferNet,
    Evidence,
    Prepared,
    ScoredImage,
    fused,
    gathered,
    units,
)
from workers.differnet.regions import GOOD_PIXEL_SHARE, region_threshold
from workers.differnet.store import ModelBundle, save_feature_cache, save_model
from workers.differnet.training import (
    Progress,
    TrainingOptions,
    _no_progress,
    build_memory,
    embed_training_set,
    train_flow,
)
from workers.images import ImageError, load_with_alpha
from workers.threshold import auroc, target_tpr_threshold

# The flow's shares of the fused score validation chooses among, and the labelled validation
# images of each class it needs to choose: with fewer, one image moves the AUROC by more than
# the shares differ.
FLOW_SHARES = tuple(i / 10 for i in range(11))
SHARE_MIN_PER_CLASS = 10

# on_skip(path, reason): one unreadable file is reported and skipped, never fatal.
OnSkip = Callable[[Path, str], None]


def _ignore(path: Path, reason: str) -> None:
    pass


@dataclass
class Loaded:
    samples: list[Sample]
    rgb: list[np.ndarray]
    alpha: list[np.ndarray | None]  # an RGBA image's alpha marks the product (matted crops)

    def prepared(self, model: DifferNet) -> list[Prepared]:
        return [model.prepare(rgb, alpha) for rgb, alpha in zip(self.rgb, self.alpha, strict=True)]

    def prepared_on_use(self, model: DifferNet) -> PreparedOnUse:
        return PreparedOnUse(model, self)

    def drawn(self, n: int | None, seed: int) -> Loaded:
        """A seeded draw of ``n`` of these images in their order (all of them where ``n`` is None
        or not fewer); the arrays are shared, not copied."""
        if n is None or n >= len(self.rgb):
            return self
        keep = sorted(np.random.default_rng(seed).choice(len(self.rgb), n, replace=False))
        columns = (self.samples, self.rgb, self.alpha)
        return Loaded(*([column[i] for i in keep] for column in columns))


class PreparedOnUse(Sequence[Prepared]):
    """The loaded images, each prepared when it is read and dropped after: what training reads.

    A prepared view holds about 2 MB of float tensors (the input square, its mask, the memory's
    image), its source image a few tenths of a MB; a training set of thousands of views, or long
    parts cut into many tiles each, would not fit in memory prepared all at once. Training reads
    the set twice (embedding, the memory's draw), and preparing is cheap beside embedding.
    """

    def __init__(self, model: DifferNet, loaded: Loaded):
        self._model = model
        self._loaded = loaded

    def __len__(self) -> int:
        return len(self._loaded.rgb)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._model.prepare(self._loaded.rgb[index], self._loaded.alpha[index])

    def unit_count(self) -> int:
        """How many views the images make (their tiles, or themselves), counted from their
        sizes: the memory's even draw needs it before it reads them."""
        pairs = zip(self._loaded.rgb, self._loaded.alpha, strict=True)
        return sum(self._model.unit_count(rgb.shape[:2], alpha) for rgb, alpha in pairs)


def load_samples(samples: list[Sample], on_skip: OnSkip = _ignore) -> Loaded:
    loaded = Loaded([], [], [])
    for s in samples:
        try:
            rgb, alpha = load_with_alpha(s.path)
        except ImageError as exc:
            on_skip(s.path, str(exc))
            continue
        loaded.samples.append(s)
        loaded.rgb.append(rgb)
        loaded.alpha.append(alpha)
    return loaded


def train_from_folder(
    data_dir: Path,
    out: Path,
    config: DifferNetConfig,
    options: TrainingOptions,
    *,
    crops: CropSpec = CropSpec(),
    backbone_weights: Path | None = None,
    shots: int | None = None,
    validation: list[Sample] | None = None,
    target_tpr: float = 0.85,
    product_of: Callable[[Sample], Hashable] | None = None,
    progress: Progress = _no_progress,
    on_skip: OnSkip = _ignore,
) -> dict:
    """Train on DATA_DIR/train/good; validate (epoch choice, threshold) on ``validation``.

    ``validation`` defaults to DATA_DIR/test when it exists. ``crops``: how a line's front end
    cut the images (the model's input contract). ``product_of``: which product a validation
    image is a view of; the threshold is then chosen on products (each its highest view score,
    defective if any view is), as a line judges them: a view-level threshold gives each good
    product one chance per view to raise a false alarm. Returns the saved metadata.
    """
    torch.manual_seed(options.seed)
    model = DifferNet(config, backbone_weights).to(choose_device(options.device))
    train = load_samples(list_train_samples(data_dir, shots, options.seed), on_skip)
    if not train.rgb:
        raise ValueError(f"{data_dir}: no readable training image")
    if validation is None:
        validation = list_test_samples(data_dir)
    val = load_samples(validation, on_skip)
    val_images = val.prepared(model)
    val_labels = [int(s.is_defect) for s in val.samples]
    train_images = train.prepared_on_use(model)
    t0 = time.perf_counter()
    flow_images = train.drawn(options.flow_images, options.seed)
    cache = embed_training_set(model, flow_images.prepared_on_use(model), options, progress)
    validated = (val_images, val_labels) if val_images else None
    report = train_flow(model, cache, options, validated, progress, started=t0)
    if config.memory_size:
        build_memory(model, train_images, options, progress)
    calibration, regions, val_scores = held_out_rules(model, val_images, val_labels, train_images)
    checked = (val.samples, val_images, val_scores) if val_images else None
    chosen, metrics, on = _threshold(model, checked, train_images, target_tpr, product_of)
    metadata = save_model(
        model,
        out,
        threshold=chosen.value,
        crops=crops,
        backbone_weights=backbone_weights,
        extra={
            "threshold_rule": chosen.to_dict() | {"source": on.source},
            "metrics": metrics,
            "calibration": calibration,
            "regions": regions,
            "training": {
                "data_dir": str(data_dir),
                "fingerprint": fingerprint(train.samples),
                "n_images": len(train.samples),
                "flow_images": len(flow_images.samples),
                "shots": shots,
                **_run_record(options, report, time.perf_counter() - t0),
            },
        },
    )
    if config.head == "differnet":
        save_feature_cache(out, cache)
    if val_images:
        from workers.differnet.reports import roc_plot

        roc_plot(on.scores, on.labels, Path(out) / "roc.png", chosen.value, on.source)
    return metadata


@dataclass
class _ChosenOn:
    """What a threshold was chosen on: scores, their labels, and what they are of."""

    source: str
    scores: list[float]
    labels: list[int]


def _threshold(
    model: DifferNet, checked, train_images: Sequence[Prepared], target_tpr: float, product_of
):
    """The threshold by the ZeroBox rule on the validation (samples, images, their scores if
    drawn already), per product with ``product_of``; the validation metrics, and what the
    threshold was chosen on."""
    if checked is None:
        # No validation data: bound false alarms by the training goods (optimistic, says so).
        scores = [r.score for r in score_images(model, train_images)]
        on = _ChosenOn("training goods", scores, [0] * len(scores))
        return target_tpr_threshold(on.scores, on.labels, target_tpr), {}, on
    samples, images, scores = checked
    labels = [int(s.is_defect) for s in samples]
    scores = scores or [r.score for r in score_images(model, images)]
    metrics = {"val_auroc": auroc(scores, labels), "n_val": len(scores)}
    on = _ChosenOn("validation", scores, labels)
    if product_of is not None:
        on = _ChosenOn("validation products", *_products(samples, scores, product_of))
        metrics["n_val_products"] = len(on.scores)
    return target_tpr_threshold(on.scores, on.labels, target_tpr), metrics, on


def _products(samples: list[Sample], scores: list[float], product_of) -> tuple[list, list]:
    """Each product's highest view score, and 1 where any of its views is defective."""
    products: dict = {}
    for sample, score in zip(samples, scores, strict=True):
        best, bad = products.get(product_of(sample), (float("-inf"), False))
        products[product_of(sample)] = (max(best, score), bad or sample.is_defect)
    return [v[0] for v in products.values()], [int(v[1]) for v in products.values()]


def _maps_report(model, loaded, prepared, scores, masked, out_dir, worst, chosen, sources):
    """Pixel AUROC and AUPRO of the maps of each of ``sources`` over the images with masks (and
    the goods), overall and per defect type; in ``out_dir`` the ROC and the default maps of the
    ``worst`` highest-scored images."""
    from workers.differnet.reports import overlay_png, pixel_metrics, roc_plot

    order = np.argsort(-scores)
    shown = set(order[:worst].tolist()) if out_dir is not None else set()
    with_masks = any(loaded.samples[i].mask_path for i in masked)
    report: dict = {"pixel": {}}
    maps: dict[int, np.ndarray] = {}
    for source in sources:
        need = sorted((set(masked) if with_masks else set()) | shown)
        drawn = {i: model.defect_maps([prepared[i]], source)[0].defect_map for i in need}
        if source == model.map_source:
            maps = drawn
        if with_masks:
            report["pixel"][source] = _pixel_report(loaded.samples, masked, drawn, pixel_metrics)
    if model.map_source in report["pixel"]:
        default = report["pixel"][model.map_source]
        report |= {"pixel_auroc": default["auroc"], "pixel_aupro": default["aupro"]}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        labels = np.array([int(s.is_defect) for s in loaded.samples])
        roc_plot(scores, labels, out_dir / "roc.png", chosen.value, "test")
        for rank, i in enumerate(order[:worst]):
            s = loaded.samples[i]
            name = f"worst{rank + 1:02d}_{s.category}_{s.path.stem}.png"
            (out_dir / name).write_bytes(overlay_png(loaded.rgb[i], maps[i]))
    return report


def _pixel_report(samples, masked: list[int], maps: dict, pixel_metrics) -> dict:
    """Pixel metrics over every masked image, then per defect type (with the goods)."""

    def over(chosen: list[int]) -> dict:
        return pixel_metrics([maps[i] for i in chosen], [samples[i].mask_path for i in chosen])

    good = [i for i in masked if not samples[i].is_defect]
    types = sorted({samples[i].category for i in masked} - {"good"})
    per_defect = {t: over(good + [i for i in masked if samples[i].category == t]) for t in types}
    return over(masked) | {"per_defect": per_defect}


def _run_record(options: TrainingOptions, report, seconds: float) -> dict:
    """How a training ran, for the model's metadata."""
    return {
        "epochs": options.epochs,
        "best_epoch": report.best_epoch,
        "batch_size": options.batch_size,
        "lr": options.lr,
        "seed": options.seed,
        "embed_seconds": round(report.embed_seconds, 2),
        "train_seconds": round(seconds, 2),
        "history": report.history,
    }


def _held_out_goods(good_val: list, train_images: Sequence[Prepared]):
    """Good images the model is standardised and thresholded on: the validation goods, else the
    training images, each against the others' positions (held out in effect, and optimistic for
    the flow, which learned them: said in the metadata). Their units' memory owners (None for
    validation goods), and which they are."""
    if len(good_val) >= 2:
        return good_val, None, "validation goods"
    held = list(train_images)  # read three times here: prepared once
    return held, list(range(len(units(held)))), "training goods"


def held_out_rules(
    model: DifferNet, val_images: list, val_labels: list, train_images: Sequence[Prepared]
):
    """The calibration (memory models) and the region rule, from held-out good images; and
    the validation images' scores where they come with them: a memory model with validation
    goods draws every validation tile's evidence once, for all three."""
    good = [im for im, label in zip(val_images, val_labels, strict=True) if label == 0]
    if not (model.uses_memory and model.map_source == "memory" and len(good) >= 2):
        held, owners, source = _held_out_goods(good, train_images)
        calibration = None
        if model.uses_memory:
            model.flow_share.fill_(EQUAL_SHARES)
            calibration = model.calibrate(held, owners=owners) | {
                "source": source,
                "n": len(held),
                "flow_share": EQUAL_SHARES,
                "flow_share_rule": "equal: no validation evidence drawn",
            }
        return calibration, region_rule(model, held, source, owners), None
    tiles = units(val_images)
    image_of_unit = [i for i, im in enumerate(val_images) for _ in units([im])]
    is_good = [val_labels[i] == 0 for i in image_of_unit]
    evidence = model.evidence(tiles)
    calibration = model.calibrate_on([e for e, g in zip(evidence, is_good, strict=True) if g])
    calibration |= choose_flow_share(model, evidence, image_of_unit, val_labels)
    scored = [model.scored(e) for e in evidence]
    maps = [r.defect_map for r, g in zip(scored, is_good, strict=True) if g]
    source = "validation goods"
    return (
        calibration | {"source": source, "n": len(good)},
        _region_record(model, maps, source, len(good)),
        [r.score for r in gathered(val_images, scored)],
    )


def choose_flow_share(
    model: DifferNet, evidence: list[Evidence], image_of_unit: list[int], labels: list[int]
) -> dict:
    """The flow's share of the fused score (:func:`best_flow_share` on the validation units'
    evidence, standardised by the model's calibration); set on the model, and how it was
    chosen, for the metadata."""
    flow_z, memory_z = model.standardised(
        np.array([e.flow for e in evidence]),
        np.array([model.memory.score_of_map(e.cells) for e in evidence]),
    )
    share, rule = best_flow_share(flow_z, memory_z, image_of_unit, labels)
    model.flow_share.fill_(share)
    return {"flow_share": share, "flow_share_rule": rule}


def best_flow_share(
    flow_z: np.ndarray, memory_z: np.ndarray, image_of_unit: list[int], labels: list[int]
) -> tuple[float, str]:
    """The share in :data:`FLOW_SHARES` whose fused score ranks the labelled images best (image
    AUROC, each image its worst unit), the one nearest equal shares among ties; equal shares
    where fewer than :data:`SHARE_MIN_PER_CLASS` images of either class would make the choice
    noise. Returns it with the rule that gave it."""
    labels_arr = np.asarray(labels)
    n_defective = int(labels_arr.sum())
    n_good = len(labels_arr) - n_defective
    if min(n_good, n_defective) < SHARE_MIN_PER_CLASS:
        return EQUAL_SHARES, (
            f"equal: {n_good} good and {n_defective} defective validation images, "
            f"{SHARE_MIN_PER_CLASS} of each needed to choose"
        )
    owner = np.asarray(image_of_unit)
    aurocs = {}
    for share in FLOW_SHARES:
        per_image = np.full(len(labels_arr), -np.inf)
        np.maximum.at(per_image, owner, fused(flow_z, memory_z, share))
        aurocs[share] = auroc(per_image, labels_arr)
    best = max(aurocs.values())
    share = min((s for s, a in aurocs.items() if a == best), key=lambda s: abs(s - EQUAL_SHARES))
    equal = aurocs[EQUAL_SHARES]
    return share, f"best validation image AUROC: {best:.4f} (equal shares: {equal:.4f})"


def region_rule(model: DifferNet, good: list, source: str, owners: list[int] | None = None):
    """The region threshold from the maps of ``good`` images (tile by tile), and how it was
    chosen. ``owners``: as for :meth:`DifferNet.calibrate`, when ``good`` are the training
    images."""
    tiles = units(good)
    owners = owners or [None] * len(tiles)
    maps = [
        r.defect_map
        for i in range(0, len(tiles), EMBED_CHUNK)
        for r in model.defect_maps(tiles[i : i + EMBED_CHUNK], owners=owners[i : i + EMBED_CHUNK])
    ]
    return _region_record(model, maps, source, len(good))


def _region_record(model: DifferNet, maps: list, source: str, n: int) -> dict:
    return {
        "threshold": region_threshold(maps),
        "rule": f"{GOOD_PIXEL_SHARE:.1%} of good pixels above",
        "map_source": model.map_source,
        "source": source,
        "n": n,
    }


def defect_map_overlay(bundle: ModelBundle, image_path: Path) -> bytes:
    """PNG of the image beside its defect map (heat overlay); the alpha of a matted crop counts."""
    from workers.differnet.reports import overlay_png

    rgb, alpha = load_with_alpha(image_path)
    result = bundle.model.defect_maps([bundle.model.prepare(rgb, alpha)])[0]
    return overlay_png(rgb, result.defect_map)


def score_images(model: DifferNet, images: Sequence[Prepared], batch: int = 8) -> list[ScoredImage]:
    out: list[ScoredImage] = []
    for i in range(0, len(images), batch):
        out += model.score_batch(images[i : i + batch])
    return out


def evaluate_folder(
    bundle: ModelBundle,
    data_dir: Path,
    *,
    target_tpr: float = 0.85,
    out_dir: Path | None = None,
    worst: int = 8,
    samples: list[Sample] | None = None,
    pixel_metrics: bool = True,
    map_sources: list[str] | None = None,
    progress: Progress = _no_progress,
    on_skip: OnSkip = _ignore,
) -> dict:
    """Image (and pixel, with masks) metrics on DATA_DIR/test, or on ``samples`` when given.

    Pixel AUROC and AUPRO need a defect map per image (the gradient's: a backward pass each):
    ``pixel_metrics=False`` skips them. ``map_sources``: which maps are measured (default: the
    model's own).
    """
    samples = list_test_samples(data_dir) if samples is None else samples
    if not samples:
        raise ValueError(f"{data_dir}: no test images (expected DATA_DIR/test/<category>/*)")
    loaded = load_samples(samples, on_skip)
    model = bundle.model
    prepared = loaded.prepared(model)
    labels = np.array([int(s.is_defect) for s in loaded.samples])
    t0 = time.perf_counter()
    results: list[ScoredImage] = []
    for i in range(0, len(prepared), 8):
        results += model.score_batch(prepared[i : i + 8])
        progress("score", len(results), len(prepared))
    ms = (time.perf_counter() - t0) * 1000 / max(1, len(prepared))
    scores = np.array([r.score for r in results])

    per_defect = {}
    good = labels == 0
    for category in sorted({s.category for s in loaded.samples} - {"good"}):
        sel = good | np.array([s.category == category for s in loaded.samples])
        per_defect[category] = auroc(scores[sel], labels[sel])
    chosen = target_tpr_threshold(scores, labels, target_tpr)
    report = {
        "image_auroc": auroc(scores, labels),
        "per_defect_auroc": per_defect,
        "n_good": int(good.sum()),
        "n_defect": int((~good).sum()),
        "n_skipped": len(samples) - len(loaded.samples),
        "threshold": chosen.value,
        "threshold_rule": chosen.rule,
        "tpr": chosen.tpr,
        "fpr": chosen.fpr,
        "accuracy": chosen.accuracy,
        "model_threshold": bundle.threshold,
        "model_threshold_accuracy": float(np.mean((scores >= bundle.threshold) == (labels == 1))),
        "score_ms_per_image": round(ms, 2),
        "tta": model.config.tta,
        "head": model.config.head,
        "model_version": bundle.version,
        "images": [
            {"path": str(s.path), "category": s.category, "score": float(score)}
            for s, score in zip(loaded.samples, scores, strict=True)
        ],
    }
    masked = [i for i, s in enumerate(loaded.samples) if s.mask_path or not s.is_defect]
    if not pixel_metrics:
        masked = []
    if out_dir is not None or any(loaded.samples[i].mask_path for i in masked):
        sources = [model.map_source] + [m for m in map_sources or [] if m != model.map_source]
        report |= _maps_report(
            model, loaded, prepared, scores, masked, out_dir, worst, chosen, sources
        )
    return report
