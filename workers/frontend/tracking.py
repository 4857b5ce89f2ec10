"""Counting products by tracking them: the detector on every frame with motion, each product
followed from frame to frame, one trigger when its centre crosses the centre line.

The motion gate alone fires once per foreground blob: products that touch, or close up behind
one another while in view, are one blob and one trigger, and all but one of them go uncounted.
A detector that boxes each product (YOLO) tells them apart, but only on the frames it sees; here
it sees every frame on which the gate finds something moving, so that the count no longer
depends on when blobs merge.

Association is by centre distance along the belt, not box overlap (IoU, as ByteTrack's): a
small product on a fast belt moves most of its own width between frames, and the boxes of
one product in two frames then barely overlap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from workers.frontend.detect import Detection, Detector, intersection
from workers.frontend.motion import MotionGate, Trigger
from workers.frontend.sources import SourceFrame

# As ByteTrack (Zhang et al., ECCV 2022) does, only a confident detection starts a track;
# weaker ones continue tracks (a product half out of view, blurred, partly hidden). A weak box
# on a glove or on the belt's glare then starts nothing.
START_CONFIDENCE = 0.6
# A detection mostly inside a more confident one is a piece of that product (a detector boxes
# parts of a large product too), not a product of its own.
MAX_CONTAINED = 0.6


@dataclass
class Track:
    """One product followed across frames."""

    centre: tuple[float, float]  # of its box, in frame pixels
    bbox: tuple[int, int, int, int]
    last_frame: int
    speed: float | None = None  # pixels per frame along the belt, once seen twice
    frames_seen: int = 1
    counted: bool = False

    def predicted_x(self, frame_index: int, belt_speed: float) -> float:
        return self.centre[0] + (self.speed or belt_speed) * (frame_index - self.last_frame)


class ProductTracks:
    """Products followed by their detected boxes; each is reported once, on the frame its
    centre crosses the centre line in the direction of travel."""

    def __init__(
        self,
        *,
        direction: int = 1,
        confirm_frames: int = 2,
        lost_after: int = 3,
        start_confidence: float = START_CONFIDENCE,
    ):
        """``confirm_frames``: a track is counted only once its product was detected on this
        many frames (a box on one frame alone is the detector's noise). ``lost_after``: frames
        a track lives on without a detection (the detector missing a product for a frame).
        ``start_confidence``: a detection starts a new track at this confidence or more."""
        if direction not in (1, -1):
            raise ValueError("direction must be 1 (left to right) or -1")
        self.direction = direction
        self.start_confidence = start_confidence
        self.confirm_frames = confirm_frames
        self.lost_after = lost_after
        self.tracks: list[Track] = []
        # The belt's speed (pixels per frame), learned from the tracks: a new track's first
        # step is predicted with it.
        self.belt_speed: float | None = None

    def update(
        self, frame_index: int, found: list[Detection], width: int
    ) -> list[tuple[Track, Detection]]:
        """The frame's detections (best first) in; the tracks whose product crossed the centre
        line on this frame out, each with its detection."""
        found = distinct(found)
        matches = self._match(frame_index, found, width)
        centre, crossed = width / 2.0, []
        for track, detection in matches:
            x, y = box_centre(detection.bbox)
            before = (track.centre[0] - centre) * self.direction
            step = (x - track.centre[0]) / max(1, frame_index - track.last_frame)
            track.speed = step if track.speed is None else 0.5 * (track.speed + step)
            belt = self.belt_speed
            self.belt_speed = step if belt is None else 0.9 * belt + 0.1 * step
            track.centre, track.bbox, track.last_frame = (x, y), detection.bbox, frame_index
            track.frames_seen += 1
            after = (x - centre) * self.direction
            confirmed = track.frames_seen >= self.confirm_frames
            if confirmed and not track.counted and before < 0 <= after:
                track.counted = True
                crossed.append((track, detection))
        matched = {id(d) for _, d in matches}
        self.tracks += [
            Track(box_centre(d.bbox), d.bbox, frame_index)
            for d in found
            if id(d) not in matched and d.confidence >= self.start_confidence
        ]
        self.tracks = [t for t in self.tracks if frame_index - t.last_frame <= self.lost_after]
        return crossed

    def _match(
        self, frame_index: int, found: list[Detection], width: int
    ) -> list[tuple[Track, Detection]]:
        """Each track to the detection nearest where it is expected, nearest pairs first. A
        product is expected within half its width of its predicted place along the belt (before
        the belt's speed is known, up to a sixth of the frame ahead of its last place, never
        behind it: the belt runs one way) and within half its height across."""
        pairs = []
        for t, track in enumerate(self.tracks):
            known = track.speed is not None or self.belt_speed is not None
            expected = track.predicted_x(frame_index, self.belt_speed or 0.0)
            for d, detection in enumerate(found):
                x, y = box_centre(detection.bbox)
                reach = 0.5 * max(detection.bbox[2], track.bbox[2])
                if abs(y - track.centre[1]) >= 0.5 * max(detection.bbox[3], track.bbox[3]):
                    continue  # across the belt: products keep their lane
                if known:
                    near = abs(x - expected) < reach
                else:
                    ahead = (x - track.centre[0]) * self.direction
                    near = -0.25 * reach < ahead < width / 6
                if near:
                    pairs.append((abs(x - expected), t, d))
        taken_t, taken_d, matches = set(), set(), []
        for _, t, d in sorted(pairs):
            if t not in taken_t and d not in taken_d:
                taken_t.add(t)
                taken_d.add(d)
                matches.append((self.tracks[t], found[d]))
        return matches


def box_centre(bbox: tuple[int, int, int, int]) -> tuple[float, float]:
    x, y, w, h = bbox
    return x + w / 2, y + h / 2


def distinct(found: list[Detection]) -> list[Detection]:
    """The detections (best first) less those lying mostly inside a more confident one."""
    kept: list[Detection] = []
    for d in found:
        area = d.bbox[2] * d.bbox[3]
        if all(intersection(d.bbox, k.bbox) < MAX_CONTAINED * area for k in kept):
            kept.append(d)
    return kept


class TrackingGate:
    """The motion gate decides when to look (something moves in view); the detector finds each
    product on those frames; :class:`ProductTracks` says when one crosses the centre line. Its
    trigger's mask is the gate's composite mask of the product's blob, kept to its box."""

    def __init__(self, detector: Detector, gate: MotionGate):
        self.detector = detector
        self.gate = gate
        self.tracks = ProductTracks(direction=gate.direction)
        # The products counted so far; the motion gate's own count (of blobs) goes unused.
        self.products = gate.products

    @property
    def work_width(self) -> int:
        return self.gate.work_width

    @property
    def frame_shape(self) -> tuple[int, int] | None:
        return self.gate.frame_shape

    def update(
        self,
        frame_index: int,
        frame: np.ndarray,
        full_frame: Callable[[], np.ndarray],
        frame_shape: tuple[int, int] | None = None,
    ) -> list[Trigger]:
        """``frame`` as :meth:`MotionGate.update` takes it (perhaps scaled down);
        ``full_frame()`` the camera's frame at its own size, decoded only where the detector
        looks."""
        self.gate.update(frame_index, frame, frame_shape)
        if self.gate.objects_in_view == 0 and not self.tracks.tracks:
            return []
        full = full_frame()
        found = self.detector.detect(full)
        triggers = []
        for _, detection in self.tracks.update(frame_index, found, full.shape[1]):
            mask = self.gate.mask_for(detection.bbox)
            triggers.append(Trigger(frame_index, self.products, detection.bbox, mask))
            self.products += 1
        return triggers


def gate_frame(gate: MotionGate | TrackingGate, frame: SourceFrame) -> list[Trigger]:
    """A source's frame through either gate: the triggers it fired, in the camera's pixels."""
    if isinstance(gate, TrackingGate):
        return gate.update(frame.index, frame.image, frame.whole, frame.shape[:2])
    trigger = gate.update(frame.index, frame.image, frame.shape[:2])
    return [] if trigger is None else [trigger]
