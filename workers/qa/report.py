"""A line's QA report as one self-contained HTML file: score distributions, ROC from labelled
products, the operating point, and the worst defects with their maps.

Plain Python over plain data (verdicts as dicts, labels, image bytes): the CLI gathers them from
Redis and the sample store.
"""

from __future__ import annotations

import base64
import html
import io
import time
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

# images_of(product_id) -> [(camera, PNG bytes of the crop or of its defect-map overlay)]
ImagesOf = Callable[[str], list[tuple[str, bytes]]]


def product_margin(verdict: dict) -> float | None:
    """How far the product's worst view is over its threshold (> = 0 means defect)."""
    views = verdict.get("views") or []
    return max((v["score"] - v["threshold"] for v in views), default=None)


def product_truth(product_id: str, labels: dict[str, str]) -> int | None:
    """1 defect, 0 good, None unlabelled. A view labelled defect makes the product defective."""
    if labels.get(product_id) == "defect" or any(
        k.startswith(f"{product_id}/") and v == "defect" for k, v in labels.items()
    ):
        return 1
    if labels.get(product_id) == "good":
        return 0
    return None


@dataclass
class ReportData:
    line: str
    since: float
    verdicts: list[dict]
    labels: dict[str, str]


def summarize(data: ReportData) -> dict:
    """The report's numbers (also what ``defectflow report --json`` prints)."""
    verdicts = data.verdicts
    labelled = [
        (product_margin(v), t)
        for v in verdicts
        if (t := product_truth(v["product_id"], data.labels)) is not None
        and product_margin(v) is not None
    ]
    out = {
        "line": data.line,
        "since": data.since,
        "products": len(verdicts),
        "defects": sum(v["decision"] == "defect" for v in verdicts),
        "incomplete": sum(v["status"] != "complete" for v in verdicts),
        "labelled_good": sum(t == 0 for _, t in labelled),
        "labelled_defect": sum(t == 1 for _, t in labelled),
        "auroc": None,
    }
    if labelled:
        margins = np.array([m for m, _ in labelled])
        truth = np.array([t for _, t in labelled])
        called = margins >= 0
        tp = int((called & (truth == 1)).sum())
        fp = int((called & (truth == 0)).sum())
        fn = int((~called & (truth == 1)).sum())
        tn = int((~called & (truth == 0)).sum())
        out |= {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
        out["recall"] = tp / (tp + fn) if tp + fn else None
        out["false_alarm_rate"] = fp / (fp + tn) if fp + tn else None
        if len(set(truth.tolist())) == 2:
            out["auroc"] = float(roc_auc_score(truth, margins))
    return out


def render_report(data: ReportData, images_of: ImagesOf, worst: int = 8) -> str:
    numbers = summarize(data)
    parts = [
        f"<h1>QA report: line {html.escape(data.line)}</h1>",
        f"<p>Verdicts since {_when(data.since)} until {_when(time.time())}.</p>",
        _numbers_table(numbers),
        "<h2>Score distributions</h2>",
        _img(_histogram(data)),
    ]
    labelled = [
        (product_margin(v), t)
        for v in data.verdicts
        if (t := product_truth(v["product_id"], data.labels)) is not None
        and product_margin(v) is not None
    ]
    parts.append("<h2>ROC from labelled products</h2>")
    if numbers["auroc"] is None:
        parts.append(
            "<p>Needs labelled good and labelled defective products "
            f"(have {numbers['labelled_good']} good, {numbers['labelled_defect']} defective). "
            "Label them with <code>defectflow label</code> or on the dashboard.</p>"
        )
    else:
        parts.append(_img(_roc(labelled, numbers["auroc"])))
    defects = sorted(
        (v for v in data.verdicts if v["decision"] == "defect"),
        key=lambda v: -(product_margin(v) or 0.0),
    )[:worst]
    parts.append(f"<h2>Worst defects ({len(defects)})</h2>")
    for v in defects:
        parts.append(
            f"<h3>{html.escape(v['product_id'])}: margin {product_margin(v):+.3f}, "
            f"decided {_when(v['decided_at'])}</h3><div class='row'>"
        )
        shown = images_of(v["product_id"])
        if not shown:
            parts.append("<p>no crops kept (pruned from the sample store)</p>")
        regions = {view["camera"]: view.get("regions") or [] for view in v.get("views") or []}
        for camera, png in shown:
            caption = html.escape(camera) + _regions_text(regions.get(camera, []))
            parts.append(f"<figure>{_img(png)}<figcaption>{caption}</figcaption></figure>")
        parts.append("</div>")
    style = (
        "body{font:14px system-ui,sans-serif;margin:24px;max-width:1100px}"
        "table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd}"
        ".row{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0}"
        "figure img{max-width:520px;max-height:260px}"
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>QA report {html.escape(data.line)}</title><style>{style}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )


def _regions_text(regions: list[dict]) -> str:
    """Where the view's defect regions are, in its crop's pixels."""
    return "".join(
        f"<br>region {r['box']['w']}x{r['box']['h']} px at ({r['box']['x']}, {r['box']['y']}), "
        f"frame ({r['frame_box']['x']}, {r['frame_box']['y']}), peak {r['peak']:.2f}"
        + (f", outline of {len(r['outline'])} corners" if r.get("outline") else "")
        for r in regions
    )


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _numbers_table(numbers: dict) -> str:
    rows = []
    for key, value in numbers.items():
        if key in ("line", "since"):
            continue
        shown = "–" if value is None else f"{value:.3f}" if isinstance(value, float) else value
        rows.append(f"<tr><th>{key.replace('_', ' ')}</th><td>{shown}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _histogram(data: ReportData) -> bytes:
    groups: dict[str, list[float]] = {"unlabelled": [], "labelled good": [], "labelled defect": []}
    thresholds = set()
    for v in data.verdicts:
        truth = product_truth(v["product_id"], data.labels)
        name = {None: "unlabelled", 0: "labelled good", 1: "labelled defect"}[truth]
        for view in v.get("views") or []:
            groups[name].append(view["score"])
            thresholds.add(round(view["threshold"], 6))
    fig, ax = plt.subplots(figsize=(8, 3.2))
    scores = [s for g in groups.values() for s in g]
    bins = np.linspace(min(scores), max(scores), 40) if scores else 10
    colours = {"unlabelled": "#9fb3d1", "labelled good": "#1b7f3b", "labelled defect": "#c0262d"}
    for name, values in groups.items():
        if values:
            ax.hist(
                values, bins=bins, alpha=0.6, label=f"{name} ({len(values)})", color=colours[name]
            )
    for t in sorted(thresholds):
        ax.axvline(t, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("view score (negative log-likelihood); dashed: threshold")
    ax.set_ylabel("views")
    if scores:
        ax.legend()
    return _png(fig)


def _roc(labelled: list[tuple[float, int]], auroc: float) -> bytes:
    fpr, tpr, _ = roc_curve([t for _, t in labelled], [m for m, _ in labelled])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"AUROC {auroc:.3f}")
    ax.plot([0, 1], [0, 1], color="#999", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right")
    return _png(fig)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _img(png: bytes) -> str:
    return f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
