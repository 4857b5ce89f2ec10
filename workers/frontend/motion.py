"""The motion gate: fire once per product, when it crosses the centre of the view.

OpenCV's MOG2 background subtractor separates moving products from the belt on every frame
(cheap); the heavy detector then runs once per product, not per frame. Blobs are matched to the
previous frame's by nearest centroid, and a trigger fires when a blob's centroid passes the
centre line in the direction of travel: one crossing, one trigger.

The gate also builds the product's composite foreground mask: the masks of its last few frames,
each shifted so that the blob centroids align, combined by union. One frame's mask has holes
where the product resembles the belt; the union over frames fills them.

It sees every gated frame of every camera, so it works at most ``work_width`` pixels across
(the product still spans dozens of them): on frames the camera ingest decoded that small (MJPEG)
or that it scales down by a whole factor itself, and it scales its boxes and masks back up to the
camera's frame. At 480 x 270 scaling down cut its time per frame from 2.1 to 0.6 ms, time the
scorers get instead, with the same crops (IoU against the true boxes 0.95 either way).

Each frame is first brought to the belt model's brightness (one gain, from the medians): light
that drifts or flickers then does not turn the whole belt into foreground.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from workers.frontend.matte import DeepMatter

# MOG2 needs a few frames before its background plate means anything to a matting model.
WARMUP_FRAMES = 10
# While a product is in view the belt's model all but stops learning (MOG2's own rate is
# 1 / history): on a line of near-identical plain products it otherwise takes them for belt
# after five or so, and the gate misses or double-counts them. A thing that stays in view is
# still learnt, in thousands of frames instead of hundreds.
LEARNING_RATE_WITH_PRODUCT = 1e-4


@dataclass(frozen=True)
class Trigger:
    frame_index: int
    product_seq: int
    bbox: tuple[int, int, int, int]  # x, y, w, h of the blob in the trigger frame
    composite_mask: np.ndarray  # (H, W) uint8, 255 = product


@dataclass(frozen=True)
class Blob:
    """A foreground object in frame coordinates."""

    centroid: tuple[float, float]
    bbox: tuple[int, int, int, int]  # x, y, w, h


@dataclass
class _Blob:
    centroid: tuple[float, float]
    bbox: tuple[int, int, int, int]
    mask: np.ndarray  # (h, w) bool, this blob only, at the gate's working size
    # (centroid, mask) of this blob in its last few frames, this one last (matched frame to
    # frame by centroid): plain pairs, so that a blob does not keep its predecessors alive.
    history: tuple[tuple[tuple[float, float], np.ndarray], ...] = ()


class MotionGate:
    def __init__(
        self,
        *,
        history: int = 300,
        var_threshold: float = 32.0,
        min_area_fraction: float = 0.01,
        composite_frames: int = 4,
        direction: int = 1,
        start_count: int = 0,
        matter: DeepMatter | None = None,
        plate: np.ndarray | None = None,
        plate_threshold: int = 30,
        work_width: int = 160,
    ):
        """``plate``: a given background image (BGR, the empty belt) instead of a learned one; the
        per-frame mask is then the pixels that differ from it by more than ``plate_threshold``.
        ``matter``: a deep matting model that makes the per-frame mask from the frame and the
        plate (learned by MOG2 unless given). ``work_width``: wider frames are scaled down by a
        whole factor to at most this many pixels across before anything else."""
        if direction not in (1, -1):
            raise ValueError("direction must be 1 (left to right) or -1")
        if work_width < 32:
            raise ValueError(f"work_width must be at least 32 pixels, got {work_width}")
        self._subtractor = cv2.createBackgroundSubtractorMOG2(
            history=history, varThreshold=var_threshold, detectShadows=False
        )
        self.min_area_fraction = min_area_fraction
        self.direction = direction
        self.products = start_count
        self.matter = matter
        self.plate = plate
        self.plate_threshold = plate_threshold
        self.work_width = work_width
        self._frames_seen = 0
        self.frame_shape: tuple[int, int] | None = None
        self._work_shape: tuple[int, int] | None = None  # (h, w) the gate works at
        self._work_plate: np.ndarray | None = None
        self._belt: np.ndarray | None = None  # where the last frame showed belt
        self._previous: list[_Blob] = []
        self.composite_frames = composite_frames
        self._open = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
        self._close = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))

    @property
    def blobs(self) -> list[Blob]:
        """The foreground objects of the last frame, in frame coordinates."""
        sx, sy = self._scale()
        return [
            Blob((b.centroid[0] * sx, b.centroid[1] * sy), self._to_frame(b.bbox))
            for b in self._previous
        ]

    @property
    def objects_in_view(self) -> int:
        """Foreground blobs in the last frame (0: empty belt)."""
        return len(self._previous)

    def _background(self) -> np.ndarray:
        """The belt (BGR) at the working size: the given plate, or MOG2's learned background."""
        if self._work_plate is not None:
            return self._work_plate
        return self._subtractor.getBackgroundImage()

    def _scale(self) -> tuple[float, float]:
        """Frame pixels per working pixel, across and down."""
        if self.frame_shape is None:
            return 1.0, 1.0
        return (
            self.frame_shape[1] / self._work_shape[1],
            self.frame_shape[0] / self._work_shape[0],
        )

    def _to_frame(self, bbox: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """A working-size box in frame pixels, rounded outwards and kept inside the frame."""
        sx, sy = self._scale()
        x, y, w, h = bbox
        x0, y0 = int(x * sx), int(y * sy)
        x1 = min(self.frame_shape[1], int(np.ceil((x + w) * sx)))
        y1 = min(self.frame_shape[0], int(np.ceil((y + h) * sy)))
        return x0, y0, x1 - x0, y1 - y0

    def update(
        self, frame_index: int, frame: np.ndarray, frame_shape: tuple[int, int] | None = None
    ) -> Trigger | None:
        """``frame_shape``: the (h, w) of the camera's frame where ``frame`` is a scaled-down
        copy of it (a JPEG decoded at 1/2 to 1/8 size); boxes and masks come out in the camera's
        frame either way."""
        if frame is None or frame.ndim != 3 or frame.size == 0:
            raise ValueError(f"frame {frame_index}: not a colour image")
        shape = tuple(frame_shape or frame.shape[:2])
        if self.frame_shape is None:
            self.frame_shape = shape
            h, w = frame.shape[:2]
            # A whole factor: OpenCV's area resize has a fast path for those.
            factor = -(-w // self.work_width)
            self._work_shape = (max(1, h // factor), w // factor)
        elif shape != self.frame_shape:
            raise ValueError(
                f"frame {frame_index}: resolution changed from {self.frame_shape} to {shape}"
            )
        if self.plate is not None and self.plate.shape[:2] != shape:
            raise ValueError(f"background plate is {self.plate.shape}, frames are {shape}")
        work = self._shrink(frame)
        if self.plate is not None and self._work_plate is None:
            self._work_plate = self._shrink(self.plate)
        self._frames_seen += 1
        work = self._relit(work)
        if self._work_plate is None:
            rate = LEARNING_RATE_WITH_PRODUCT if self._previous else -1  # -1: MOG2's own
            fg = self._subtractor.apply(work, learningRate=rate)
        else:
            diff = cv2.absdiff(work, self._work_plate).max(axis=2)
            fg = (diff > self.plate_threshold).astype(np.uint8) * 255
        if self.matter is not None and (
            self.plate is not None or self._frames_seen > WARMUP_FRAMES
        ):
            fg = (self.matter.alpha(work, self._background()) > 0.5).astype(np.uint8) * 255
        fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, self._open)
        fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, self._close)
        self._belt = cv2.dilate(fg, self._close) == 0
        blobs = self._blobs(fg)
        trigger = None
        centre = fg.shape[1] / 2.0
        max_jump = fg.shape[1] / 3.0
        for blob in blobs:
            prev = self._nearest(blob, max_jump)
            before_now = prev.history if prev else ()
            blob.history = (*before_now, (blob.centroid, blob.mask))[-self.composite_frames :]
            if prev is None:
                continue
            before = (prev.centroid[0] - centre) * self.direction
            after = (blob.centroid[0] - centre) * self.direction
            if before < 0 <= after and trigger is None:
                trigger = Trigger(
                    frame_index, self.products, self._to_frame(blob.bbox), self._composite(blob)
                )
                self.products += 1
        self._previous = blobs
        return trigger

    def mask_for(self, bbox: tuple[int, int, int, int], margin: float = 0.15) -> np.ndarray:
        """The composite mask (frame pixels) of the last frame's blob that overlaps ``bbox`` (a
        product's box in frame pixels, found by a detector) most, kept to the box grown by
        ``margin`` per side: where products touch, their blob holds both, and the mask then
        names the one in the box. The box itself where no blob overlaps it."""
        h, w = self.frame_shape
        x, y, bw, bh = bbox
        dx, dy = int(round(margin * bw)), int(round(margin * bh))
        box = np.zeros((h, w), np.uint8)
        box[max(0, y - dy) : y + bh + dy, max(0, x - dx) : x + bw + dx] = 255
        best, best_overlap = None, 0
        for blob in self._previous:
            bx, by, bw_, bh_ = self._to_frame(blob.bbox)
            overlap = max(0, min(x + bw, bx + bw_) - max(x, bx)) * max(
                0, min(y + bh, by + bh_) - max(y, by)
            )
            if overlap > best_overlap:
                best, best_overlap = blob, overlap
        if best is None:
            box[:] = 0
            box[y : y + bh, x : x + bw] = 255
            return box
        return cv2.bitwise_and(self._composite(best), box)

    def _relit(self, work: np.ndarray) -> np.ndarray:
        """The frame brought to the belt model's brightness. Light that drifts or flickers
        changes the whole frame at once: while a product is in view the model all but stops
        learning, so without this the whole belt turned foreground and products merged or went
        uncounted. The gain is the median ratio over pixels that were belt in the frame before
        (a product that has moved onto some of them since is outvoted)."""
        if self._belt is None:
            return work
        belt = self._belt[::2, ::2]
        now = work[::2, ::2].sum(axis=2, dtype=np.float32)[belt]
        then = self._background()[::2, ::2].sum(axis=2, dtype=np.float32)[belt]
        if now.size < belt.size // 5:
            return work
        gain = float(np.median(then / np.maximum(now, 1.0)))
        if abs(gain - 1) < 0.005:
            return work
        return cv2.convertScaleAbs(work, alpha=gain)

    def _shrink(self, image: np.ndarray) -> np.ndarray:
        h, w = self._work_shape
        if image.shape[:2] == (h, w):
            return image
        return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)

    def _blobs(self, fg: np.ndarray) -> list[_Blob]:
        # A product that resembles the belt in places falls apart into pieces: group pieces that
        # lie close together (a generous dilation) into one object, but keep the undilated mask.
        side = max(3, int(0.06 * min(fg.shape)) | 1)
        grouped = cv2.dilate(fg, cv2.getStructuringElement(cv2.MORPH_RECT, (side, side)))
        n, labels = cv2.connectedComponents((grouped > 0).astype(np.uint8))
        min_area = self.min_area_fraction * fg.size
        out = []
        for i in range(1, n):
            mask = (labels == i) & (fg > 0)
            area = int(mask.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(mask)
            x0, y0 = int(xs.min()), int(ys.min())
            bbox = (x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1)
            out.append(_Blob((float(xs.mean()), float(ys.mean())), bbox, mask))
        return out

    def _nearest(self, blob: _Blob, max_jump: float) -> _Blob | None:
        best, best_d = None, max_jump
        for prev in self._previous:
            d = float(
                np.hypot(blob.centroid[0] - prev.centroid[0], blob.centroid[1] - prev.centroid[1])
            )
            if d < best_d:
                best, best_d = prev, d
        return best

    def _composite(self, current: _Blob) -> np.ndarray:
        union = np.zeros(current.mask.shape, dtype=bool)
        cx, cy = current.centroid
        for (x, y), mask in current.history:
            shift = np.float32([[1, 0, cx - x], [0, 1, cy - y]])
            moved = cv2.warpAffine(
                mask.astype(np.uint8), shift, current.mask.shape[::-1], flags=cv2.INTER_NEAREST
            )
            union |= moved > 0
        # Only where the current blob's box is: older masks of a partly visible product would
        # otherwise reach past the frame edge it is leaving.
        x, y, w, h = current.bbox
        box = np.zeros_like(union)
        box[y : y + h, x : x + w] = True
        mask = ((union & box) | current.mask).astype(np.uint8) * 255
        if mask.shape == self.frame_shape:
            return mask
        # Linear, then cut at half: smooth edges rather than the working size's staircase.
        frame_size = self.frame_shape[::-1]
        return (cv2.resize(mask, frame_size, interpolation=cv2.INTER_LINEAR) > 127).astype(
            np.uint8
        ) * 255
