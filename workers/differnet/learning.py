"""Retraining a line's model from QA-labelled products, and judging the candidate.

The candidate learns from the parent's training set (its cached features: only the new images
run through the backbone) plus the views QA labelled good. It is judged against the parent on
the same held-out labelled products, each scored as its worst view (the line's own rule: a
product is defective if any view is), with the threshold of each chosen by the target-TPR rule.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from workers.contract import InputContract
from workers.datasets import Sample, list_train_samples
from workers.devices import choose_device
from workers.differnet.model import DifferNet
from workers.differnet.recipes import (
    Loaded,
    OnSkip,
    _ignore,
    held_out_rules,
    load_samples,
    score_images,
)
from workers.differnet.store import (
    ModelBundle,
    load_feature_cache,
    load_model,
    save_feature_cache,
    save_model,
)
from workers.differnet.training import (
    Progress,
    TrainingOptions,
    _no_progress,
    embed_training_set,
    memory_pool,
    train_flow,
)
from workers.qa.samples import SampleError, SampleStore
from workers.threshold import auroc, target_tpr_threshold

# A candidate may lose this much validation AUROC to the parent (noise on small validation sets).
AUROC_TOLERANCE = 0.01


class RetrainError(ValueError):
    """Retraining cannot start: the message says what is missing."""


@dataclass(frozen=True)
class LabelledProduct:
    """A held-out product: its views' crops and QA's label (1 = defective)."""

    product_id: str
    views: tuple[Path, ...]
    label: int


@dataclass
class Judgement:
    candidate: dict
    parent: dict
    publishable: bool
    reason: str


@dataclass
class RetrainResult:
    metadata: dict
    judgement: Judgement
    retrain_seconds: float
    history: list[dict] = field(default_factory=list)


def is_held_out(product_id: str, holdout: float) -> bool:
    """A fixed share of labelled good products validates instead of training (stable per id)."""
    return zlib.crc32(product_id.encode()) % 1000 < holdout * 1000


@dataclass
class LabelledPool:
    train_views: dict[str, list[Path]]  # product id -> its views labelled good, for training
    validation: list[LabelledProduct]

    @property
    def n_train_views(self) -> int:
        return sum(len(v) for v in self.train_views.values())


def gather_labelled(
    labels: dict[str, str], store: SampleStore, holdout: float, used: set[str]
) -> LabelledPool:
    """Sort QA's labels into training views and validation products.

    ``labels`` maps ``product_id`` or ``product_id/camera`` to ``good``/``defect``. A product
    labelled defective (or with a view so labelled) validates; a product labelled good validates
    if held out, else its views train; a view labelled good trains. Products in ``used`` (already
    learned by the active model) and products no longer in the store are left out.
    """
    by_product: dict[str, dict[str | None, str]] = {}
    for key, value in labels.items():
        product_id, _, camera = key.partition("/")
        by_product.setdefault(product_id, {})[camera or None] = value
    train: dict[str, list[Path]] = {}
    validation: list[LabelledProduct] = []
    for product_id, marks in sorted(by_product.items()):
        try:
            stored = store.product(product_id)
        except (SampleError, ValueError):
            continue
        views = {c: stored.view_path(c) for c in stored.cameras}
        if not views:
            continue
        if "defect" in marks.values():
            validation.append(LabelledProduct(product_id, tuple(views.values()), 1))
            continue
        if marks.get(None) == "good" and is_held_out(product_id, holdout):
            validation.append(LabelledProduct(product_id, tuple(views.values()), 0))
            continue
        if product_id in used:
            continue
        good = [path for c, path in views.items() if marks.get(c, marks.get(None)) == "good"]
        if good:
            train[product_id] = good
    return LabelledPool(train, validation)


def validation_views(
    products: list[LabelledProduct], on_skip: OnSkip = _ignore
) -> tuple[Loaded, list[int]]:
    """The held-out products' views that read, and the product (its index) of each; a product
    none of whose views reads is an error."""
    loaded = load_samples(
        [Sample(v, "defect" if p.label else "good") for p in products for v in p.views], on_skip
    )
    product_of = {v: i for i, p in enumerate(products) for v in p.views}
    owners = [product_of[s.path] for s in loaded.samples]
    unread = sorted(set(range(len(products))) - set(owners))
    if unread:
        raise RetrainError(f"{products[unread[0]].product_id}: none of its views could be read")
    return loaded, owners


def product_scores(view_scores: list[float], owners: list[int]) -> np.ndarray:
    """Each product's worst (highest) view score."""
    out = np.full(max(owners) + 1, -np.inf)
    np.maximum.at(out, owners, view_scores)
    return out


