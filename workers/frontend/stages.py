"""The front end's two stages as plain Python, messages in, messages out: camera ingest (source,
motion gate, one frame per product) and detect + matte (the product's crop, belt removed).

No Redis and no Ray here: ``cluster/`` moves the messages. Every class is testable with arrays.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from schemas import BBox, CameraFrame, ProductView, make_product_id
from workers.contract import CropSpec
from workers.frontend.detect import ContourDetector, Detector, triggering_product
from workers.frontend.matte import DeepMatter, matte
from workers.frontend.motion import MotionGate, Trigger
from workers.frontend.sources import RECONNECT_WAITS_S, SourceFrame, is_live, open_source
from workers.frontend.tracking import TrackingGate, gate_frame
from workers.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    decode_grey,
    decode_image,
    encode_png,
    load_image,
)

log = logging.getLogger(__name__)

# -- camera ingest ------------------------------------------------------------------------------


@dataclass
class IngestStats:
    frames: int = 0
    corrupt_frames: int = 0
    triggers: int = 0
    resolution_changes: int = 0
    reconnects: int = 0  # a live stream reopened after it dropped


class CameraIngest:
    """Reads one camera, gates on motion, and emits one frame message per product."""

    def __init__(
        self,
        line: str,
        camera: str,
        source: str,
        *,
        fps: float | None = None,
        jpeg_quality: int = 92,
        matter: DeepMatter | None = None,
        background: Path | None = None,
        first_product: int = 0,
        frame_stride: int = 1,
        tracker: Detector | None = None,
    ):
        """``matter``: a matting network that gives the gate its masks (default: the motion
        mask). ``background``: an image of the empty belt, used instead of a learned one.
        ``first_product``: the number of the first product seen (a restarted line goes on
        counting where it stopped). ``frame_stride``: the gate sees every n-th frame (a camera
        faster than the products need; each product must still cross the view in several).
        ``tracker``: a detector that boxes each product (YOLO) run on every frame with motion,
        products counted by tracking them (:class:`TrackingGate`: products that touch count
        apart); default: one product per foreground blob."""
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be at least 1, got {frame_stride}")
        self.line, self.camera, self.source = line, camera, source
        self.fps = fps
        self.frame_stride = frame_stride
        self.jpeg_quality = jpeg_quality
        self.matter = matter
        self.plate = None
        if background is not None:
            self.plate = np.ascontiguousarray(load_image(background)[:, :, ::-1])
        self.tracker = tracker
        self.gate = self._new_gate(first_product, self.plate)
        self.stats = IngestStats()

    def _new_gate(self, first_product: int, plate: np.ndarray | None) -> MotionGate | TrackingGate:
        gate = MotionGate(start_count=first_product, matter=self.matter, plate=plate)
        return gate if self.tracker is None else TrackingGate(self.tracker, gate)

    def _source_frames(self, should_stop: Callable[[], bool]) -> Iterator[SourceFrame]:
        # The gate works at a fraction of the frame: MJPEG frames are decoded at that size.
        width, next_index, failures = self.gate.work_width, 0, 0
        while True:
            try:
                for frame in open_source(self.source, self.frame_stride, width, next_index):
                    next_index, failures = frame.index + 1, 0
                    yield frame
                error = "the stream ended"
            except (OSError, ValueError) as e:
                if next_index == 0 or not is_live(self.source):
                    raise
                error = str(e)
            if not is_live(self.source) or should_stop():
                return
            wait = RECONNECT_WAITS_S[min(failures, len(RECONNECT_WAITS_S) - 1)]
            failures += 1
            self.stats.reconnects += 1
            log.warning(
                "%s: camera %s dropped (%s): reopening in %g s", self.line, self.camera, error, wait
            )
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if should_stop():
                    return
                time.sleep(0.05)

    def frames(
        self, should_stop: Callable[[], bool] = lambda: False, replay_epoch: float | None = None
    ) -> Iterator[CameraFrame]:
        """Frame messages, one per product; ends with the source or when ``should_stop()``.

        With ``fps``, the source is replayed at the camera's rate, frame ``i`` due at
        ``replay_epoch + i / fps`` (a ``time.time()``; default: now): cameras replayed from one
        epoch show each product together, as live cameras do. A reader behind schedule reads on
        without pausing until it is back on it.

        A frame's ``timestamp`` is when it was captured: a replayed frame's is when it was due,
        so a camera restarted mid-replay stamps its frames as before; otherwise the time it was
        read.

        A live stream (``is_live``) that drops is reopened, after 0.5, 1 and 2 s, then every 5 s
        until it is back or ``should_stop()``; its frames are numbered on. One that cannot be
        opened at all is an error, as a missing file is."""
        period = 1 / self.fps if self.fps else 0.0
        # Sleeps are timed by the monotonic clock; the epoch is wall-clock time, which the
        # line's cameras share whatever process or node reads them.
        epoch = replay_epoch if replay_epoch is not None else time.time()
        start = time.monotonic() + epoch - time.time()
        for source_frame in self._source_frames(should_stop):
            index, frame = source_frame.index, source_frame.image
            if should_stop():
                return
            if period:  # replay at the camera's rate: a live line does not run faster than it
                time.sleep(max(0.0, start + index * period - time.monotonic()))
            self.stats.frames += 1
            if frame is None or frame.ndim != 3:
                self.stats.corrupt_frames += 1
                continue
            shape = source_frame.shape
            if self.gate.frame_shape not in (None, shape[:2]):
                # The camera changed resolution: the background model no longer fits. Start a
                # new one, keeping the product count so that product numbers stay in step.
                self.stats.resolution_changes += 1
                # A given plate no longer fits either: the new model learns the belt instead.
                self.gate = self._new_gate(self.gate.products, None)
            for trigger in gate_frame(self.gate, source_frame):
                message = self._message(source_frame, trigger, epoch, period)
                if message is not None:
                    yield message

    def _message(
        self, source_frame: SourceFrame, trigger: Trigger, epoch: float, period: float
    ) -> CameraFrame | None:
        """The gated frame as a message (None where it does not encode: counted corrupt)."""
        index, frame = source_frame.index, source_frame.image
        self.stats.triggers += 1
        # A JPEG source's frame goes on as the camera encoded it: a second lossy encoding
        # smears the fine texture the scorer reads (docs/benchmarks.md, "Tried").
        ok, jpeg = True, source_frame.jpeg
        if jpeg is None:
            ok, encoded = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
            jpeg = encoded.tobytes()
        ok_mask, mask_png = cv2.imencode(".png", trigger.composite_mask)
        if not (ok and ok_mask):
            self.stats.corrupt_frames += 1
            return None
        return CameraFrame(
            line=self.line,
            camera=self.camera,
            sequence=index,
            product_seq=trigger.product_seq,
            timestamp=epoch + index * period if period else time.time(),
            codec="jpeg",
            shape=source_frame.shape,
            image=jpeg,
            mask=mask_png.tobytes(),
        )


# -- detect + matte ------------------------------------------------------------------------------


class NoProductFound(ValueError):
    """The detector found nothing in a gated frame."""


class DetectMatte:
    """Finds the product in a gated frame, crops it re-centred and takes the belt away, as
    ``crops`` says (a line's model states how its crops were cut: ``workers.contract``)."""

    def __init__(
        self,
        detector: Detector | None = None,
        crops: CropSpec = CropSpec(),
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.detector = detector or ContourDetector()
        self.crops = crops
        self.max_pixels = max_pixels

    def process(self, frame: CameraFrame) -> ProductView:
        """One frame's view; :class:`NoProductFound` when the gate fired on no product."""
        view = self.process_batch([frame])[0]
        if view is None:
            raise NoProductFound(
                f"no product in {frame.line}/{frame.camera} frame {frame.sequence}"
            )
        return view

    def process_batch(self, frames: list[CameraFrame]) -> list[ProductView | None]:
        """The frames' views, the detector run on all of them at once; None for a frame in
        which the gate fired on no product (a glove, a tool, a shadow). A frame that does not
        decode raises :class:`ImageError`."""
        t0 = time.perf_counter()
        decoded = [self._decode(f) for f in frames]
        t1 = time.perf_counter()
        found = self.detector.detect_batch([bgr for bgr, _ in decoded], [m for _, m in decoded])
        detect_ms = (time.perf_counter() - t1) * 1e3 / len(frames)
        decode_ms = (t1 - t0) * 1e3 / len(frames)
        views = []
        for frame, (bgr, mask), detections in zip(frames, decoded, found, strict=True):
            product = triggering_product(detections, mask)
            if product is None:
                views.append(None)
                continue
            views.append(self._view(frame, bgr, mask, product.bbox, decode_ms, detect_ms))
        return views

    def _decode(self, frame: CameraFrame) -> tuple[np.ndarray, np.ndarray | None]:
        source = f"{frame.line}/{frame.camera}#{frame.sequence}"
        rgb = decode_image(frame.image, source, self.max_pixels)
        if rgb.shape != tuple(frame.shape[:2]) + (3,):
            raise ImageError(f"frame decodes to {rgb.shape}, message says {frame.shape}")
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        mask = None
        if frame.mask:
            mask = decode_grey(frame.mask, f"{source} mask", self.max_pixels)
            if mask.shape != bgr.shape[:2]:
                raise ImageError("the frame's mask does not decode to the frame's size")
        return bgr, mask

    def _view(
        self,
        frame: CameraFrame,
        bgr: np.ndarray,
        mask: np.ndarray | None,
        bbox: tuple[int, int, int, int],
        decode_ms: float,
        detect_ms: float,
    ) -> ProductView:
        t2 = time.perf_counter()
        result = matte(
            bgr,
            bbox,
            mask,
            shrink=self.crops.mask_shrink,
            margin=self.crops.box_margin,
            max_side=self.crops.view_max_side,
            shape=self.crops.mask_shape,
        )
        png = encode_png(np.ascontiguousarray(result.crop[:, :, ::-1]), result.mask)
        t3 = time.perf_counter()
        x, y, w, h = result.box
        return ProductView(
            product_id=make_product_id(frame.line, frame.product_seq),
            line=frame.line,
            camera=frame.camera,
            product_seq=frame.product_seq,
            captured_at=frame.timestamp,
            codec="png",
            shape=(*result.mask.shape, 4),
            image=png,
            bbox=BBox(x=x, y=y, w=w, h=h),
            mask_coverage=min(1.0, result.coverage),
            mask_shrink=self.crops.mask_shrink,
            stage_ms={"decode": decode_ms, "detect": detect_ms, "matte": (t3 - t2) * 1e3},
        )
