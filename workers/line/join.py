"""The verdict join: the views of a product from all cameras -> one verdict, defective if any
view is. Plain Python (the aggregator actor moves the messages)."""

from __future__ import annotations

import bisect
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from schemas import NoProduct, Verdict, ViewResult, ViewScore, make_product_id

log = logging.getLogger(__name__)

# Decided products whose capture time the join remembers: where a camera's view that a
# re-synchronisation moves back (a product seen twice) belongs.
DECIDED_REMEMBERED = 256
# Re-synchronisations remembered per camera (older views are long decided).
STEPS_REMEMBERED = 32
# The tolerance is checked against the time between products at every this many products.
PERIOD_CHECKED_EVERY = 32


def line_number(steps: list[tuple[int, int]], product_seq: int) -> int:
    """The line's number for the product a camera numbered ``product_seq``, given that camera's
    re-synchronisation ``steps`` (see :attr:`VerdictJoin.steps`)."""
    i = bisect.bisect_right(steps, (product_seq, float("inf"))) - 1
    return product_seq + (steps[i][1] if i >= 0 else 0)


@dataclass
class Settled:
    """What the join is done with: a verdict to publish, or None for views it drops (from a
    camera the line does not have; a second view of a product already decided), and the
    receipts given with those views, to acknowledge with the verdict. ``no_product``: a number
    every camera said was no product (a glove, a tool): decided, without a verdict."""

    verdict: Verdict | None
    receipts: list[Any] = field(default_factory=list)
    no_product: int | None = None


@dataclass
class _Pending:
    first_seen: float
    views: dict[str, ViewScore] = field(default_factory=dict)
    receipts: dict[str, list[Any]] = field(default_factory=dict)  # by camera, duplicates too
    absent: set[str] = field(default_factory=set)  # cameras that saw no product there

    def heard(self, camera: str) -> bool:
        """Whether ``camera`` has given its view of this product, or said there was none."""
        return camera in self.views or camera in self.absent

    def times(self, but: str | None = None) -> list[float]:
        return [v.captured_at for c, v in self.views.items() if c != but]