def operating_point(scores: np.ndarray, labels: list[int], target_tpr: float) -> dict:
    chosen = target_tpr_threshold(scores, labels, target_tpr)
    return {
        "val_auroc": auroc(scores, labels),
        "threshold": chosen.value,
        "tpr": chosen.tpr,
        "fpr": chosen.fpr,
        "accuracy": chosen.accuracy,
        "n_val": len(labels),
    }


def judge(candidate: dict, parent: dict) -> Judgement:
    """Publishable unless worse than the parent on the same validation products.

    Worse: more false alarms at the target recall, or an AUROC lower by more than
    :data:`AUROC_TOLERANCE`.
    """
    if candidate["fpr"] > parent["fpr"]:
        return Judgement(
            candidate,
            parent,
            False,
            f"more false alarms at the target recall than the active model "
            f"(FPR {candidate['fpr']:.3f} > {parent['fpr']:.3f})",
        )
    if candidate["val_auroc"] < parent["val_auroc"] - AUROC_TOLERANCE:
        return Judgement(
            candidate,
            parent,
            False,
            f"validation AUROC {candidate['val_auroc']:.3f} is below the active model's "
            f"{parent['val_auroc']:.3f}",
        )
    return Judgement(
        candidate,
        parent,
        True,
        f"FPR {candidate['fpr']:.3f} (active {parent['fpr']:.3f}), "
        f"AUROC {candidate['val_auroc']:.3f} (active {parent['val_auroc']:.3f})",
    )


def parent_features(parent_dir: Path, parent: ModelBundle, options: TrainingOptions, progress):
    """The parent's training features: its cache, else its training folder embedded again (the
    images its flow learnt from: all, or the same draw)."""
    cache = load_feature_cache(parent_dir, parent.model.feature_dim)
    if cache is not None:
        return cache
    training = parent.metadata.get("training", {})
    data_dir = Path(training.get("data_dir", ""))
    if not (data_dir / "train" / "good").is_dir():
        raise RetrainError(
            f"{parent_dir}: no feature cache and its training data ({data_dir}) is gone"
        )
    loaded = load_samples(list_train_samples(data_dir))
    loaded = loaded.drawn(training.get("flow_images"), training.get("seed", 0))
    return embed_training_set(parent.model, loaded.prepared_on_use(parent.model), options, progress)


