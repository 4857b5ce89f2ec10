"""Pictures and pixel metrics: ROC curves, defect-map overlays, pixel AUROC and AUPRO."""

from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")  # Files only: no display on servers.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from workers.images import encode_png, load_image  # noqa: E402


def roc_plot(scores, labels, path: Path, threshold: float, title: str) -> None:
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return
    fpr, tpr, _ = roc_curve(labels, scores)
    auc = roc_auc_score(labels, scores)
    at = np.asarray(scores) >= threshold
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(fpr, tpr, label=f"AUROC {auc:.3f}")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.scatter(
        [at[labels == 0].mean()], [at[labels == 1].mean()], c="red", zorder=3, label="threshold"
    )
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC ({title})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def overlay_png(rgb: np.ndarray, defect_map: np.ndarray) -> bytes:
    """The image with its defect map (min-max normalised) as a heat overlay, side by side."""
    m = defect_map.astype(np.float64)
    m = (m - m.min()) / max(m.max() - m.min(), 1e-12)
    heat = cv2.applyColorMap((m * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    blended = (0.55 * rgb + 0.45 * heat).astype(np.uint8)
    return encode_png(np.concatenate([rgb, blended], axis=1))


MAX_AUROC_PIXELS = 4_000_000


def pixel_metrics(
    maps: list[np.ndarray], mask_paths: list[Path | None], max_fpr: float = 0.3
) -> dict[str, float | None]:
    """Pixel AUROC and AUPRO (MVTec AD's per-region overlap, integrated up to ``max_fpr`` and
    divided by it) of defect maps against ground-truth masks; images without a mask count as
    all good. None where no pixel is defective."""
    truth = [_ground_truth(m.shape, path) for m, path in zip(maps, mask_paths, strict=True)]
    # Every pixel weighs the same, as in MVTec AD's metric (a larger image counts for more); past
    # MAX_AUROC_PIXELS one stride for all images keeps that weighting at a bounded cost.
    step = max(1, int(np.ceil(np.sqrt(sum(m.size for m in maps) / MAX_AUROC_PIXELS))))
    values = np.concatenate([m[::step, ::step].ravel() for m in maps])
    labels = np.concatenate([t[::step, ::step].ravel() for t in truth])
    if labels.min() == labels.max():
        return {"auroc": None, "aupro": None}
    return {
        "auroc": float(roc_auc_score(labels, values)),
        "aupro": _aupro(maps, truth, max_fpr),
    }


def _ground_truth(shape: tuple[int, ...], mask_path: Path | None) -> np.ndarray:
    if mask_path is None:
        return np.zeros(shape, dtype=bool)
    gt = load_image(mask_path)[:, :, 0] > 127
    if gt.shape != shape:
        gt = cv2.resize(gt.astype(np.uint8), shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    return gt


def _aupro(maps: list[np.ndarray], truth: list[np.ndarray], max_fpr: float) -> float:
    """Area under the per-region overlap curve up to ``max_fpr``, divided by ``max_fpr``."""
    normal = np.sort(np.concatenate([m[~t] for m, t in zip(maps, truth, strict=True)]))
    regions = []
    for m, t in zip(maps, truth, strict=True):
        labelled, n = ndimage.label(t)
        regions += [np.sort(m[labelled == k]) for k in range(1, n + 1)]
    # Thresholds from the one letting max_fpr of the normal pixels through to the highest.
    lowest = normal[min(len(normal) - 1, int(np.floor((1 - max_fpr) * len(normal))))]
    thresholds = np.linspace(lowest, max(normal[-1], *(r[-1] for r in regions)), 256)
    fpr = 1 - np.searchsorted(normal, thresholds, side="left") / len(normal)
    pro = np.mean(
        [1 - np.searchsorted(r, thresholds, side="left") / len(r) for r in regions], axis=0
    )
    order = np.argsort(fpr)
    fpr, pro = fpr[order], pro[order]
    keep = fpr <= max_fpr
    fpr, pro = np.append(fpr[keep], max_fpr), np.append(pro[keep], pro[keep][-1])
    return float(np.trapezoid(pro, fpr) / max_fpr)
