"""The one stage loop, on a real Redis: a bad entry costs only itself, an entry that keeps
coming back is dead-lettered, Redis failing ends the loop."""

import pytest
import redis

from cluster.runtime.loop import StageInput, StageLoop
from cluster.transport.bus import StreamBus
from schemas import RetrainRequest

STREAM = "requests:{l}"


def line_bus(client, told: list | None = None) -> StreamBus:
    """A bus whose dead letters go to line l's stream (and, with ``told``, are told there)."""
    bus = StreamBus(
        client,
        dead_letter_stream="deadletter:{l}",
        on_dead_letter=(lambda stream, reason: told.append((stream, reason)))
        if told is not None
        else (lambda stream, reason: None),
    )
    bus.ensure_group(STREAM, "g")
    return bus


def requests(bus: StreamBus, names: list[str]) -> None:
    for name in names:
        bus.publish(STREAM, RetrainRequest(line="l", by=name, at=1.0))


def loop_once(bus: StreamBus, handle, **options) -> None:
    source = StageInput([STREAM], "g", "c-0", RetrainRequest, batch_size=8, block_ms=50)
    StageLoop(bus, source, handle, **options).run(lambda: True)


def dead_letters(bus: StreamBus) -> list[dict]:
    return [
        {k.decode(): v.decode() for k, v in fields.items() if k.startswith(b"_dl_")}
        for _, fields in bus.client.xrange(bus.dead_letter_stream)
    ]


def test_an_entry_that_fails_costs_only_itself_and_says_why(redis_client):
    told = []
    bus = line_bus(redis_client, told)
    requests(bus, ["a", "poison", "b"])
    done = []

    def handle(batch):
        for d in batch:
            if d.message.by == "poison":
                raise ValueError("cannot handle this one")
        for d in batch:
            done.append(d.message.by)
            bus.ack(d)

    loop_once(bus, handle)
    assert done == ["a", "b"]
    [dead] = dead_letters(bus)
    assert dead["_dl_reason"] == "ValueError: cannot handle this one"
    assert dead["_dl_stream"] == STREAM and told == [(STREAM, dead["_dl_reason"])]
    assert bus.lag(STREAM, "g") == 0  # everything acknowledged, the line goes on


def test_an_entry_delivered_too_often_is_dead_lettered_without_another_try(redis_client):
    bus = line_bus(redis_client)
    requests(bus, ["killer"])
    # It was delivered, and its consumer died each time (nothing acknowledged it).
    for _ in range(3):
        redis_client.xreadgroup("g", "c-0", {STREAM: "0" if _ else ">"})
    handled = []
    loop_once(bus, lambda batch: handled.extend(batch), max_deliveries=3)
    assert handled == []
    [dead] = dead_letters(bus)
    assert dead["_dl_reason"].startswith("delivered 4 times without being processed")
    assert bus.lag(STREAM, "g") == 0


def test_redis_itself_failing_ends_the_loop(redis_client):
    bus = line_bus(redis_client)
    requests(bus, ["a"])

    def handle(batch):
        raise redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind")

    with pytest.raises(redis.ResponseError):
        loop_once(bus, handle)
    assert dead_letters(bus) == []  # not the entry's fault: it stays pending for the next start


def test_undecodable_entries_are_dead_lettered_and_counted_by_the_bus(redis_client):
    told = []
    bus = line_bus(redis_client, told)
    redis_client.xadd(STREAM, {"kind": "retrain_request", "v": "1", "meta": "not json"})
    loop_once(bus, lambda batch: None)
    [(stream, reason)] = told
    assert (
        stream == STREAM and "not JSON" in reason and reason == dead_letters(bus)[0]["_dl_reason"]
    )


def test_an_entry_over_the_byte_limit_is_dead_lettered_unread(redis_client):
    told = []
    bus = line_bus(redis_client, told)
    bus.max_entry_bytes = 4096
    requests(bus, ["a", "x" * 5000, "b"])
    done = []

    def handle(batch):
        done.extend(d.message.by for d in batch)
        bus.ack(*batch)

    loop_once(bus, handle)
    assert done == ["a", "b"]
    [dead] = dead_letters(bus)
    assert "bytes, more than the 4,096 allowed" in dead["_dl_reason"]
    assert len(told) == 1 and bus.lag(STREAM, "g") == 0
