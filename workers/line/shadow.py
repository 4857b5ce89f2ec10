"""Comparing a shadow (candidate) model with the active one on the same views."""

from __future__ import annotations

from schemas import ViewScore
from workers.qa.report import product_truth
from workers.threshold import auroc


def compare_scores(
    active: list[ViewScore], shadow: list[ViewScore], labels: dict[str, str]
) -> dict:
    """Agreement on the views both scored, and each model's quality on labelled products.

    Products are judged as the line does: defective if any view is over its threshold.
    """
    by_view = {(s.product_id, s.camera): s for s in active}
    pairs = [(by_view[k], s) for s in shadow if (k := (s.product_id, s.camera)) in by_view]
    report: dict = {
        "n_views": len(pairs),
        "active_versions": sorted({a.model_version for a, _ in pairs}),
        "shadow_versions": sorted({s.model_version for _, s in pairs}),
        "agreement": (sum(a.is_defect == s.is_defect for a, s in pairs) / len(pairs))
        if pairs
        else None,
        "active_defect_rate": _rate([a.is_defect for a, _ in pairs]),
        "shadow_defect_rate": _rate([s.is_defect for _, s in pairs]),
    }
    products: dict[str, dict[str, list[ViewScore]]] = {}
    for a, s in pairs:
        entry = products.setdefault(a.product_id, {"active": [], "shadow": []})
        entry["active"].append(a)
        entry["shadow"].append(s)
    truth = {p: t for p in products if (t := product_truth(p, labels)) is not None}
    report["n_labelled_products"] = len(truth)
    for name in ("active", "shadow"):
        margins = [max(v.score - v.threshold for v in products[p][name]) for p in truth]
        called = [m >= 0 for m in margins]
        labels_list = list(truth.values())
        defects = [c for c, t in zip(called, labels_list, strict=True) if t == 1]
        goods = [c for c, t in zip(called, labels_list, strict=True) if t == 0]
        report[f"{name}_auroc"] = auroc(margins, labels_list) if truth else None
        report[f"{name}_recall"] = _rate(defects)
        report[f"{name}_false_alarm_rate"] = _rate(goods)
    return report


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None
