"""A line's dead letters: entries a stage could not process, each with its reason (see
``StreamBus.dead_letter``), to inspect, send back to their stream, or purge."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from cluster.transport.bus import DL_ENTRY, DL_GROUP, DL_REASON, DL_STREAM
from cluster.transport.streams import Streams


@dataclass(frozen=True)
class DeadLetter:
    entry_id: str  # in the dead-letter stream
    stream: str  # where it came from
    group: str
    source_entry: str
    reason: str
    kind: str
    fields: dict[bytes, bytes]  # the original entry

    def summary(self) -> dict:
        return {
            "entry_id": self.entry_id,
            "stream": self.stream,
            "group": self.group,
            "source_entry": self.source_entry,
            "kind": self.kind,
            "reason": self.reason,
            "bytes": sum(len(v) for v in self.fields.values()),
        }


def _text(fields: dict[bytes, bytes], name: bytes) -> str:
    return fields.get(name, b"").decode(errors="replace")


def dead_letters(client: redis.Redis, line: str, reason: str | None = None) -> list[DeadLetter]:
    """The line's dead letters, oldest first; with ``reason``, those whose reason contains it."""
    out = []
    for entry_id, fields in client.xrange(Streams(line).dead_letters):
        letter = DeadLetter(
            entry_id.decode(),
            _text(fields, DL_STREAM),
            _text(fields, DL_GROUP),
            _text(fields, DL_ENTRY),
            _text(fields, DL_REASON),
            _text(fields, b"kind"),
            {k: v for k, v in fields.items() if not k.startswith(b"_dl_")},
        )
        if reason is None or reason.lower() in letter.reason.lower():
            out.append(letter)
    return out


def replay(client: redis.Redis, line: str, letter: DeadLetter) -> str:
    """Send a dead letter back to its stream as a new entry (its stage reads it again) and take
    it off the dead-letter stream, in one transaction; the new entry's id."""
    if Streams.line_of(letter.stream) != line:
        raise ValueError(
            f"dead letter {letter.entry_id} came from {letter.stream}, not line {line}"
        )
    pipe = client.pipeline(transaction=True)
    pipe.xadd(letter.stream, letter.fields)
    pipe.xdel(Streams(line).dead_letters, letter.entry_id)
    new_id, _ = pipe.execute()
    return new_id.decode()


def purge(client: redis.Redis, line: str, letters: list[DeadLetter]) -> int:
    """Delete these dead letters; how many were."""
    if not letters:
        return 0
    return int(client.xdel(Streams(line).dead_letters, *[d.entry_id for d in letters]))
