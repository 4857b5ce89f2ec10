"""Names of a line's streams, groups and keys: one place, so every stage agrees."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from cluster.transport.bus import TRIM_COUNTING_LUA, unread_trimmed_key
from workers.qa.samples import SampleStore

# KEYS: decided bitmap, verdict stream, stream the views' scores came from, the verdict stream's
# unread-trimmed counts (see StreamBus.publish). ARGV: seq, maxlen,
# group, number of verdict fields, the fields and values, then the ids to acknowledge.
_PUBLISH_ONCE = (
    TRIM_COUNTING_LUA
    + """
local n_fields = tonumber(ARGV[4])
local fresh = redis.call('GETBIT', KEYS[1], ARGV[1]) == 0
if fresh then
    local xadd = {'XADD', KEYS[2], '*'}
    for i = 5, 4 + 2 * n_fields do xadd[#xadd + 1] = ARGV[i] end
    redis.call(unpack(xadd))
    trim_counting(KEYS[2], KEYS[4], tonumber(ARGV[2]))
    redis.call('SETBIT', KEYS[1], ARGV[1], 1)
end
if #ARGV > 4 + 2 * n_fields then
    redis.call('XACK', KEYS[3], ARGV[3], unpack(ARGV, 5 + 2 * n_fields))
end
return fresh and 1 or 0
"""
)

# KEYS: admitted bitmap, shed bitmap. ARGV: seq, 1 to shed it. Returns {shed, decided now}.
_ADMIT_ONCE = """
if redis.call('GETBIT', KEYS[1], ARGV[1]) == 1 then
    return {redis.call('GETBIT', KEYS[2], ARGV[1]), 0}
end
redis.call('SETBIT', KEYS[1], ARGV[1], 1)
if ARGV[2] == '1' then redis.call('SETBIT', KEYS[2], ARGV[1], 1) end
return {tonumber(ARGV[2]), 1}
"""


@dataclass(frozen=True)
class Streams:
    """Every key of a line carries the line as a Redis Cluster hash tag (``frames:{line1}:cam0``):
    a line's keys share one slot, so its scripts may touch several of them and its streams may
    live on a Redis Cluster, each line on its own shard."""

    line: str

    def _key(self, kind: str) -> str:
        return f"{kind}:{{{self.line}}}"

    def frames(self, camera: str) -> str:
        return f"{self._key('frames')}:{camera}"

    @property
    def views(self) -> str:
        return self._key("views")

    @property
    def scores(self) -> str:
        return self._key("scores")

    @property
    def verdicts(self) -> str:
        return self._key("verdicts")

    @property
    def labels(self) -> str:
        return self._key("labels")

    @property
    def shadow_scores(self) -> str:
        """Scores of the shadow (candidate) model, beside the active one's."""
        return self._key("shadow-scores")

    @property
    def retrain_requests(self) -> str:
        return self._key("retrain-requests")

    @property
    def model_events(self) -> str:
        """What the trainer did: each retraining's candidate, judgement and promotion."""
        return self._key("model-events")

    @property
    def retrain_used(self) -> str:
        """Set of products whose views a promoted model has learned (never learned twice)."""
        return self._key("retrain-used")

    @property
    def retrain_pending(self) -> str:
        """Good views labelled since the last retraining."""
        return self._key("retrain-pending")

    @property
    def join_steps(self) -> str:
        """Hash: camera -> its re-synchronisation steps (JSON), for a restarted aggregator."""
        return self._key("join-steps")

    @property
    def label_index(self) -> str:
        """Hash: ``product_id`` or ``product_id/camera`` -> the label QA gave it."""
        return self._key("labels-latest")

    @property
    def decided(self) -> str:
        """Bitmap of the products that have their verdict (see `DecidedProducts`)."""
        return self._key("verdicts-decided")

    @property
    def admitted(self) -> str:
        """Bitmap of the products whose fate the cameras have decided (see `ProductAdmission`)."""
        return self._key("admitted")

    @property
    def shed(self) -> str:
        """Bitmap of the products shed at ingest."""
        return self._key("shed")

    @property
    def dead_letters(self) -> str:
        """Entries a stage could not process, with the reason (see ``StreamBus.dead_letter``)."""
        return self._key("deadletter")

    @property
    def models(self) -> str:
        """Hash: model version id -> ModelVersion (JSON); see ``Registry``."""
        return self._key("models")

    @property
    def model_active(self) -> str:
        return self._key("model-active")

    @property
    def model_shadow(self) -> str:
        return self._key("model-shadow")

    @property
    def model_history(self) -> str:
        return self._key("model-history")

    @property
    def crops(self) -> str:
        """How the running line's front end cuts crops (CropSpec JSON): a model promoted while
        it runs must have learned from such crops."""
        return self._key("crops")

    @staticmethod
    def line_of(key: str) -> str:
        """The line a key belongs to (its hash tag)."""
        return key[key.index("{") + 1 : key.index("}")]

    detect_group = "detect"
    score_group = "score"
    aggregate_group = "aggregate"


class DecidedProducts:
    """Which products of a line have their verdict: bit *n* of a Redis string for product *n*.

    A line numbers its products 0, 1, 2, ... for as long as it runs, so a bitmap holds a year of
    one product a second in 5 MB; a Redis set of the numbers took 64 bytes a product (measured) and
    grew without bound (2 GB a year), where Redis runs with `noeviction`.
    """

    def __init__(self, client, line: str):
        self.client = client
        self.key = Streams(line).decided
        self._publish_script = client.register_script(_PUBLISH_ONCE)

    def publish(
        self,
        seq: int,
        verdict: dict[bytes, bytes],
        verdicts: str,
        maxlen: int,
        acks: tuple[str, str, list[str]] | None = None,
    ) -> bool:
        """Add ``verdict`` to the stream ``verdicts``, mark ``seq`` decided and acknowledge the
        entries ``acks`` (stream, group, ids) it was made from, in one atomic step; returns False
        and only acknowledges when ``seq`` was already decided.

        A client retries a command whose connection broke (a Redis restart) without knowing
        whether Redis ran it: the retried call must not publish a second verdict.
        """
        stream, group, ids = acks or (verdicts, "", [])  # a key of the line's slot
        fields = [part for item in verdict.items() for part in item]
        args = [seq, maxlen, group, len(verdict), *fields, *ids]
        keys = [self.key, verdicts, stream, unread_trimmed_key(verdicts)]
        return bool(self._publish_script(keys=keys, args=args))

    def settle(self, seq: int, acks: tuple[str, str, list[str]]) -> None:
        """Mark ``seq`` decided without a verdict (no camera saw a product there) and
        acknowledge the entries ``acks`` (stream, group, ids) that said so, together."""
        stream, group, ids = acks
        with self.client.pipeline(transaction=True) as pipe:
            pipe.setbit(self.key, seq, 1)
            if ids:
                pipe.xack(stream, group, *ids)
            pipe.execute()

    def __contains__(self, seq: int) -> bool:
        return bool(self.client.getbit(self.key, seq))

    def undecided(self, low: int, high: int) -> list[int]:
        """Product numbers from ``low`` to ``high`` (inclusive) without a verdict."""
        if high < low:
            return []
        raw = self.client.getrange(self.key, low // 8, high // 8)
        bits = np.unpackbits(np.frombuffer(raw, np.uint8)) if raw else np.zeros(0, np.uint8)
        numbers = np.arange(low - low % 8, low - low % 8 + len(bits))
        wanted = (numbers >= low) & (numbers <= high)
        # Bits past the bitmap's end (numbers above the highest decided) read as undecided.
        past = np.arange(low - low % 8 + len(bits), high + 1)
        return [int(n) for n in numbers[wanted & (bits == 0)]] + [int(n) for n in past]

    def last(self) -> int | None:
        """The highest decided product number, or None before the first verdict."""
        return _highest_bit(self.client, self.key)


def _highest_bit(client, key: str) -> int | None:
    """The highest bit set in a bitmap no bit of which is ever cleared, or None."""
    size = client.strlen(key)
    if not size:
        return None
    # SETBIT grows the string just enough for the bit it sets, so the highest set bit is in the
    # last byte; Redis counts bits from each byte's top bit.
    last = client.getrange(key, -1, -1)[0]
    return (size - 1) * 8 + 8 - (last & -last).bit_length()


class ProductAdmission:
    """Which products the cameras inspect and which they shed: the first camera to reach a
    product decides for all (two bitmaps, like `DecidedProducts`), so a product is never
    judged by only some of its views."""

    def __init__(self, client, line: str):
        self.client = client
        streams = Streams(line)
        self.keys = [streams.admitted, streams.shed]
        self._admit = client.register_script(_ADMIT_ONCE)

    def decided(self, seq: int) -> bool | None:
        """True: shed; False: inspected; None: not decided yet."""
        pipe = self.client.pipeline(transaction=False)
        for key in self.keys:
            pipe.getbit(key, seq)
        admitted, shed = pipe.execute()
        return bool(shed) if admitted else None

    def decide(self, seq: int, shed: bool) -> tuple[bool, bool]:
        """Decide ``seq`` unless a camera has: (whether it is shed, whether this call decided)."""
        is_shed, now = self._admit(keys=self.keys, args=[seq, int(shed)])
        return bool(is_shed), bool(now)


class JoinSteps:
    """Each camera's re-synchronisation steps (JSON per camera), kept for a restarted
    aggregator."""

    def __init__(self, client, line: str):
        self.client = client
        self.key = Streams(line).join_steps

    def load(self) -> dict[str, list]:
        return {c.decode(): json.loads(v) for c, v in self.client.hgetall(self.key).items()}

    def of(self, camera: str) -> list[tuple[int, int]]:
        """One camera's steps, sorted (see ``VerdictJoin.steps``)."""
        raw = self.client.hget(self.key, camera)
        return sorted((int(a), int(b)) for a, b in json.loads(raw)) if raw else []

    def save(self, steps: dict[str, list]) -> None:
        self.client.hset(self.key, mapping={c: json.dumps(s) for c, s in steps.items()})

    def clear(self) -> None:
        self.client.delete(self.key)


class RetrainState:
    """What the trainer keeps between retrainings: good views labelled since the last one, and
    the products a promoted model has learned (never learned twice)."""

    def __init__(self, client, line: str):
        self.client = client
        self.streams = Streams(line)

    def add_good_views(self, n: int) -> int:
        """Count ``n`` more good views; the count since the last retraining."""
        if n:
            return int(self.client.incrby(self.streams.retrain_pending, n))
        return int(self.client.get(self.streams.retrain_pending) or 0)

    def reset(self) -> None:
        self.client.set(self.streams.retrain_pending, 0)

    def used(self) -> set[str]:
        return {v.decode() for v in self.client.smembers(self.streams.retrain_used)}

    def mark_used(self, products) -> None:
        if products:
            self.client.sadd(self.streams.retrain_used, *products)


def next_product_seq(client, line: str, cameras: list[str]) -> int:
    """The number the line's next product gets: one past every product it has seen.

    A restarted line must not reuse numbers: the aggregator would take the new products' views
    for late duplicates of decided ones.
    """
    streams = Streams(line)
    # Decided, or admitted by a camera (its frames may be gone from the streams).
    decided = [_highest_bit(client, key) for key in (streams.decided, streams.admitted)]
    seen = [seq for seq in decided if seq is not None]
    # Processed frames and views leave Redis: a product between stages is in one of these.
    for stream in [streams.frames(c) for c in cameras] + [streams.views, streams.scores]:
        newest = client.xrevrange(stream, count=1)
        if newest:
            seen.append(json.loads(newest[0][1][b"meta"])["product_seq"])
    return max(seen) + 1 if seen else 0


def line_groups(streams: Streams, cameras: list[str]) -> list[tuple[str, str]]:
    """Every (stream, consumer group) pair that carries a line's work, in stage order."""
    pairs = [(streams.frames(c), streams.detect_group) for c in cameras]
    return pairs + [
        (streams.views, streams.score_group),
        (streams.scores, streams.aggregate_group),
    ]


def reset_line(client, line: str, cameras: list[str], samples: SampleStore | None = None) -> None:
    """Forget a previous run of a replayed line: its product numbers start again at 0.

    Its labels and stored samples go too: they would name the new run's products.
    """
    s = Streams(line)
    streams = [s.frames(c) for c in cameras] + [s.views, s.scores, s.verdicts]
    client.delete(
        *streams,
        *[unread_trimmed_key(stream) for stream in streams],
        s.decided,
        s.admitted,
        s.shed,
        s.labels,
        s.label_index,
        s.shadow_scores,
        s.retrain_used,
        s.retrain_pending,
        s.retrain_requests,
        s.join_steps,
        s.dead_letters,
    )
    if samples is not None:
        samples.forget_line(line)
