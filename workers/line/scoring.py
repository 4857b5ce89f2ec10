"""The scoring stage: views in, view scores (with their defect regions) out, with one model
version at a time."""

from __future__ import annotations

import math
import time

from schemas import BBox, ProductView, Region, RegionDetail, ViewScore
from workers.differnet.model import ScoredImage
from workers.differnet.regions import DefectRegion, find_regions
from workers.differnet.store import ModelBundle
from workers.images import DEFAULT_MAX_PIXELS, decode_with_alpha


class ViewScorer:
    """Scores batches of views with one model version; swapping versions happens between batches.

    A view judged defective carries its defect regions (when the model has a region threshold
    and ``regions`` is not ``off``). Maps from the patch memory or the local head come with the
    score, so every view gets one; gradient maps cost a backward pass each and are drawn for the
    views judged defective only.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        threshold: float | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        regions: RegionDetail = "outlines",
    ):
        self.bundle = bundle
        self.max_pixels = max_pixels
        self.threshold = bundle.threshold if threshold is None else threshold
        self.regions = regions

    @property
    def version(self) -> str:
        return self.bundle.version

    def score(self, views: list[ProductView]) -> list[ViewScore]:
        """Scores in the order of ``views``; an undecodable view raises (caller dead-letters)."""
        model = self.bundle.model
        prepared = []
        for v in views:
            rgb, alpha = decode_with_alpha(v.image, v.product_id, self.max_pixels)
            prepared.append(model.prepare(rgb, alpha))
        t0 = time.perf_counter()
        results = self._scored(prepared) if prepared else []
        ms = (time.perf_counter() - t0) * 1e3 / max(1, len(prepared))
        return [
            ViewScore(
                product_id=v.product_id,
                line=v.line,
                camera=v.camera,
                product_seq=v.product_seq,
                captured_at=v.captured_at,
                score=r.score,
                threshold=self.threshold,
                is_defect=r.score >= self.threshold,
                model_version=self.bundle.version,
                regions=self._regions(v, r),
                stage_ms=v.stage_ms | {"score": ms},
            )
            for v, r in zip(views, results, strict=True)
        ]

    def _scored(self, prepared: list) -> list[ScoredImage]:
        model = self.bundle.model
        if self.bundle.region_threshold is None or self.regions == "off":
            return model.score_batch(prepared)
        if model.map_source != "gradient":
            return model.defect_maps(prepared)
        results = model.score_batch(prepared)
        flagged = [i for i, r in enumerate(results) if r.score >= self.threshold]
        drawn = model.defect_maps([prepared[i] for i in flagged])
        for i, mapped in zip(flagged, drawn, strict=True):
            results[i] = ScoredImage(results[i].score, mapped.defect_map)
        return results

    def _regions(self, view: ProductView, result: ScoredImage) -> list[Region]:
        threshold = self.bundle.region_threshold
        drawn = result.defect_map is not None and self.regions != "off"
        if result.score < self.threshold or threshold is None or not drawn:
            return []
        outlines = self.regions == "outlines"
        return [in_frame(view, r, outlines) for r in find_regions(result.defect_map, threshold)]


def in_frame(view: ProductView, region: DefectRegion, outline: bool = True) -> Region:
    """A region of ``view``'s pixels, also in its camera frame's (the view is its frame's crop
    ``view.bbox``, scaled to its size); its outline in both, or neither."""
    height, width = view.shape[:2]
    sx, sy = view.bbox.w / width, view.bbox.h / height
    left, top = math.floor(region.x * sx), math.floor(region.y * sy)
    right = min(view.bbox.w, math.ceil((region.x + region.w) * sx))
    bottom = min(view.bbox.h, math.ceil((region.y + region.h) * sy))
    corners = {}
    if outline:
        # An outline's corners are boundary pixels: in the frame, the pixel under each centre.
        corners = {
            "outline": list(region.outline),
            "frame_outline": [
                (
                    view.bbox.x + min(view.bbox.w - 1, math.floor((x + 0.5) * sx)),
                    view.bbox.y + min(view.bbox.h - 1, math.floor((y + 0.5) * sy)),
                )
                for x, y in region.outline
            ],
        }
    return Region(
        box=BBox(x=region.x, y=region.y, w=region.w, h=region.h),
        frame_box=BBox(
            x=view.bbox.x + left,
            y=view.bbox.y + top,
            w=max(1, right - left),
            h=max(1, bottom - top),
        ),
        area=region.area,
        peak=region.peak,
        **corners,
    )
