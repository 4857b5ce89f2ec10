"""The one consume loop every stage's actor runs, with its own ``handle`` function.

    own pending entries first (a restarted consumer finishes its own work)
    -> entries left pending too long by consumers that never came back (XAUTOCLAIM)
    -> new entries (blocking briefly)
    -> ``handle(batch)``: process, publish each result, acknowledge its entry
    -> an entry that fails with one of the stage's ``poison`` errors, alone, is dead-lettered
       with the error as its reason (and acknowledged): the line goes on.

Undecodable entries never reach ``handle``: the bus dead-letters them as it reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from cluster.transport.bus import Delivery, MessageTypes, StreamBus

log = logging.getLogger(__name__)

# Entries pending at one consumer for this long are taken over by another.
RECLAIM_IDLE_MS = 15_000


@dataclass(frozen=True)
class StageInput:
    """What a stage consumes: its streams, its consumer group, its own consumer name."""

    streams: list[str]
    group: str
    consumer: str
    message_type: MessageTypes
    batch_size: int = 8
    block_ms: int = 500


class StageLoop:
    """Feeds a stage's batches to ``handle``, which publishes and acknowledges each entry, or
    raises one of ``poison`` before it publishes any (the batch is then tried entry by entry).
    ``on_dead_letter(delivery, reason)`` is told of each entry dead-lettered."""

    def __init__(
        self,
        bus: StreamBus,
        source: StageInput,
        handle: Callable[[list[Delivery]], None],
        *,
        poison: tuple[type[Exception], ...] = (),
        on_dead_letter: Callable[[Delivery, str], None] = lambda d, reason: None,
    ):
        self.bus = bus
        self.source = source
        self.handle = handle
        self.poison = poison
        self.on_dead_letter = on_dead_letter
        for stream in source.streams:
            bus.ensure_group(stream, source.group)

    def run(
        self,
        should_stop: Callable[[], bool],
        *,
        between: Callable[[], None] = lambda: None,
        drain: bool = False,
    ) -> None:
        """Until ``should_stop()``: with ``drain``, not before a round finds nothing new (the
        stages upstream have stopped). ``between`` runs after every round."""
        src = self.source
        for batch in self.bus.own_pending(
            src.streams, src.group, src.consumer, src.message_type, count=src.batch_size
        ):
            self._handle(batch)
        while True:
            batch = self._reclaimed() or self.bus.consume(
                src.streams,
                src.group,
                src.consumer,
                src.message_type,
                count=src.batch_size,
                block_ms=src.block_ms,
            )
            if batch:
                self._handle(batch)
            between()
            if should_stop() and not (drain and batch):
                return

    def _reclaimed(self) -> list[Delivery]:
        src = self.source
        batch: list[Delivery] = []
        for stream in src.streams:
            batch += self.bus.reclaim(
                stream,
                src.group,
                src.consumer,
                src.message_type,
                min_idle_ms=RECLAIM_IDLE_MS,
                count=src.batch_size,
            )
        return batch

    def _handle(self, batch: list[Delivery]) -> None:
        try:
            self.handle(batch)
        except self.poison as exc:
            if len(batch) > 1:  # one bad entry must not sink the others
                for d in batch:
                    self._handle([d])
                return
            [d] = batch
            reason = str(exc) or type(exc).__name__
            self.bus.dead_letter(d.stream, d.group, d.entry_id, d.message.to_entry(), reason)
            self.on_dead_letter(d, reason)
