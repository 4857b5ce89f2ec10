import numpy as np
import pytest

from workers.threshold import (
    accuracy_gap_interval,
    auroc,
    auroc_interval,
    best_accuracy,
    target_tpr_threshold,
)


def test_the_smallest_fpr_threshold_that_meets_the_target_tpr():
    scores = [0.1, 0.2, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    labels = [0, 0, 0, 1, 0, 1, 0, 1, 1, 1]
    t = target_tpr_threshold(scores, labels, target_tpr=0.8)
    # Catching 4 of 5 defects needs threshold 0.5; that flags one good (0.6) of five.
    assert t.value == 0.5 and t.tpr == 0.8 and t.fpr == 0.2
    assert t.accuracy == 0.8
    assert target_tpr_threshold(scores, labels, target_tpr=1.0).value == 0.35


def test_the_best_accuracy_is_that_of_the_best_threshold_in_hindsight():
    rng = np.random.default_rng(3)
    labels = (rng.random(60) < 0.3).astype(int)
    scores = np.round(rng.normal(labels, 1.0), 1)  # ties included
    brute = max(np.mean((scores >= t) == labels) for t in [*scores, np.inf])
    assert best_accuracy(scores, labels) == pytest.approx(brute)
    # Above the target-TPR rule's, which must reach the target whatever it costs.
    assert best_accuracy(scores, labels) >= target_tpr_threshold(scores, labels).accuracy
    assert best_accuracy([0.1, 0.9], [0, 1]) == 1.0
    assert best_accuracy([0.1, 0.9], [0, 0]) is None


def test_without_defects_the_threshold_bounds_false_alarms_instead_of_collapsing():
    scores = np.linspace(0, 1, 101)
    t = target_tpr_threshold(scores, np.zeros(101), target_tpr=0.95)
    assert t.value == pytest.approx(0.95)
    assert t.fpr <= 0.06 and t.tpr is None


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="no validation scores"):
        target_tpr_threshold([], [], 0.85)
    with pytest.raises(ValueError, match="only defects"):
        target_tpr_threshold([1.0, 2.0], [1, 1], 0.85)


def test_the_auroc_interval_holds_the_auroc_and_narrows_with_more_samples():
    rng = np.random.default_rng(1)

    def line(n):
        labels = rng.random(n) < 0.25
        return rng.normal(labels * 1.5, 1.0), labels.astype(int)

    small, large = line(40), line(400)
    low_s, high_s = auroc_interval(*small)
    low_l, high_l = auroc_interval(*large)
    assert low_s <= auroc(*small) <= high_s and low_l <= auroc(*large) <= high_l
    assert high_l - low_l < high_s - low_s
    assert low_l < 0.86 < high_l  # the AUROC of two unit normals 1.5 apart: 0.86
    assert auroc_interval([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == (1.0, 1.0)
    assert auroc_interval([0.1, 0.2], [0, 0]) is None


def test_the_auroc_interval_is_the_percentile_interval_of_resampled_aurocs():
    # Written out the slow way: draw the resamples, score each with scikit-learn, skip the ones
    # holding one class only, take the percentiles. Scores are rounded so that ties occur.
    rng = np.random.default_rng(2)
    labels = (rng.random(30) < 0.3).astype(int)
    scores = np.round(rng.normal(labels * 1.0, 1.0), 1)
    draws = np.random.default_rng(7).integers(0, labels.size, (300, labels.size))
    values = [auroc(scores[d], labels[d]) for d in draws]
    expected = np.percentile([v for v in values if v is not None], [5, 95])
    got = auroc_interval(scores, labels, level=0.9, resamples=300, seed=7)
    assert np.allclose(got, expected, rtol=0, atol=1e-12)


def gap_interval(validation, validation_labels, test, test_labels):
    """``accuracy_gap_interval`` on score arrays: samples keyed by their position."""
    as_dict = lambda scores: dict(enumerate(scores))  # noqa: E731
    return accuracy_gap_interval(
        tuple(map(as_dict, validation)),
        as_dict(validation_labels.astype(int)),
        tuple(map(as_dict, test)),
        as_dict(test_labels),
    )


def test_the_accuracy_gap_interval_covers_where_validation_puts_the_thresholds():
    rng = np.random.default_rng(0)

    def scored(n, separation):
        labels = rng.random(n) < 0.4
        return labels, rng.normal(size=n) + separation * labels

    val_y, val_a = scored(120, 4.0)
    test_y, test_a = scored(120, 4.0)
    val_b, test_b = val_a + rng.normal(0, 2.0, 120), test_a + rng.normal(0, 2.0, 120)
    assert gap_interval((val_a, val_a), val_y, (test_a, test_a), test_y) == (0.0, 0.0)
    low, high = gap_interval((val_a, val_b), val_y, (test_a, test_b), test_y)
    # A ranks far better than its noisy copy B: the gap is positive, by points, not by one.
    assert 0 < low < high and high - low > 0.03
    # Only the samples both scored count; one class alone in validation is refused.
    with pytest.raises(ValueError, match="both classes"):
        accuracy_gap_interval(({0: 1.0}, {0: 1.0}), {0: 0}, ({0: 1.0}, {0: 1.0}), {0: False})


def test_a_gap_with_the_threshold_held_moves_only_with_the_verdicts_that_flip():
    # One model scoring the same products cut two ways (scores a little apart): its threshold,
    # chosen again on each validation draw, judges both sides, so only products whose verdict
    # flips move the gap. Two validation runs (each side's threshold on its own scores) add
    # where each put its threshold.
    rng = np.random.default_rng(1)
    val_y = rng.random(120) < 0.3
    test_y = rng.random(120) < 0.3
    val_a = rng.normal(size=120) + 2.0 * val_y
    test_a = rng.normal(size=120) + 2.0 * test_y
    test_b = test_a + rng.normal(0, 0.05, 120)
    val_b = val_a + rng.normal(0, 0.5, 120)
    held = gap_interval((val_a, val_a), val_y, (test_a, test_b), test_y)
    apart = gap_interval((val_a, val_b), val_y, (test_a, test_b), test_y)
    assert held[0] <= 0 <= held[1]
    assert held[1] - held[0] < 0.07 and apart[1] - apart[0] > 0.15
