"""The QA dashboard: a live verdict feed per line, product pages, and labelling (FastAPI + SSE).

Reads the verdict streams and the sample store; writes only the label stream, and only for a
caller that presents a QA token (``Authorization: Bearer <token>``; see ``tokens.py``), in whose
name the label is written. With a token file every read needs a token too, from that header or
the ``defectflow_token`` cookie the pages set (images and the live feed cannot send headers);
writes take the header only, which another site's page cannot make a browser send. Defect maps
are computed on demand with the line's model and cached beside the crops.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import iterate_in_threadpool

from cluster.apps.dashboard.tokens import Holder, QaTokens
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
# Live feeds served at once: each holds a worker thread and a Redis connection.
MAX_FEEDS = 16
# A stats window reads every verdict in it: at most a day, in at most this many buckets, and
# no more verdicts than a stream keeps.
MAX_WINDOW_S = 24 * 3600
MAX_BUCKETS = 1440
MAX_STATS_VERDICTS = 100_000
TOKEN_COOKIE = "defectflow_token"

# ModelFor(line) -> a loaded model bundle, or None when the line has no model here.
ModelFor = Callable[[str], object]


class LabelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: Literal["good", "defect"]
    camera: str | None = None
    note: str | None = Field(default=None, max_length=2000)
    replace: bool = False


def create_app(
    redis_of: Callable[[str | None], redis.Redis],
    samples: SampleStore,
    tokens: QaTokens,
    model_for: ModelFor = lambda line: None,
    lines: list[str] | None = None,
    max_feeds: int = MAX_FEEDS,
) -> FastAPI:
    """The dashboard over each line's Redis, ``redis_of(line)`` (verdict and label streams; None:
    the top level's), and ``samples`` (crops)."""

    def reader(request: Request, authorization: str | None = Header(default=None)) -> None:
        if not tokens.guards_reads:
            return
        presented = _bearer(authorization) or unquote(request.cookies.get(TOKEN_COOKIE, ""))
        if tokens.holder(presented) is None:
            raise HTTPException(401, "this dashboard needs a QA token")

    app = FastAPI(title="defectflow QA dashboard", docs_url="/api/docs", redoc_url=None)
    app.mount("/static", StaticFiles(directory=WEB), name="static")
    _pages(app)
    api = APIRouter(prefix="/api", dependencies=[Depends(reader)])
    _line_routes(api, redis_of, list(lines or []), max_feeds)
    _product_routes(api, redis_of, samples, model_for)
    _label_route(api, redis_of, tokens)
    app.include_router(api)
    return app


def _bearer(authorization: str | None) -> str:
    return (authorization or "").removeprefix("Bearer ").strip()


def _pages(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return (WEB / "index.html").read_text()

    @app.get("/product/{product_id}", response_class=HTMLResponse)
    def product_page(product_id: str) -> str:
        return (WEB / "product.html").read_text()


def _line_routes(app: APIRouter, redis_of, configured: list[str], max_feeds: int) -> None:
    """The lines, their latest verdicts, counts over a window, and the live feed."""
    feeds = threading.BoundedSemaphore(max_feeds)

    @app.get("/lines")
    def get_lines() -> dict:
        return {"lines": sorted(set(configured) | set(line_ids(redis_of(None))))}

    @app.get("/lines/{line}/verdicts")
    def get_verdicts(line: str, limit: int = 50) -> dict:
        entries = newest_verdicts(redis_of(line), line, max(1, min(limit, 1000)))
        # A malformed entry is the aggregator's bug, not the reader's: left out.
        out = [_verdict_json(e.entry_id, e.verdict) for e in entries if e.verdict is not None]
        return {"line": line, "verdicts": out}

    @app.get("/lines/{line}/stats")
    def get_stats(line: str, window_s: float = 3600, bucket_s: float = 60) -> dict:
        if not 0 < window_s <= MAX_WINDOW_S or bucket_s <= 0:
            raise HTTPException(422, f"window_s must be in (0, {MAX_WINDOW_S}], bucket_s positive")
        if window_s / bucket_s > MAX_BUCKETS:
            raise HTTPException(422, f"at most {MAX_BUCKETS} buckets: raise bucket_s")
        now = time.time()
        since = now - window_s
        buckets: dict[int, dict] = {}
        total = defects = incomplete = 0
        entries = read_verdicts(redis_of(line), line, since, count=MAX_STATS_VERDICTS)
        for entry in entries:
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
            "truncated": len(entries) == MAX_STATS_VERDICTS,
            "buckets": [
                {"t": k * bucket_s, **b, "defect_rate": b["defects"] / b["total"]}
                for k, b in sorted(buckets.items())
            ],
        }

    @app.get("/lines/{line}/events")
    def events(line: str, request: Request, after: str | None = None) -> StreamingResponse:
        """Verdicts published after entry ``after`` (default: from now on), as they come.

        EventSource sends Last-Event-ID when it reconnects: the feed resumes exactly there.
        """
        start = request.headers.get("last-event-id") or after or "$"
        if start != "$" and not _ENTRY_ID.match(start):
            raise HTTPException(422, f"not a stream entry id: {start!r}")
        if not feeds.acquire(blocking=False):
            raise HTTPException(503, f"{max_feeds} live feeds are open already: try again later")
        return _Feed(
            _released(_verdict_events(redis_of(line), line, start), feeds.release),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


def _product_routes(app: APIRouter, redis_of, samples: SampleStore, model_for: ModelFor) -> None:
    """A product's page data, its views' crops and defect maps."""
    map_lock = threading.Lock()  # one backward pass at a time: they share the model

    def stored(product_id: str):
        try:
            return samples.product(product_id)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        except SampleError as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/products/{product_id}")
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

    @app.get("/products/{product_id}/views/{camera}.png")
    def get_view(product_id: str, camera: str) -> FileResponse:
        try:
            return FileResponse(stored(product_id).view_path(camera), media_type="image/png")
        except (SampleError, ValueError) as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/products/{product_id}/views/{camera}/map.png")
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


def _label_route(app: APIRouter, redis_of, tokens: QaTokens) -> None:
    """Labelling, for holders of a token, in their name."""

    def labeller(authorization: str | None = Header(default=None)) -> Holder:
        holder = tokens.holder(_bearer(authorization))
        if holder is None:
            raise HTTPException(401, "labelling needs a QA token (Authorization: Bearer)")
        return holder

    @app.post("/products/{product_id}/labels", status_code=201)
    def post_label(product_id: str, body: LabelRequest, holder: Holder = Depends(labeller)) -> dict:
        if body.replace and not holder.may_replace:
            raise HTTPException(403, f"{holder.name}'s token may not replace labels")
        try:
            line, _ = parse_product_id(product_id)
            label = Label(
                line=line,
                product_id=product_id,
                camera=body.camera,
                label=body.label,
                by=holder.name,
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


class _Feed(StreamingResponse):
    """A live feed that ends its events, and gives back its place, as soon as it stops: its
    client left (uvicorn then fails the next send) or the server stops. Starlette leaves the
    events to the garbage collector, which may take minutes on a quiet server."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _released(events: Iterator[str], release: Callable[[], None]) -> AsyncIterator[str]:
    """``events`` (read in a worker thread: they block on Redis), then ``release``."""
    try:
        async for chunk in iterate_in_threadpool(events):
            yield chunk
    finally:
        events.close()
        release()


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
