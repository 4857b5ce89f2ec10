"""The QA dashboard: a live verdict feed per line, product pages, and labelling (FastAPI + SSE).

Reads the verdict streams and the sample store; writes only the label stream, and only for a
caller that presents the dashboard's token (``Authorization: Bearer <token>``). Defect maps are
computed on demand with the line's model and cached beside the crops.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from cluster.transport.qa import (
    LabelError,
    labels_of,
    line_ids,
    newest_verdicts,
    read_verdicts,
    record_label,
    verdicts_after,
)
from cluster.transport.streams import Streams
from schemas import Label, Verdict
from workers.qa.samples import SampleError, SampleStore, parse_product_id

if TYPE_CHECKING:  # only transport/ talks to Redis; the type is all this needs
    import redis

WEB = Path(__file__).parent / "web"
_ENTRY_ID = re.compile(r"^\d+(-\d+)?$")
# Each read of the feed blocks this long (under redis-py's 5 s socket timeout); a quiet one sends
# an SSE comment, which keeps proxies from closing the feed and notices clients that left.
POLL_MS = 1000

# ModelFor(line) -> a loaded model bundle, or None when the line has no model here.
ModelFor = Callable[[str], object]


class LabelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: Literal["good", "defect"]
    camera: str | None = None
    note: str | None = Field(default=None, max_length=2000)
    by: str = Field(default="dashboard", min_length=1, max_length=128)
    replace: bool = False


def create_app(
    redis_of: Callable[[str | None], redis.Redis],
    samples: SampleStore,
    token: str,
    model_for: ModelFor = lambda line: None,
    lines: list[str] | None = None,
) -> FastAPI:
    """The dashboard over each line's Redis, ``redis_of(line)`` (verdict and label streams; None:
    the top level's), and ``samples`` (crops)."""
    app = FastAPI(title="defectflow QA dashboard", docs_url="/api/docs", redoc_url=None)
    app.mount("/static", StaticFiles(directory=WEB), name="static")
    _pages(app)
    _line_routes(app, redis_of, list(lines or []))
    _product_routes(app, redis_of, samples, model_for)
    _label_route(app, redis_of, token)
    return app


