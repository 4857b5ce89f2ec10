"""The scoring stage: views in, view scores out, with one model version at a time."""

from __future__ import annotations

import time

from schemas import ProductView, ViewScore
from workers.differnet.store import ModelBundle
from workers.images import DEFAULT_MAX_PIXELS, decode_with_alpha


class ViewScorer:
    """Scores batches of views with one model version; swapping versions happens between batches."""

    def __init__(
        self,
        bundle: ModelBundle,
        threshold: float | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.bundle = bundle
        self.max_pixels = max_pixels
        self.threshold = bundle.threshold if threshold is None else threshold

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
        results = model.score_batch(prepared) if prepared else []
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
                stage_ms=v.stage_ms | {"score": ms},
            )
            for v, r in zip(views, results, strict=True)
        ]