class VerdictJoin:
    """Joins the views of a product from all cameras into one verdict: defective if any view is.

    A view delivered twice counts once. A product still missing a camera's view gets an
    ``incomplete`` verdict naming it once ``timeout_s`` have passed since its first view *and*
    that camera has either fallen silent for ``timeout_s`` or already delivered a view of a
    product ``reorder_window`` places later. A backlog upstream (views late but coming, in order)
    therefore never expires a product; a dead camera or a product it missed does.

    Each camera numbers the products its own motion gate sees, so a camera that misses one, sees
    one twice, or restarts, numbers every later product out of step with the others. With
    ``max_spread_s`` (under half the time between two products) the join checks the numbers
    against capture times. A view captured further than that from every other view of its
    product, but within it of the views two other cameras (on a two-camera line, the other one)
    gave another product, belongs to that product: its camera is *re-synchronised*. The view
    moves there, and from it on the camera's numbers are shifted as much (its *steps*, which
    the caller may keep and :meth:`restore_steps` after a restart); a product it skipped is
    decided without it at once. A view that matches no product (a camera whose clock is off)
    is left out of its product's verdict and named, the product waiting for it only while it
    may still find its own (another camera has not yet delivered anything captured after it).
    Views of two products are never joined silently.
    """

    def __init__(
        self,
        line: str,
        cameras: list[str],
        timeout_s: float = 10.0,
        reorder_window: int = 8,
        max_spread_s: float | None = None,
    ):
        self.line = line
        self.cameras = list(cameras)
        self.timeout_s = timeout_s
        self.reorder_window = reorder_window
        self.max_spread_s = max_spread_s
        self._pending: dict[int, _Pending] = {}
        self._last_seen: dict[str, float] = {}  # when each camera's last view arrived
        self._latest_capture: dict[str, float] = {}  # each camera's latest capture time
        self._max_seq: dict[str, int] = {}
        # camera -> [(first number of the camera's, shift to the line's number)], sorted
        self._steps: dict[str, list[tuple[int, int]]] = {}
        self._decided: OrderedDict[int, float] = OrderedDict()  # seq -> its views' capture time
        self._waiting: set[int] = set()  # full products holding a view that may belong elsewhere
        self._skipped: dict[int, set[str]] = {}  # seq -> cameras re-synchronised past it
        self._tolerance_warned = False
        self.duplicates = 0
        self.unknown_camera = 0
        self.out_of_step = 0
        self.resynchronised: dict[str, int] = {}  # by camera

    @property
    def pending_products(self) -> list[int]:
        return sorted(self._pending)

    @property
    def steps(self) -> dict[str, list[tuple[int, int]]]:
        """Each re-synchronised camera's steps: (its first number, shift to the line's), sorted.
        Kept outside the join (Redis), they let a restarted join number the cameras as before."""
        return {camera: list(steps) for camera, steps in self._steps.items()}

    def restore_steps(self, steps: dict[str, list[tuple[int, int]]]) -> None:
        """Number the cameras as a join whose :attr:`steps` these were did."""
        self._steps = {
            camera: sorted((int(raw), int(shift)) for raw, shift in camera_steps)
            for camera, camera_steps in steps.items()
            if camera in self.cameras
        }

    def line_seq(self, camera: str, product_seq: int) -> int:
        """The line's number for the product a camera numbered ``product_seq``."""
        return line_number(self._steps.get(camera, []), product_seq)

    def add(
        self, score: ViewScore | NoProduct, now: float | None = None, receipt: Any = None
    ) -> list[Settled]:
        """Take one view, or a camera's word that there was no product (``receipt``: what the
        caller needs to acknowledge it, given back with the verdict that uses it); returns the
        verdicts it completes."""
        now = time.time() if now is None else now
        receipts = [] if receipt is None else [receipt]
        if score.camera not in self.cameras:
            self.unknown_camera += 1
            log.warning(
                "%s: view of product %d from camera %s, not one of the line's (%s): ignored",
                self.line,
                score.product_seq,
                score.camera,
                ", ".join(self.cameras),
            )
            return [Settled(None, receipts)]
        self._last_seen[score.camera] = now
        self._latest_capture[score.camera] = max(
            self._latest_capture.get(score.camera, score.captured_at), score.captured_at
        )
        seq = self.line_seq(score.camera, score.product_seq)
        if isinstance(score, NoProduct):
            placed = {seq} if self._place_absence(score.camera, seq, now, receipts) else set()
        else:
            placed = {seq} if self._place(score, seq, now, receipts) else set()
        received, dropped = self._rehome(now)
        # A product waiting for a view to find its own product may be done now.
        return dropped + self._settle(placed | received | self._waiting, now)

    def expire(self, now: float | None = None, *, flush: bool = False) -> list[Settled]:
        """Incomplete verdicts for products given up on; ``flush`` gives up on all (shutdown)."""
        now = time.time() if now is None else now
        received, dropped = self._rehome(now)
        late = {seq for seq, p in self._pending.items() if flush or self._given_up(seq, p, now)}
        return dropped + self._settle(received - late, now) + self._settle(late, now, give_up=True)

    # -- placing views --------------------------------------------------------------------

    def _place(self, view: ViewScore, seq: int, now: float, receipts: list) -> bool:
        """Put ``view`` in product ``seq``; False if that product has this camera's view already
        (the receipts then go with that one)."""
        entry = self._pending.setdefault(seq, _Pending(now))
        entry.receipts.setdefault(view.camera, []).extend(receipts)
        if view.camera in entry.views:
            self.duplicates += 1
            log.info(
                "%s: view of product %d from %s again: counted once", self.line, seq, view.camera
            )
            return False
        entry.views[view.camera] = view
        self._max_seq[view.camera] = max(self._max_seq.get(view.camera, -1), seq)
        return True

    def _place_absence(self, camera: str, seq: int, now: float, receipts: list) -> bool:
        """Note that ``camera`` saw no product ``seq``; False if it had said so already."""
        entry = self._pending.setdefault(seq, _Pending(now))
        entry.receipts.setdefault(camera, []).extend(receipts)
        if entry.heard(camera):
            self.duplicates += 1
            return False
        entry.absent.add(camera)
        self._max_seq[camera] = max(self._max_seq.get(camera, -1), seq)
        return True

    def _settle(self, seqs: set[int], now: float, give_up: bool = False) -> list[Settled]:
        """Verdicts of the products ``seqs`` that have a view from every camera (all of them
        when given up on). One holding a displaced view waits while that view's own product may
        still show up."""
        settled = []
        for seq in sorted(seqs):
            entry = self._pending.get(seq)
            if entry is None:
                continue
            if not give_up:
                if not all(entry.heard(c) for c in self.cameras):
                    self._waiting.discard(seq)  # a moved camera's view of it is still to come
                    continue
                if any(self._may_find_its_product(entry, c) for c in self._displaced(entry)):
                    self._waiting.add(seq)
                    continue
            self._waiting.discard(seq)
            settled.append(self._emit(seq, now))
        return settled

    def _rehome(self, now: float) -> tuple[set[int], list[Settled]]:
        """Re-synchronise the cameras of views captured apart from their product's other views
        but with another product's: returns the products that received views, and the views
        dropped (a product's second view from one camera, its first already decided)."""
        received: set[int] = set()
        dropped: list[Settled] = []
        if self.max_spread_s is None or len(self.cameras) < 2:
            return received, dropped
        for seq, entry in list(self._pending.items()):
            for camera, view in list(entry.views.items()):
                if self._pending.get(seq) is not entry or entry.views.get(camera) is not view:
                    continue  # moved by a re-synchronisation in this loop
                if any(
                    abs(other.captured_at - view.captured_at) <= self.max_spread_s
                    for c, other in entry.views.items()
                    if c != camera
                ):
                    continue
                home = self._captured_with(view, seq)
                if home is not None:
                    moved, lost = self._resynchronise(camera, seq, home, now)
                    received |= moved
                    dropped += lost
        return received, dropped

    def _displaced(self, entry: _Pending) -> list[str]:
        """Cameras whose view a majority (two or more) of the product's views, agreeing in
        capture time, put elsewhere in time."""
        if self.max_spread_s is None or len(entry.views) < 3:
            return []
        median = float(np.median(entry.times()))
        out = [c for c, v in entry.views.items() if abs(v.captured_at - median) > self.max_spread_s]
        agreeing = len(entry.views) - len(out)
        return out if agreeing >= 2 and agreeing > len(out) else []

    def _captured_with(self, view: ViewScore, seq: int) -> int | None:
        """The product other than ``seq``, pending or decided, that other cameras (two, or the
        other one of a two-camera line) captured within ``max_spread_s`` of ``view``: the
        nearest in time, if any."""
        quorum = min(2, len(self.cameras) - 1)
        candidates = list(self._decided.items())
        for s, p in self._pending.items():
            near = [
                t
                for t in p.times(but=view.camera)
                if abs(t - view.captured_at) <= self.max_spread_s
            ]
            if s != seq and len(near) >= quorum:
                candidates.append((s, float(np.median(near))))
        best, best_gap = None, self.max_spread_s
        for s, captured in candidates:
            gap = abs(view.captured_at - captured)
            if s != seq and gap <= best_gap:
                best, best_gap = s, gap
        return best

    def _may_find_its_product(self, entry: _Pending, camera: str) -> bool:
        """Whether a displaced view's product may still show up: some other camera has not yet
        delivered anything captured after it (plus the tolerance)."""
        after = entry.views[camera].captured_at + self.max_spread_s
        return any(
            self._latest_capture.get(c, float("-inf")) <= after for c in self.cameras if c != camera
        )

    def _resynchronise(
        self, camera: str, seq: int, target: int, now: float
    ) -> tuple[set[int], list[Settled]]:
        """``camera``'s view in product ``seq`` is of product ``target``: shift that view and the
        camera's later numbers as much, moving the views already placed; returns the products
        that received views, and the views of products already decided (dropped)."""
        raw = self._pending[seq].views[camera].product_seq
        shift = target - seq
        steps = self._steps.setdefault(camera, [])
        following = [s for s in steps if s[0] > raw]
        up_to = following[0][0] if following else float("inf")
        new_step = (raw, self.line_seq(camera, raw) - raw + shift)
        steps[:] = [s for s in steps if s[0] < raw] + [new_step] + following
        if len(steps) > STEPS_REMEMBERED:
            # Numbers before the oldest step remembered are taken as shifted like it.
            del steps[: len(steps) - STEPS_REMEMBERED]
            steps[0] = (0, steps[0][1])
        self.resynchronised[camera] = self.resynchronised.get(camera, 0) + 1
        log.warning(
            "%s: %s re-synchronised by capture time: its product %d is the line's %d (%+d)",
            self.line,
            camera,
            raw,
            target,
            shift,
        )
        last_decided = max(self._decided, default=-1)
        for s in range(seq, target):  # products the camera missed: none of its views will come
            if s in self._pending or s > last_decided:
                self._skipped.setdefault(s, set()).add(camera)
        moving = []
        for s, entry in list(self._pending.items()):
            view = entry.views.get(camera)
            if view is not None and raw <= view.product_seq < up_to:
                moving.append((entry.views.pop(camera), entry.receipts.pop(camera)))
                if not entry.views:
                    self._pending.pop(s)  # held this camera's view and nothing else
                    self._waiting.discard(s)
        received, dropped = set(), []
        for view, receipts in moving:
            new = self.line_seq(camera, view.product_seq)
            if new in self._decided:  # a product seen twice, its verdict out with the first view
                self.duplicates += 1
                dropped.append(Settled(None, receipts))
            elif self._place(view, new, now, receipts):
                received.add(new)
        return received, dropped

    def _given_up(self, seq: int, entry: _Pending, now: float) -> bool:
        skipped = self._skipped.get(seq, set())
        if skipped and all(entry.heard(c) or c in skipped for c in self.cameras):
            return True  # what it lacks will never come
        if now - entry.first_seen < self.timeout_s:
            return False
        for camera in self.cameras:
            if entry.heard(camera) or camera in skipped:
                continue
            silent = now - self._last_seen.get(camera, entry.first_seen) >= self.timeout_s
            moved_on = self._max_seq.get(camera, -1) >= seq + self.reorder_window
            if not (silent or moved_on):
                return False
        return True

    # -- the verdict ------------------------------------------------------------------------

    def _out_of_step(self, views: list[ViewScore]) -> dict[str, float]:
        """Cameras whose view lies further than ``max_spread_s`` from the views' median capture
        time, with how far."""
        if self.max_spread_s is None or len(views) < 2:
            return {}
        median = float(np.median([v.captured_at for v in views]))
        gaps = {v.camera: v.captured_at - median for v in views}
        return {c: gap for c, gap in gaps.items() if abs(gap) > self.max_spread_s}

    def _check_tolerance(self) -> None:
        """Warn (once) when ``max_spread_s`` is not under half the time between two products:
        a view could then be within the tolerance of two products."""
        if self.max_spread_s is None or self._tolerance_warned:
            return
        times = sorted(self._decided.values())
        period = float(np.median(np.diff(times)))
        if 2 * self.max_spread_s >= period:
            self._tolerance_warned = True
            log.warning(
                "%s: max_camera_spread_s %g s is not under half the time between products "
                "(median %.2f s): a view may be joined to the wrong product",
                self.line,
                self.max_spread_s,
                period,
            )

    def _emit(self, seq: int, now: float) -> Settled:
        entry = self._pending.pop(seq)
        if not entry.views and entry.absent:
            # No camera showed a product there, some said so: the others were re-synchronised
            # past the number or are late with nothing to show.
            self._skipped.pop(seq, None)
            receipts = [r for rs in entry.receipts.values() for r in rs]
            return Settled(None, receipts, no_product=seq)
        present = [entry.views[c] for c in self.cameras if c in entry.views]
        out_of_step = self._out_of_step(present)
        self.out_of_step += len(out_of_step)
        views = [v for v in present if v.camera not in out_of_step]
        missing = [c for c in self.cameras if c not in entry.views or c in out_of_step]
        if any(v.is_defect for v in views):
            decision = "defect"
        elif missing:
            decision = "unknown"  # the missing view might have shown the defect
        else:
            decision = "good"
        captured = [v.captured_at for v in views] or [v.captured_at for v in present]
        if len(views) >= min(2, len(self.cameras) - 1):
            self._decided[seq] = float(np.median(captured))
            while len(self._decided) > DECIDED_REMEMBERED:
                self._decided.popitem(last=False)
            if len(self._decided) >= 2 and seq % PERIOD_CHECKED_EVERY == 0:
                self._check_tolerance()
        reasons = []
        if out_of_step:
            reasons.append(
                ", ".join(f"{c} out of step ({gap:+.2f} s)" for c, gap in out_of_step.items())
                + f": captured more than {self.max_spread_s:g} s from the product's other views"
            )
        skipped = self._skipped.pop(seq, set())
        unseen = [c for c in self.cameras if c not in entry.views and c in skipped]
        if unseen:
            reasons.append(f"{', '.join(unseen)} did not see it (numbers re-synchronised past it)")
        if entry.absent:
            reasons.append(f"{', '.join(sorted(entry.absent))} saw no product there")
        late = [c for c in self.cameras if not entry.heard(c) and c not in skipped]
        if late:
            reasons.append(f"no view from {', '.join(late)} within {self.timeout_s:g} s")
        status = "incomplete" if reasons else "complete"
        if reasons:
            log.warning("%s: product %d incomplete: %s", self.line, seq, "; ".join(reasons))
        spread = (
            max(v.captured_at for v in views) - min(v.captured_at for v in views) if views else 0.0
        )
        verdict = Verdict(
            product_id=make_product_id(self.line, seq),
            line=self.line,
            product_seq=seq,
            decision=decision,
            status=status,
            views=[
                ViewResult(
                    camera=v.camera,
                    score=v.score,
                    threshold=v.threshold,
                    is_defect=v.is_defect,
                    model_version=v.model_version,
                    regions=v.regions,
                )
                for v in views
            ],
            missing_cameras=missing,
            reason="; ".join(reasons) or None,
            captured_at=min(captured),
            decided_at=now,
            latency_ms={
                "frame_to_verdict": max(0.0, (now - min(captured)) * 1e3),
                "camera_spread": spread * 1e3,
            },
        )
        return Settled(verdict, [r for rs in entry.receipts.values() for r in rs])
