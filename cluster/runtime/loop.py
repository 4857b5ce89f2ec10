"""The one consume loop every stage's actor runs, with its own ``handle`` function.

    own pending entries first (a restarted consumer finishes its own work)
    -> entries left pending too long by consumers that never came back (XAUTOCLAIM)
    -> new entries (blocking briefly)
    -> ``handle(batch)``: process, publish each result, acknowledge its entry
    -> an entry whose processing fails, alone, with any error but Redis's own, is dead-lettered
       with the error as its reason (and acknowledged): the line goes on;
    -> an entry delivered more than ``max_deliveries`` times (it killed its actor, or a restart
       cut it short each time) is dead-lettered without another try.

Undecodable entries never reach ``handle``: the bus dead-letters them as it reads. Only Redis
itself failing (``INFRASTRUCTURE_ERRORS``) ends the loop with its error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from cluster.transport.bus import INFRASTRUCTURE_ERRORS, Delivery, MessageTypes, StreamBus

log = logging.getLogger(__name__)

# Entries pending at one consumer for this long are taken over by another.
RECLAIM_IDLE_MS = 15_000
# An entry delivered more often than this is dead-lettered instead of tried again.
MAX_DELIVERIES = 5


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
    raises before it publishes any (the batch is then tried entry by entry)."""

    def __init__(
        self,
        bus: StreamBus,
        source: StageInput,
        handle: Callable[[list[Delivery]], None],
        *,
        max_deliveries: int = MAX_DELIVERIES,
    ):
        self.bus = bus
        self.source = source
        self.handle = handle
        self.max_deliveries = max_deliveries
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
            self._handle(self._not_too_often(batch))
        while True:
            batch = self._not_too_often(self._reclaimed()) or self.bus.consume(
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

    def _not_too_often(self, batch: list[Delivery]) -> list[Delivery]:
        """``batch`` (redelivered entries) less those delivered more than ``max_deliveries``
        times, which are dead-lettered."""
        counts: dict[str, int] = {}
        for stream in {d.stream for d in batch}:
            ids = [d.entry_id for d in batch if d.stream == stream]
            counts |= self.bus.deliveries(stream, self.source.group, ids)
        kept = []
        for d in batch:
            times = counts.get(d.entry_id, 0)
            if times > self.max_deliveries:
                reason = (
                    f"delivered {times} times without being processed (it failed, or its actor "
                    "died, each time)"
                )
                self._dead_letter(d, reason)
            else:
                kept.append(d)
        return kept

    def _handle(self, batch: list[Delivery]) -> None:
        if not batch:
            return
        try:
            self.handle(batch)
        except INFRASTRUCTURE_ERRORS:
            raise
        except Exception as exc:  # the entry's own fault: it costs that entry only
            if len(batch) > 1:  # one bad entry must not sink the others
                for d in batch:
                    self._handle([d])
                return
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("%s: processing failed: %s", self.source.consumer, reason)
            self._dead_letter(batch[0], reason)

    def _dead_letter(self, d: Delivery, reason: str) -> None:
        self.bus.dead_letter(d.stream, d.group, d.entry_id, d.message.to_entry(), reason)
