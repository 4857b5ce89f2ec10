"""Defect regions: where a view's defect map rises above the model's region threshold.

The threshold is chosen when the model is validated, as the image threshold is, but from good
images alone (a line's validation products have labels, not masks): the map value that only
:data:`GOOD_PIXEL_SHARE` of the good validation pixels reach. A region is a connected patch of
the map above it, and above half-way from the view's median to its peak, as a box in the image's
pixels with its area, its peak and its outline (a polygon of at most :data:`MAX_OUTLINE_POINTS`
corners). The second bound is the view's own: a gradient map, or the
local head's, rises over the whole of a view that scores high, and would otherwise mark all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# The messages' bounds: at most this many regions a view, the strongest first (a map that
# lights up in dozens of places says "the whole view", which its score already says), and this
# many corners an outline (enough to follow a crack's bends, small in every message).
from schemas.messages import MAX_OUTLINE_POINTS, MAX_REGIONS

# Share of good validation pixels allowed above the region threshold.
GOOD_PIXEL_SHARE = 0.001
# Pixels drawn from each good map to choose the threshold: bounds the memory a large
# validation set takes, and is plenty for a 0.1 % quantile.
SAMPLE_PER_MAP = 20_000


@dataclass(frozen=True)
class DefectRegion:
    """A box in the image's pixels, the pixels of the map above threshold in it, its peak, and
    its outer outline as (x, y) corners in the image's pixels."""

    x: int
    y: int
    w: int
    h: int
    area: int
    peak: float
    outline: tuple[tuple[int, int], ...]


def find_regions(defect_map: np.ndarray, threshold: float) -> list[DefectRegion]:
    """The connected patches of ``defect_map`` at or above ``threshold`` and half-way from
    its median to its peak, strongest first."""
    level = max(threshold, (float(np.median(defect_map)) + float(defect_map.max())) / 2)
    above = (defect_map >= level).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(above, connectivity=8)
    if count <= 1:
        return []
    # Peak of each component in one pass: the largest map value per label.
    peaks = np.full(count, -np.inf)
    np.maximum.at(peaks, labels.ravel(), defect_map.ravel())
    strongest = sorted(range(1, count), key=lambda i: -peaks[i])[:MAX_REGIONS]
    return [
        DefectRegion(*(int(v) for v in stats[i]), float(peaks[i]), _outline(labels == i))
        for i in strongest
    ]


def _outline(component: np.ndarray) -> tuple[tuple[int, int], ...]:
    """The outer boundary of one connected component, simplified to at most
    :data:`MAX_OUTLINE_POINTS` corners (tolerance doubled from one pixel until it fits)."""
    contours, _ = cv2.findContours(
        component.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    polygon = max(contours, key=len)
    tolerance = 1.0
    while len(polygon) > MAX_OUTLINE_POINTS:
        polygon = cv2.approxPolyDP(polygon, tolerance, closed=True)
        tolerance *= 2
    return tuple((int(x), int(y)) for x, y in polygon[:, 0])


def region_threshold(good_maps: list[np.ndarray], seed: int = 0) -> float:
    """The map value that :data:`GOOD_PIXEL_SHARE` of the good maps' pixels reach."""
    if not good_maps:
        raise ValueError("a region threshold needs the maps of good images")
    rng = np.random.default_rng(seed)
    values = np.concatenate(
        [
            m.ravel() if m.size <= SAMPLE_PER_MAP else rng.choice(m.ravel(), SAMPLE_PER_MAP)
            for m in good_maps
        ]
    )
    return float(np.quantile(values, 1.0 - GOOD_PIXEL_SHARE))
