import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.transport.bus import DL_ENTRY, DL_REASON, DL_STREAM, StreamBus
from cluster.transport.connection import EmbeddedRedis
from cluster.transport.streams import DecidedProducts, Streams, next_product_seq
from schemas import CameraFrame
from tests.messages import frame


def test_a_consumer_group_delivers_each_entry_to_exactly_one_consumer(bus):
    bus.ensure_group("frames", "detect")
    bus.ensure_group("frames", "detect")  # idempotent
    for i in range(50):
        bus.publish("frames", frame(i))
    seen: dict[str, list[int]] = {"a": [], "b": []}
    while True:
        got = 0
        for consumer in ("a", "b"):
            batch = bus.consume("frames", "detect", consumer, CameraFrame, count=7, block_ms=None)
            seen[consumer] += [d.message.sequence for d in batch]
            bus.ack(*batch)
            got += len(batch)
        if not got:
            break
    assert seen["a"] and seen["b"]
    assert sorted(seen["a"] + seen["b"]) == list(range(50))
    assert bus.client.xpending("frames", "detect")["pending"] == 0


def test_an_entry_left_pending_by_a_killed_consumer_is_reclaimed(bus, embedded_redis):
    bus.ensure_group("frames", "detect")
    for i in range(3):
        bus.publish("frames", frame(i))
    # A real consumer process reads two entries, then dies before acknowledging them.
    script = textwrap.dedent(
        f"""
        import os, sys, time, redis
        from cluster.transport.bus import StreamBus
        from schemas import CameraFrame
        bus = StreamBus(redis.Redis.from_url({embedded_redis.url!r}))
        got = bus.consume("frames", "detect", "doomed", CameraFrame, count=2, block_ms=None)
        print(len(got), flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "2"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    assert bus.client.xpending("frames", "detect")["pending"] == 2
    assert bus.reclaim("frames", "detect", "rescuer", CameraFrame, min_idle_ms=60_000) == []
    time.sleep(0.2)
    rescued = bus.reclaim("frames", "detect", "rescuer", CameraFrame, min_idle_ms=100)
    assert [d.message.sequence for d in rescued] == [0, 1]
    bus.ack(*rescued)
    rest = bus.consume("frames", "detect", "rescuer", CameraFrame, block_ms=None)
    assert [d.message.sequence for d in rest] == [2]
    bus.ack(*rest)
    assert bus.client.xpending("frames", "detect")["pending"] == 0


def test_only_entries_every_group_has_acknowledged_are_trimmed(bus):
    assert bus.trim_processed("frames") == 0  # no stream yet
    for i in range(10):
        bus.publish("frames", frame(i))
    assert bus.trim_processed("frames") == 0  # no group reads it: nothing is known processed
    bus.ensure_group("frames", "detect")
    taken = bus.consume("frames", "detect", "a", CameraFrame, count=6, block_ms=None)
    bus.ack(*taken[:4])  # 0-3 done, 4-5 pending, 6-9 unread
    assert bus.trim_processed("frames", older_than_s=60) == 0  # processed, but too recent
    assert bus.trim_processed("frames") == 4
    bus.ack(*taken[4:])
    assert bus.trim_processed("frames") == 2
    left = bus.consume("frames", "detect", "a", CameraFrame, count=10, block_ms=None)
    assert [d.message.sequence for d in left] == [6, 7, 8, 9]  # nothing unread was lost
    bus.ensure_group("frames", "archive")  # a second group that has read nothing yet
    bus.ack(*left)
    assert bus.trim_processed("frames") == 0
    archived = bus.consume("frames", "archive", "b", CameraFrame, count=10, block_ms=None)
    bus.ack(*archived)
    assert bus.trim_processed("frames") == 4 and bus.client.xlen("frames") == 0


def test_pending_entries_trimmed_away_are_acknowledged_when_claimed(bus, caplog):
    # A stage far behind: publishing trims entries a dead consumer still held.
    bus.ensure_group("frames", "detect")
    for i in range(6):
        bus.publish("frames", frame(i))
    taken = bus.consume("frames", "detect", "dead", CameraFrame, count=6, block_ms=None)
    bus.client.xtrim("frames", minid=taken[4].entry_id, approximate=False)  # 0-3 gone
    rescued = bus.reclaim("frames", "detect", "rescuer", CameraFrame, min_idle_ms=0)
    assert [d.message.sequence for d in rescued] == [4, 5]
    # Only the two still to process are pending: the group can drain.
    assert bus.client.xpending("frames", "detect")["pending"] == 2
    assert bus.lag("frames", "detect") == 2
    assert "frames: 4 entries pending in group detect were trimmed" in caplog.text


def test_trimming_while_a_consumer_acknowledges_neither_fails_nor_loses_an_entry(bus):
    # The aggregator trims while the detectors work: the groups' state moves under the trim.
    bus.ensure_group("frames", "detect")
    for i in range(400):
        bus.publish("frames", frame(i))
    consumer = StreamBus(redis.Redis(connection_pool=bus.client.connection_pool))
    seen: list[int] = []

    def work() -> None:
        while batch := consumer.consume(
            "frames", "detect", "a", CameraFrame, count=1, block_ms=None
        ):
            seen.extend(d.message.sequence for d in batch)
            consumer.ack(*batch)

    worker = threading.Thread(target=work)
    worker.start()
    trimmed = 0
    while worker.is_alive():
        trimmed += bus.trim_processed("frames")
    worker.join()
    trimmed += bus.trim_processed("frames")
    assert seen == list(range(400))
    assert trimmed == 400 and bus.client.xlen("frames") == 0


def test_malformed_entries_go_to_the_dead_letter_stream_and_the_rest_is_processed(bus, caplog):
    bus.ensure_group("frames", "detect")
    bus.publish("frames", frame(0))
    bus.client.xadd("frames", {b"kind": b"frame", b"v": b"1", b"meta": b"{broken"})
    bus.client.xadd("frames", {b"garbage": b"\xff\xfe"})
    bus.publish("frames", frame(1))

    got = bus.consume("frames", "detect", "c", CameraFrame, count=10, block_ms=None)
    assert [d.message.sequence for d in got] == [0, 1]
    dead = bus.client.xrange("deadletter")
    assert len(dead) == 2
    first, second = dead[0][1], dead[1][1]
    assert first[b"meta"] == b"{broken" and b"meta" in first[DL_REASON]
    assert second[b"garbage"] == b"\xff\xfe" and b"kind" in second[DL_REASON]
    assert first[DL_STREAM] == b"frames" and first[DL_ENTRY]
    # The bad entries are acknowledged: only the good ones still wait for their ack.
    assert bus.client.xpending("frames", "detect")["pending"] == 2
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(logged) == 2 and all("frames entry" in m and "dead-lettered" in m for m in logged)


def test_dead_lettering_an_entry_again_adds_nothing(bus):
    # A client retries a command whose reply a broken connection lost: it may have run.
    bus.ensure_group("frames", "detect")
    bus.publish("frames", frame(0))
    [d] = bus.consume("frames", "detect", "c", CameraFrame, count=1, block_ms=None)
    for _ in range(2):
        bus.dead_letter(d.stream, d.group, d.entry_id, d.message.to_entry(), "corrupt")
    assert bus.client.xlen("deadletter") == 1
    assert bus.client.xpending("frames", "detect")["pending"] == 0


def test_the_dead_letters_keep_about_their_own_maxlen(redis_client):
    bus = StreamBus(redis_client, dead_letter_maxlen=100)
    bus.ensure_group("frames", "detect")
    for i in range(600):
        redis_client.xadd("frames", {"kind": "frame", "v": "1", "meta": f"broken {i}"})
    while bus.consume("frames", "detect", "c", CameraFrame, count=100, block_ms=None):
        pass
    assert 100 <= redis_client.xlen("deadletter") < 300  # whole nodes of 100 entries go


def test_publish_bounds_the_stream_and_counts_what_it_trims_unread_per_group(redis_client):
    small = StreamBus(redis_client, maxlen=100)
    small.ensure_group("bounded", "keeps-up")
    small.ensure_group("bounded", "holds")  # reads some, acknowledges none
    small.ensure_group("bounded", "away")  # an outside consumer that stopped reading
    for i in range(1000):
        small.publish("bounded", frame(i))
        for d in small.consume("bounded", "keeps-up", "c", CameraFrame, block_ms=None):
            small.ack(d)
        if i == 49:
            small.consume("bounded", "holds", "c", CameraFrame, count=50, block_ms=None)
    assert redis_client.xlen("bounded") == 100
    assert small.unread_trimmed("bounded") == {"holds": 900, "away": 900}
    assert sorted(small.groups("bounded")) == ["away", "holds", "keeps-up"]
    # The verdict script counts the same way.
    streams = Streams("l1")
    small.ensure_group(streams.verdicts, "qa")
    decided = DecidedProducts(redis_client, "l1")
    for seq in range(105):
        decided.publish(seq, {b"seq": str(seq).encode()}, streams.verdicts, 100)
    assert redis_client.xlen(streams.verdicts) == 100
    assert small.unread_trimmed(streams.verdicts) == {"qa": 5}


def test_acknowledged_and_pending_entries_survive_a_restart_of_the_embedded_redis(tmp_path):
    with EmbeddedRedis(tmp_path) as server:
        bus = StreamBus(redis.Redis.from_url(server.url))
        bus.ensure_group("frames", "detect")
        for i in range(4):
            bus.publish("frames", frame(i))
        first = bus.consume("frames", "detect", "c", CameraFrame, count=2, block_ms=None)
        bus.ack(*first)
        bus.consume("frames", "detect", "c", CameraFrame, count=1, block_ms=None)  # left pending
    assert (tmp_path / "appendonly.aof").exists()

    with EmbeddedRedis(tmp_path) as server:
        bus = StreamBus(redis.Redis.from_url(server.url))
        assert bus.client.xlen("frames") == 4
        pending = bus.client.xpending_range("frames", "detect", "-", "+", 10)
        assert len(pending) == 1 and pending[0]["consumer"] == b"c"
        reclaimed = bus.reclaim("frames", "detect", "c2", CameraFrame, min_idle_ms=0)
        assert [d.message.sequence for d in reclaimed] == [2]
        fresh = bus.consume("frames", "detect", "c2", CameraFrame, block_ms=None)
        assert [d.message.sequence for d in fresh] == [3]


def test_a_second_process_attaches_to_the_running_embedded_redis(tmp_path):
    with EmbeddedRedis(tmp_path) as owner:
        other = EmbeddedRedis(tmp_path).start()
        assert owner.owned and not other.owned
        redis.Redis.from_url(other.url).set("k", "v")
        other.stop()  # not the owner: leaves the server running
        assert redis.Redis.from_url(owner.url).get("k") == b"v"


# The key is cleared per example: the function-scoped client is safe to share.
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.sets(st.integers(min_value=0, max_value=5_000), max_size=30))
def test_decided_products_remember_each_number_and_the_highest(redis_client, seqs):
    redis_client.delete(Streams("l1").decided)
    decided = DecidedProducts(redis_client, "l1")
    for seq in seqs:
        decided.publish(seq, {b"seq": str(seq).encode()}, Streams("l1").verdicts, 100_000)
    assert decided.last() == (max(seqs) if seqs else None)
    assert all(seq in decided for seq in seqs)
    neighbours = {n for seq in seqs for n in (seq - 1, seq + 1, 0) if n >= 0} - seqs
    assert not any(n in decided for n in neighbours)
    # One bit a product: a million products take 125 kB, not the ~60 MB of a set of numbers.
    assert redis_client.strlen(decided.key) == (max(seqs) // 8 + 1 if seqs else 0)


def test_a_verdict_published_again_is_not_published_twice_but_its_views_are_acknowledged(bus):
    # A retried call: Redis ran the first, and the reply was lost with the connection.
    streams = Streams("l1")
    bus.ensure_group(streams.scores, streams.aggregate_group)
    first = bus.client.xadd(streams.scores, {b"v": b"0"}).decode()
    second = bus.client.xadd(streams.scores, {b"v": b"1"}).decode()
    bus.client.xreadgroup(streams.aggregate_group, "a", {streams.scores: ">"})
    decided = DecidedProducts(bus.client, "l1")
    acks = (streams.scores, streams.aggregate_group, [first])
    assert decided.publish(7, {b"seq": b"7"}, streams.verdicts, 100, acks)
    acks = (streams.scores, streams.aggregate_group, [first, second])
    assert not decided.publish(7, {b"seq": b"7"}, streams.verdicts, 100, acks)
    assert [f for _, f in bus.client.xrange(streams.verdicts)] == [{b"seq": b"7"}]
    assert 7 in decided and bus.lag(streams.scores, streams.aggregate_group) == 0


def test_a_restarted_line_numbers_its_products_after_every_one_it_decided_or_saw(redis_client):
    bus = StreamBus(redis_client, maxlen=100)
    assert next_product_seq(redis_client, "l1", ["cam0"]) == 0
    DecidedProducts(redis_client, "l1").publish(41, {b"seq": b"41"}, Streams("l1").verdicts, 100)
    assert next_product_seq(redis_client, "l1", ["cam0"]) == 42
    bus.publish(Streams("l1").frames("cam0"), frame(57, line="l1"))
    assert next_product_seq(redis_client, "l1", ["cam0"]) == 58
