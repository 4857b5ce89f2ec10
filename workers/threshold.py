"""Choosing the decision threshold on validation scores (score >= threshold means defect)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


@dataclass(frozen=True)
class Threshold:
    value: float
    rule: str
    tpr: float | None
    fpr: float
    accuracy: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def target_tpr_threshold(scores, labels, target_tpr: float = 0.85) -> Threshold:
    """The ZeroBox rule: the smallest-FPR threshold whose TPR reaches ``target_tpr``.

    With no defect among the labels no TPR can be measured; instead of collapsing to the lowest
    score (and flooding the line with alarms), the threshold is then the ``target_tpr`` quantile
    of the good scores, i.e. a false-alarm rate of ``1 - target_tpr`` at most.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if scores.size == 0:
        raise ValueError("no validation scores to choose a threshold from")
    if not 0 < target_tpr <= 1:
        raise ValueError(f"target_tpr must be in (0, 1], got {target_tpr}")
    if labels.min() == labels.max():
        if labels[0] == 1:
            raise ValueError("validation has only defects: cannot bound false alarms")
        value = float(np.quantile(scores, target_tpr, method="higher"))
        fpr = float(np.mean(scores >= value))
        return Threshold(value, f"good-quantile {target_tpr:g}", None, fpr, float(1 - fpr))
    fpr, tpr, thresholds = roc_curve(labels, scores)
    ok = np.flatnonzero(tpr >= target_tpr)
    best = ok[np.argmin(fpr[ok])]  # roc_curve is sorted by fpr: the first that reaches the target
    value = float(min(thresholds[best], scores.max()))  # sklearn's first threshold is +inf
    predicted = scores >= value
    return Threshold(
        value,
        f"target-tpr {target_tpr:g}",
        float(tpr[best]),
        float(fpr[best]),
        float(np.mean(predicted == labels.astype(bool))),
    )


def best_accuracy(scores, labels) -> float | None:
    """The highest accuracy any threshold reaches on these very scores. Hindsight, never a
    threshold to use: beside the accuracy at a threshold chosen on validation data, it tells
    what the ranking is worth from where the validation data put the threshold."""
    labels = np.asarray(labels)
    if not _both_classes(labels):
        return None
    fpr, tpr, _ = roc_curve(labels, np.asarray(scores, dtype=np.float64), drop_intermediate=False)
    defects = labels.astype(bool).sum()
    return float(np.max(tpr * defects + (1 - fpr) * (labels.size - defects)) / labels.size)


def _both_classes(labels: np.ndarray) -> bool:
    return labels.size > 0 and labels.min() != labels.max()


def auroc(scores, labels) -> float | None:
    labels = np.asarray(labels)
    if not _both_classes(labels):
        return None
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def auroc_interval(
    scores, labels, *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the AUROC, the samples drawn with replacement (draws
    holding one class only are skipped). A test line of a hundred products, a fifth of them
    defective, spans several points: a single AUROC says little about a target one point away."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if not _both_classes(labels):
        return None
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, labels.size, (resamples, labels.size))
    # How often each sample is drawn, per resample; a resample's AUROC is then the weighted share
    # of (defect, good) pairs ranked right, ties counting half: one matrix product for all.
    counts = np.bincount(
        (draws + labels.size * np.arange(resamples)[:, None]).ravel(),
        minlength=resamples * labels.size,
    ).reshape(resamples, labels.size)
    positive = labels.astype(bool)
    pos, neg = scores[positive], scores[~positive]
    right = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    w_pos, w_neg = counts[:, positive], counts[:, ~positive]
    pairs = w_pos.sum(1) * w_neg.sum(1)
    both = pairs > 0  # draws holding one class only have no AUROC
    values = np.einsum("rp,pn,rn->r", w_pos[both], right, w_neg[both]) / pairs[both]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def accuracy_gap_interval(
    validation: tuple[dict, dict],
    validation_labels: dict,
    test: tuple[dict, dict],
    test_labels: dict,
    *,
    target_tpr: float = 0.85,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of accuracy(A) - accuracy(B) on a test set, where each
    scorer's threshold is chosen by the target-TPR rule on a validation set, as deployed.

    ``validation`` and ``test`` hold each scorer's scores by sample key (A's, then B's); samples
    both scored are paired. Each resample draws the validation samples, chooses both thresholds
    on them, and draws the test samples: the interval covers where the validation set put the
    thresholds as well as which test samples came (a line of a hundred products moves a
    threshold-dependent accuracy by points)."""
    val_keys = sorted(set(validation[0]) & set(validation[1]))
    test_keys = sorted(set(test[0]) & set(test[1]))
    val_a, val_b = (np.array([v[k] for k in val_keys], np.float64) for v in validation)
    test_a, test_b = (np.array([t[k] for k in test_keys], np.float64) for t in test)
    val_y = np.array([validation_labels[k] for k in val_keys])
    test_y = np.array([test_labels[k] for k in test_keys]).astype(bool)
    if not _both_classes(val_y) or not test_keys:
        raise ValueError("need validation samples of both classes and test samples both scored")
    rng = np.random.default_rng(seed)
    gaps = []
    for _ in range(resamples):
        v = rng.integers(0, len(val_keys), len(val_keys))
        if not _both_classes(val_y[v]):
            continue
        t = rng.integers(0, len(test_keys), len(test_keys))
        accuracies = [
            np.mean(
                (scores[t] >= target_tpr_threshold(val[v], val_y[v], target_tpr).value) == test_y[t]
            )
            for val, scores in ((val_a, test_a), (val_b, test_b))
        ]
        gaps.append(accuracies[0] - accuracies[1])
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(gaps, [tail, 100 - tail])
    return float(low), float(high)
