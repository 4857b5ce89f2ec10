"""Defect regions from a map: the threshold from good maps, the patches above it."""

import numpy as np

from workers.differnet.regions import MAX_REGIONS, find_regions, region_threshold


def test_regions_are_the_patches_above_the_threshold_strongest_first():
    rng = np.random.default_rng(0)
    good = [rng.normal(1.0, 0.1, (40, 60)) for _ in range(5)]
    threshold = region_threshold(good)
    assert 1.2 < threshold < 1.5  # about 3 sigma: 0.1 % of good pixels above
    view = rng.normal(1.0, 0.1, (40, 60))
    view[5:9, 10:16] = 3.0
    view[30:32, 40:43] = 2.5  # above the threshold and half-way to the peak
    first, second = find_regions(view, threshold)
    assert (first.x, first.y, first.w, first.h, first.area, first.peak) == (10, 5, 6, 4, 24, 3.0)
    assert (second.x, second.y, second.w, second.h, second.area) == (40, 30, 3, 2, 6)
    # Above the good pixels, but low against this view's peak: not where its defect is.
    view[20, 20] = 1.9
    assert len(find_regions(view, threshold)) == 2
    # A good view has none; a map lit in many places reports the strongest few.
    assert find_regions(good[0], max(threshold, good[0].max() + 1e-6)) == []
    speckled = np.zeros((40, 60))
    speckled[::4, ::4] = np.arange(150).reshape(10, 15)
    regions = find_regions(speckled, 1.0)
    assert len(regions) == MAX_REGIONS
    assert [r.peak for r in regions] == sorted((r.peak for r in regions), reverse=True)