def retrain(
    parent_dir: Path,
    out: Path,
    new_good: list[Path],
    validation: list[LabelledProduct],
    *,
    mode: Literal["finetune", "scratch"] = "finetune",
    options: TrainingOptions | None = None,
    target_tpr: float = 0.85,
    progress: Progress = _no_progress,
    on_skip: OnSkip = _ignore,
) -> RetrainResult:
    """Train a candidate from the model in ``parent_dir`` plus ``new_good`` crops; judge it."""
    t0 = time.perf_counter()
    options = options or TrainingOptions(epochs=10 if mode == "finetune" else 40)
    labels = _check_pool(new_good, validation)
    views, owners = validation_views(validation, on_skip)
    if [s.is_defect for s in views.samples].count(False) < 2:
        # The scores are standardised on the held-out good views: one has no spread.
        raise RetrainError("validation needs at least two readable views of good products")
    device = choose_device(options.device)
    parent = load_model(parent_dir, device=device)
    if parent.model.config.head != "differnet":
        raise RetrainError("retraining supports the pooled (differnet) head")
    old = parent_features(parent_dir, parent, options, progress)

    model = DifferNet(parent.model.config, _backbone_weights(parent)).to(device)
    if mode == "finetune":
        model.load_trainable_state(parent.model.trainable_state())
    loaded = load_samples([Sample(p, "good") for p in new_good], on_skip)
    if not loaded.rgb:
        raise RetrainError("none of the new good views could be read")
    new_images = loaded.prepared_on_use(model)
    new = embed_training_set(model, new_images, options, progress)
    cache = torch.cat([old.float(), new])
    report = train_flow(model, cache, options, None, progress, fine_tune=mode == "finetune")
    n_parent = int(parent.metadata.get("training", {}).get("n_images") or 0)
    n_images = n_parent + len(loaded.rgb)
    if model.uses_memory:
        share = len(loaded.rgb) / max(1, n_images)
        _extend_memory(model, parent, new_images, share, options, progress)
    model.eval()
    calibration, regions, candidate_point, parent_point = _held_out_rules_and_points(
        model, parent.model, views, owners, labels, target_tpr
    )
    judgement = judge(candidate_point, parent_point)
    metadata = save_model(
        model,
        out,
        threshold=candidate_point["threshold"],
        # The new views were cut by the line's front end, as the parent's were.
        crops=contract.crops if (contract := InputContract.of(parent.metadata)) else None,
        backbone_weights=_backbone_weights(parent),
        extra={
            "threshold_rule": {"rule": f"target-tpr {target_tpr:g}", "source": "QA labels"},
            "metrics": {k: v for k, v in candidate_point.items() if v is not None},
            "calibration": calibration,
            "regions": regions,
            "parent": parent.version,
            "training": {
                "data_dir": parent.metadata.get("training", {}).get("data_dir"),
                "mode": mode,
                "n_parent_features": len(old),
                "n_new_good": len(loaded.rgb),
                "n_images": n_images,
                "epochs": options.epochs,
                "train_seconds": round(report.train_seconds, 2),
                "history": report.history,
            },
            "judgement": {
                "publishable": judgement.publishable,
                "reason": judgement.reason,
                "parent_metrics": parent_point,
            },
        },
    )
    save_feature_cache(out, cache)
    return RetrainResult(metadata, judgement, time.perf_counter() - t0, report.history)


def _held_out_rules_and_points(
    model: DifferNet,
    parent: DifferNet,
    views: Loaded,
    owners: list[int],
    labels: list[int],
    target_tpr: float,
) -> tuple[dict | None, dict, dict, dict]:
    """The candidate's calibration and region rule from the held-out good views, and the
    candidate's and the parent's operating points on the held-out products. The candidate has
    the parent's config, so the views are prepared once for both; the candidate draws each
    view's evidence once where it can serve all three (``held_out_rules``)."""
    images = views.prepared(model)
    view_labels = [int(s.is_defect) for s in views.samples]
    calibration, regions, view_scores = held_out_rules(model, images, view_labels, [])
    if view_scores is None:
        view_scores = [r.score for r in score_images(model, images)]
    parent_scores = [r.score for r in score_images(parent, images)]
    return (
        calibration,
        regions,
        operating_point(product_scores(view_scores, owners), labels, target_tpr),
        operating_point(product_scores(parent_scores, owners), labels, target_tpr),
    )


def _check_pool(new_good: list[Path], validation: list[LabelledProduct]) -> list[int]:
    """The validation products' labels, once there is something to learn and to judge by."""
    if not new_good:
        raise RetrainError("no new good views to learn from")
    labels = [p.label for p in validation]
    if len(set(labels)) < 2:
        raise RetrainError(
            "validation needs labelled good and labelled defective products held out from "
            f"training (have {labels.count(0)} good, {labels.count(1)} defective)"
        )
    return labels


def _extend_memory(model, parent, new_images, share, options, progress) -> None:
    """The parent's memory, standing for its training images, with the new views' share added
    (both scores are then standardised again on the held-out good views)."""
    model.memory.adopt(parent.model.memory)
    pool, _ = memory_pool(model, new_images, options, progress)
    model.memory.extend(pool, share, model.config.memory_size, options.seed)


def _backbone_weights(bundle: ModelBundle) -> Path | None:
    path = bundle.metadata.get("backbone_weights")
    return Path(path) if path else None
