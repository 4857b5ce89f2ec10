"""`defectflow deadletters`: a line's dead letters listed with their reasons, one replayed to its
stream once its cause is fixed, the rest purged (a real embedded Redis)."""

import json

from typer.testing import CliRunner

from cluster.apps.cli import app
from cluster.transport.bus import StreamBus
from cluster.transport.streams import Streams
from schemas import RetrainRequest


def deadletters(url: str, *args: str):
    return CliRunner().invoke(app, ["deadletters", "--line", "l", "--redis", url, *args])


def test_dead_letters_are_listed_replayed_and_purged(embedded_redis, redis_client):
    streams = Streams("l")
    bus = StreamBus(redis_client, dead_letter_stream=streams.dead_letters)
    bus.ensure_group(streams.retrain_requests, "trainer")
    for by in ("a", "b", "c"):
        bus.publish(streams.retrain_requests, RetrainRequest(line="l", by=by, at=1.0))
    for i, d in enumerate(
        bus.consume(streams.retrain_requests, "trainer", "t-0", RetrainRequest, count=3)
    ):
        bus.dead_letter(d.stream, d.group, d.entry_id, d.message.to_entry(), f"cause {i}")

    listed = deadletters(embedded_redis.url, "--json")
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(x) for x in listed.stdout.splitlines()]
    assert [r["reason"] for r in rows] == ["cause 0", "cause 1", "cause 2"]
    assert all(
        r["stream"] == streams.retrain_requests and r["kind"] == "retrain_request" for r in rows
    )
    only = deadletters(embedded_redis.url, "--json", "--reason", "CAUSE 1")
    assert [json.loads(x)["reason"] for x in only.stdout.splitlines()] == ["cause 1"]

    # Replayed: back in its stream as a new entry its stage will read, gone from the letters.
    assert deadletters(embedded_redis.url, "--replay", rows[1]["entry_id"]).exit_code == 0
    [again] = bus.consume(
        streams.retrain_requests, "trainer", "t-0", RetrainRequest, count=10, block_ms=100
    )
    assert again.message.by == "b"
    left = [json.loads(x) for x in deadletters(embedded_redis.url, "--json").stdout.splitlines()]
    assert [r["reason"] for r in left] == ["cause 0", "cause 2"]

    unknown = deadletters(embedded_redis.url, "--replay", "1-0")
    assert unknown.exit_code == 1 and "no dead letter 1-0" in unknown.output
    assert deadletters(embedded_redis.url, "--purge").exit_code == 0
    assert bus.length(streams.dead_letters) == 0
