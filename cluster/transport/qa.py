"""What QA does with Redis: read verdicts (once or following), and label products.

Shared by the CLI (`defectflow verdicts`, `defectflow label`), the dashboard and the report, so
that each reads and writes the streams one way.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import redis

from cluster.transport.streams import DecidedProducts, Streams
from schemas import Label, Verdict, ViewScore
from schemas.base import SchemaError
from workers.qa.samples import parse_product_id

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class LabelError(ValueError):
    """A label that cannot be recorded: unknown product, or one that contradicts an earlier one."""


def parse_since(text: str, now: float | None = None) -> float:
    """``10m``, ``2h``, ``1d`` ago; an ISO time (``2026-11-29T08:00``, local time unless it has
    a zone); or seconds since the epoch. Returns seconds since the epoch."""
    now = time.time() if now is None else now
    text = text.strip()
    if m := _RELATIVE.match(text):
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(
            f"cannot read time {text!r}: use 10m, 2h, 1d, an ISO time or epoch seconds"
        ) from None


def line_ids(client: redis.Redis) -> list[str]:
    """Lines that have a verdict stream."""
    return sorted(
        Streams.line_of(k.decode()) for k in client.scan_iter(match=Streams("*").verdicts)
    )


def camera_ids(client: redis.Redis, line: str) -> list[str]:
    """The cameras that have a frame stream on ``line``."""
    keys = client.scan_iter(match=Streams(line).frames("*"))
    return sorted(k.decode().rsplit(":", 1)[1] for k in keys)


@dataclass
class VerdictEntry:
    entry_id: str
    verdict: Verdict | None  # None: the entry does not parse (reported, never fatal)
    error: str | None = None


def _decode(entry_id: bytes, fields: dict) -> VerdictEntry:
    try:
        return VerdictEntry(entry_id.decode(), Verdict.from_entry(fields))
    except SchemaError as exc:
        return VerdictEntry(entry_id.decode(), None, str(exc))


def read_verdicts(
    client: redis.Redis,
    line: str,
    since: float | None = None,
    count: int | None = None,
    after: str | None = None,
) -> list[VerdictEntry]:
    """Verdicts of ``line`` published at or after ``since`` (stream ids are publish times), or
    after the entry ``after``, oldest first."""
    start = f"{int(since * 1000)}-0" if since is not None else "-"
    if after not in (None, "0"):
        start = f"({after}"
    return [_decode(i, f) for i, f in client.xrange(Streams(line).verdicts, min=start, count=count)]


def newest_verdicts(client: redis.Redis, line: str, count: int) -> list[VerdictEntry]:
    """The ``count`` newest verdicts of ``line``, newest first."""
    return [_decode(i, f) for i, f in client.xrevrange(Streams(line).verdicts, count=count)]


def verdicts_after(
    client: redis.Redis, line: str, after: str, block_ms: int, count: int = 100
) -> list[VerdictEntry]:
    """Verdicts of ``line`` after entry ``after`` (``$``: from now on), waiting up to
    ``block_ms`` for the first."""
    reply = client.xread({Streams(line).verdicts: after}, block=block_ms, count=count)
    return [_decode(i, f) for _, entries in reply or [] for i, f in entries]


def follow_verdicts(
    client: redis.Redis,
    lines: list[str],
    since: float | None = None,
    block_ms: int = 1000,
    should_stop=lambda: False,
) -> Iterator[tuple[str, VerdictEntry]]:
    """Verdicts of ``lines`` as they are published, after those since ``since`` (default: now)."""
    last = {Streams(line).verdicts: "$" for line in lines}
    if since is not None:
        for line in lines:
            stream = Streams(line).verdicts
            for entry in read_verdicts(client, line, since):
                last[stream] = entry.entry_id
                yield line, entry
            if last[stream] == "$":
                last[stream] = f"{int(since * 1000)}-0"
    while not should_stop():
        for stream, entries in client.xread(last, block=block_ms) or []:
            stream = stream.decode()
            for entry_id, fields in entries:
                last[stream] = entry_id.decode()
                yield Streams.line_of(stream), _decode(entry_id, fields)


def record_label(client: redis.Redis, label: Label, replace: bool = False) -> str:
    """Append ``label`` to its line's label stream; returns the entry id.

    Refuses a product the line has never given a verdict, and a label that contradicts an
    earlier one for the same product or view unless ``replace`` (QA changed its mind).
    """
    line, seq = parse_product_id(label.product_id)
    if line != label.line:
        raise LabelError(f"product {label.product_id} is not on line {label.line}")
    streams = Streams(line)
    if seq not in DecidedProducts(client, line):
        raise LabelError(f"unknown product {label.product_id}: line {line} gave it no verdict")
    key = f"{label.product_id}/{label.camera}" if label.camera else label.product_id
    earlier = client.hget(streams.label_index, key)
    if not replace and earlier is not None and earlier.decode() != label.label:
        raise LabelError(
            f"{key} is already labelled {earlier.decode()!r}; pass --replace to change it"
        )
    pipe = client.pipeline(transaction=True)
    pipe.xadd(streams.labels, label.to_entry())
    pipe.hset(streams.label_index, key, label.label)
    entry_id, _ = pipe.execute()
    return entry_id.decode()


def labels_of(client: redis.Redis, line: str) -> dict[str, str]:
    """Latest label per product (``product_id``) or view (``product_id/camera``)."""
    return {k.decode(): v.decode() for k, v in client.hgetall(Streams(line).label_index).items()}


def read_scores(client: redis.Redis, stream: str) -> list[ViewScore]:
    """Every view score still in ``stream`` (malformed entries skipped)."""
    out = []
    for _, fields in client.xrange(stream):
        try:
            out.append(ViewScore.from_entry(fields))
        except SchemaError:
            continue
    return out
