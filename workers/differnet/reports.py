"""Pictures and pixel metrics: ROC curves, defect-map overlays, pixel AUROC."""

from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")  # Files only: no display on servers.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
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


def pixel_auroc(maps: list[np.ndarray], mask_paths: list[Path | None]) -> float | None:
    """AUROC over all pixels; images without a mask count as all good."""
    values, truth = [], []
    for m, mask_path in zip(maps, mask_paths, strict=True):
        if mask_path is None:
            gt = np.zeros(m.shape, dtype=bool)
        else:
            gt = load_image(mask_path)[:, :, 0] > 127
            if gt.shape != m.shape:
                gt = (
                    cv2.resize(gt.astype(np.uint8), m.shape[::-1], interpolation=cv2.INTER_NEAREST)
                    > 0
                )
        # Subsample: pixel AUROC over millions of pixels costs more than it tells.
        step = max(1, int(np.sqrt(m.size / 4096)))
        values.append(m[::step, ::step].ravel())
        truth.append(gt[::step, ::step].ravel())
    y = np.concatenate(truth)
    if y.min() == y.max():
        return None
    return float(roc_auc_score(y, np.concatenate(values)))
