"""Backpressure at the front of the line: each product is inspected whole or shed whole.

When detection or scoring falls behind, the cameras stop sending the products they see next:
a product is shed (no frame of it goes on, from any camera) and gets a verdict that says so.
Shedding whole products keeps the backlog and Redis's memory bounded without ever judging a
product by fewer views than it has. Plain Python: the camera actors ask Redis which products
are shed (the first camera to reach a product decides for all) and move the messages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from schemas import Verdict, make_product_id


@dataclass(frozen=True)
class Backlog:
    """What waits downstream of a camera as it sees a product."""

    frames: int  # this camera's frames not yet through detection
    views: int  # views (of every camera) not yet scored


def shed_reason(backlog: Backlog, cameras: int, max_products: int) -> str | None:
    """Why the product seen now is shed, or None to inspect it: more than ``max_products``
    products wait for detection at this camera, or for the scorers (``cameras`` views each)."""
    if backlog.frames > max_products:
        return (
            f"shed at ingest: {backlog.frames} frames wait for detection "
            f"(max_backlog_products {max_products})"
        )
    if backlog.views > max_products * cameras:
        return (
            f"shed at ingest: {backlog.views} views wait for the scorers "
            f"(max_backlog_products {max_products} of {cameras} views)"
        )
    return None


def unjudged_verdict(
    line: str, seq: int, cameras: list[str], reason: str, captured_at: float
) -> Verdict:
    """The verdict of a product no view of which was scored (shed, or every view lost): no
    decision, every camera missing, and why."""
    return Verdict(
        product_id=make_product_id(line, seq),
        line=line,
        product_seq=seq,
        decision="unknown",
        status="incomplete",
        views=[],
        missing_cameras=sorted(cameras),
        reason=reason,
        captured_at=captured_at,
        decided_at=time.time(),
    )