def _pages(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return (WEB / "index.html").read_text()

    @app.get("/product/{product_id}", response_class=HTMLResponse)
    def product_page(product_id: str) -> str:
        return (WEB / "product.html").read_text()


def _line_routes(app: FastAPI, redis_of, configured: list[str]) -> None:
    """The lines, their latest verdicts, counts over a window, and the live feed."""

    @app.get("/api/lines")
    def get_lines() -> dict:
        return {"lines": sorted(set(configured) | set(line_ids(redis_of(None))))}

    @app.get("/api/lines/{line}/verdicts")
    def get_verdicts(line: str, limit: int = 50) -> dict:
        entries = newest_verdicts(redis_of(line), line, max(1, min(limit, 1000)))
        # A malformed entry is the aggregator's bug, not the reader's: left out.
        out = [_verdict_json(e.entry_id, e.verdict) for e in entries if e.verdict is not None]
        return {"line": line, "verdicts": out}

    @app.get("/api/lines/{line}/stats")
    def get_stats(line: str, window_s: float = 3600, bucket_s: float = 60) -> dict:
        if window_s <= 0 or bucket_s <= 0:
            raise HTTPException(422, "window_s and bucket_s must be positive")
        now = time.time()
        since = now - window_s
        buckets: dict[int, dict] = {}
        total = defects = incomplete = 0
        for entry in read_verdicts(redis_of(line), line, since):
            if entry.verdict is None:
                continue
            v = entry.verdict
            total += 1
            defects += v.decision == "defect"
            incomplete += v.status != "complete"
            b = buckets.setdefault(int(v.decided_at // bucket_s), {"total": 0, "defects": 0})
            b["total"] += 1
            b["defects"] += v.decision == "defect"
        return {
            "line": line,
            "window_s": window_s,
            "total": total,
            "defects": defects,
            "incomplete": incomplete,
            "defect_rate": defects / total if total else None,
            "buckets": [
                {"t": k * bucket_s, **b, "defect_rate": b["defects"] / b["total"]}
                for k, b in sorted(buckets.items())
            ],
        }

    @app.get("/api/lines/{line}/events")
    def events(line: str, request: Request, after: str | None = None) -> StreamingResponse:
        """Verdicts published after entry ``after`` (default: from now on), as they come.

        EventSource sends Last-Event-ID when it reconnects: the feed resumes exactly there.
        """
        start = request.headers.get("last-event-id") or after or "$"
        if start != "$" and not _ENTRY_ID.match(start):
            raise HTTPException(422, f"not a stream entry id: {start!r}")
        return StreamingResponse(
            _verdict_events(redis_of(line), line, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


def _product_routes(app: FastAPI, redis_of, samples: SampleStore, model_for: ModelFor) -> None:
    """A product's page data, its views' crops and defect maps."""
    map_lock = threading.Lock()  # one backward pass at a time: they share the model

    def stored(product_id: str):
        try:
            return samples.product(product_id)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        except SampleError as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/api/products/{product_id}")
    def get_product(product_id: str) -> dict:
        product = stored(product_id)
        verdict = product.verdict()
        labels = labels_of(redis_of(product.line), product.line)
        by_camera = {v["camera"]: v for v in (verdict or {}).get("views", [])}
        base = f"/api/products/{product_id}/views"
        return {
            "product_id": product_id,
            "line": product.line,
            "verdict": verdict,
            "label": labels.get(product_id),
            "views": [
                {
                    "camera": cam,
                    **by_camera.get(cam, {}),
                    "label": labels.get(f"{product_id}/{cam}"),
                    "image": f"{base}/{cam}.png",
                    "map": f"{base}/{cam}/map.png",
                }
                for cam in product.cameras
            ],
        }

    @app.get("/api/products/{product_id}/views/{camera}.png")
    def get_view(product_id: str, camera: str) -> FileResponse:
        try:
            return FileResponse(stored(product_id).view_path(camera), media_type="image/png")
        except (SampleError, ValueError) as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/api/products/{product_id}/views/{camera}/map.png")
    def get_map(product_id: str, camera: str) -> Response:
        product = stored(product_id)
        try:
            crop = product.view_path(camera)
        except (SampleError, ValueError) as exc:
            raise HTTPException(404, str(exc)) from None
        cached = product.map_path(camera)
        if not cached.exists():
            bundle = model_for(product.line)
            if bundle is None:
                raise HTTPException(404, f"line {product.line}: no model here to draw maps with")
            from workers.differnet.recipes import defect_map_overlay

            with map_lock:
                samples.put_map(product, camera, defect_map_overlay(bundle, crop))
        return FileResponse(cached, media_type="image/png")


def _label_route(app: FastAPI, redis_of, token: str) -> None:
    """Labelling, for holders of the token."""

    @app.post("/api/products/{product_id}/labels", status_code=201)
    def post_label(
        product_id: str, body: LabelRequest, authorization: str | None = Header(default=None)
    ) -> dict:
        presented = (authorization or "").removeprefix("Bearer ").strip()
        if not presented or not secrets.compare_digest(presented, token):
            raise HTTPException(401, "labelling needs the dashboard token (Bearer)")
        try:
            line, _ = parse_product_id(product_id)
            label = Label(
                line=line,
                product_id=product_id,
                camera=body.camera,
                label=body.label,
                by=body.by,
                at=time.time(),
                note=body.note,
            )
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        try:
            entry_id = record_label(redis_of(line), label, replace=body.replace)
        except LabelError as exc:
            raise HTTPException(409 if "already" in str(exc) else 404, str(exc)) from None
        return {"entry_id": entry_id, "stream": Streams(line).labels, **label.model_dump()}


def _verdict_json(entry_id: str, verdict: Verdict) -> dict:
    return {"entry_id": entry_id, **verdict.model_dump(mode="json")}


def _verdict_events(client: redis.Redis, line: str, start: str) -> Iterator[str]:
    last = start
    yield "retry: 2000\n\n"
    while True:
        entries = verdicts_after(client, line, last, POLL_MS)
        if not entries:
            yield ": keepalive\n\n"
            continue
        for entry in entries:
            last = entry.entry_id
            if entry.verdict is None:
                continue
            data = _verdict_json(last, entry.verdict)
            yield f"id: {last}\nevent: verdict\ndata: {json.dumps(data)}\n\n"
