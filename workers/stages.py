"""Each stage of the inspection line as plain Python: messages in, messages out.

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

from schemas import BBox, CameraFrame, ProductView, ViewScore, make_product_id

from .detect import ContourDetector, Detector
from .differnet.store import ModelBundle
from .images import (
    IMAGE_SUFFIXES,
    ImageError,
    decode_image,
    decode_with_alpha,
    encode_png,
    load_image,
)
from .matte import VIEW_MAX_SIDE, DeepMatter, MaskShape, matte
from .motion import MotionGate

log = logging.getLogger(__name__)

# -- camera ingest ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFrame:
    index: int  # position in the source
    image: np.ndarray | None  # BGR; None where the frame does not decode
    jpeg: bytes | None = None  # the source's own JPEG (MJPEG video, .jpg files): sent on as is
    # The camera's frame (h, w, 3) where ``image`` is a scaled-down decoding of ``jpeg``.
    full_shape: tuple[int, int, int] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The camera's frame size, whatever size ``image`` was decoded at."""
        return self.full_shape or self.image.shape


def open_source(
    source: str, stride: int = 1, max_width: int | None = None
) -> Iterator[SourceFrame]:
    """Every ``stride``-th frame of a video file, an RTSP/HTTP URL or a folder of images (sorted
    by name). The frames in between are skipped undecoded where the source allows: image files,
    and MJPEG video. ``max_width``: MJPEG frames are decoded scaled down (by 2, 4 or 8, the
    smallest factor that brings them to at most this many pixels across), their JPEG kept."""
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{source}: folder holds no images")
        return _folder_frames(files, stride)
    if "://" not in source and not path.exists():
        raise FileNotFoundError(f"{source}: no such video file or folder")
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise ValueError(f"{source}: OpenCV cannot open this source")
    return _capture_frames(capture, source, stride, max_width)


def _as_jpeg_packets(capture: cv2.VideoCapture) -> bool:
    """Switch an MJPEG capture to hand over each frame's JPEG undecoded (FFmpeg's raw mode).

    A skipped frame then costs nothing (FFmpeg decodes every frame it grabs, 0.3 ms at 480 x 270),
    OpenCV's JPEG decoder is as fast as FFmpeg's on the frames that are read, and a gated frame
    travels in the camera's own encoding, without a second lossy one."""
    fourcc = (int(capture.get(cv2.CAP_PROP_FOURCC)) & 0xFFFFFFFF).to_bytes(4, "little")
    return fourcc == b"MJPG" and capture.set(cv2.CAP_PROP_FORMAT, -1)


_REDUCED = {
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


class _PacketDecoder:
    """Decodes a camera's JPEG packets for the gate, scaled down inside libjpeg (its DCT keeps
    only the low frequencies: an area average for free). At 480 x 270 a quarter-size decode takes
    0.20 ms, where a full one took 0.37 ms and shrinking it for the gate 0.2 ms more."""

    def __init__(self, max_width: int | None):
        self.max_width = max_width
        self.full_shape: tuple[int, int, int] | None = None
        self.flag = cv2.IMREAD_COLOR
        self.reduced_shape: tuple[int, int, int] | None = None

    def decode(self, packet: np.ndarray) -> tuple[np.ndarray | None, tuple[int, int, int] | None]:
        """The frame (scaled down where it can be) and the camera's full frame shape."""
        if self.flag != cv2.IMREAD_COLOR:
            image = cv2.imdecode(packet, self.flag)
            if image is None or image.shape == self.reduced_shape:
                return image, self.full_shape
        # The first frame, an unscaled camera, or one whose resolution changed.
        image = cv2.imdecode(packet, cv2.IMREAD_COLOR)
        if image is None:
            return None, None
        if image.shape != self.full_shape:
            self.full_shape = image.shape
            self.flag = self._flag_for(image.shape[1])
            if self.flag != cv2.IMREAD_COLOR:
                image = cv2.imdecode(packet, self.flag)
                self.reduced_shape = image.shape
        return image, self.full_shape

    def _flag_for(self, width: int) -> int:
        if self.max_width is None or width <= self.max_width:
            return cv2.IMREAD_COLOR
        factor = next((f for f in (2, 4) if -(-width // f) <= self.max_width), 8)
        return _REDUCED[factor]


def _capture_frames(
    capture: cv2.VideoCapture, source: str, stride: int, max_width: int | None
) -> Iterator[SourceFrame]:
    packets = _as_jpeg_packets(capture)
    decoder = _PacketDecoder(max_width)
    n = 0
    try:
        while True:
            if n % stride:
                if not capture.grab():
                    break
                n += 1
                continue
            ok, frame = capture.read()
            if not ok:
                break
            if not packets:
                yield SourceFrame(n, frame)
                n += 1
                continue
            image, shape = decoder.decode(frame) if frame.size else (None, None)
            if image is None and n == 0:
                # Packets without their Huffman tables (AVI1 MJPEG) need FFmpeg's decoder.
                capture.release()
                capture = cv2.VideoCapture(source)
                packets = False
                continue
            jpeg = frame.tobytes() if image is not None else None
            yield SourceFrame(n, image, jpeg, shape)
            n += 1
    finally:
        capture.release()
    if n == 0:
        raise ValueError(f"{source}: no frames (empty or unreadable video)")


def _folder_frames(files: list[Path], stride: int) -> Iterator[SourceFrame]:
    for index in range(0, len(files), stride):
        data = files[index].read_bytes()
        try:
            rgb = decode_image(data, str(files[index]))
        except ImageError:
            yield SourceFrame(index, None)  # a corrupt frame: the ingest counts it and goes on
            continue
        is_jpeg = files[index].suffix.lower() in (".jpg", ".jpeg")
        yield SourceFrame(index, rgb[:, :, ::-1].copy(), data if is_jpeg else None)


@dataclass
class IngestStats:
    frames: int = 0
    corrupt_frames: int = 0
    triggers: int = 0
    resolution_changes: int = 0


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
        matting_model: Path | None = None,
        background: Path | None = None,
        first_product: int = 0,
        frame_stride: int = 1,
    ):
        """``background``: an image of the empty belt, used instead of a learned one.
        ``first_product``: the number of the first product seen (a restarted line goes on
        counting where it stopped). ``frame_stride``: the gate sees every n-th frame (a camera
        faster than the products need; each product must still cross the view in several)."""
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be at least 1, got {frame_stride}")
        self.line, self.camera, self.source = line, camera, source
        self.fps = fps
        self.frame_stride = frame_stride
        self.jpeg_quality = jpeg_quality
        self.matter = DeepMatter(matting_model) if matting_model else None
        self.plate = None
        if background is not None:
            self.plate = np.ascontiguousarray(load_image(background)[:, :, ::-1])
        self.gate = MotionGate(start_count=first_product, matter=self.matter, plate=self.plate)
        self.stats = IngestStats()

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
        read."""
        period = 1 / self.fps if self.fps else 0.0
        # Sleeps are timed by the monotonic clock; the epoch is wall-clock time, which the
        # line's cameras share whatever process or node reads them.
        epoch = replay_epoch if replay_epoch is not None else time.time()
        start = time.monotonic() + epoch - time.time()
        # The gate works at a fraction of the frame: MJPEG frames are decoded at that size.
        frames = open_source(self.source, self.frame_stride, max_width=self.gate.work_width)
        for source_frame in frames:
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
                self.gate = MotionGate(start_count=self.gate.products, matter=self.matter)
            trigger = self.gate.update(index, frame, shape[:2])
            if trigger is None:
                continue
            self.stats.triggers += 1
            # A JPEG source's frame goes on as the camera encoded it: a second encoding at q92
            # cost the line's model 2 points of product AUROC (0.84 -> 0.82 on true-box crops).
            ok, jpeg = True, source_frame.jpeg
            if jpeg is None:
                ok, encoded = cv2.imencode(
                    ".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality]
                )
                jpeg = encoded.tobytes()
            ok_mask, mask_png = cv2.imencode(".png", trigger.composite_mask)
            if not (ok and ok_mask):
                self.stats.corrupt_frames += 1
                continue
            yield CameraFrame(
                line=self.line,
                camera=self.camera,
                sequence=index,
                product_seq=trigger.product_seq,
                timestamp=epoch + index * period if period else time.time(),
                codec="jpeg",
                shape=shape,
                image=jpeg,
                mask=mask_png.tobytes(),
            )


# -- detect + matte ------------------------------------------------------------------------------


class NoProductFound(ValueError):
    """The detector found nothing in a gated frame."""


class DetectMatte:
    """Finds the product in a gated frame, crops it re-centred and takes the belt away."""

    def __init__(
        self,
        detector: Detector | None = None,
        *,
        shrink: float = 0.1,
        margin: float = 0.05,
        max_side: int | None = VIEW_MAX_SIDE,
        mask_shape: MaskShape = "silhouette",
    ):
        self.detector = detector or ContourDetector()
        self.shrink = shrink
        self.margin = margin
        self.max_side = max_side
        self.mask_shape = mask_shape

    def process(self, frame: CameraFrame) -> ProductView:
        t0 = time.perf_counter()
        rgb = decode_image(frame.image, f"{frame.line}/{frame.camera}#{frame.sequence}")
        if rgb.shape != tuple(frame.shape[:2]) + (3,):
            raise ImageError(f"frame decodes to {rgb.shape}, message says {frame.shape}")
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        mask = None
        if frame.mask:
            mask = cv2.imdecode(np.frombuffer(frame.mask, np.uint8), cv2.IMREAD_GRAYSCALE)
            if mask is None or mask.shape != bgr.shape[:2]:
                raise ImageError("the frame's mask does not decode to the frame's size")
        t1 = time.perf_counter()
        found = self.detector.detect(bgr, mask)
        if not found:
            raise NoProductFound(
                f"no product in {frame.line}/{frame.camera} frame {frame.sequence}"
            )
        t2 = time.perf_counter()
        result = matte(
            bgr,
            found[0].bbox,
            mask,
            shrink=self.shrink,
            margin=self.margin,
            max_side=self.max_side,
            shape=self.mask_shape,
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
            mask_shrink=self.shrink,
            stage_ms={
                "decode": (t1 - t0) * 1e3,
                "detect": (t2 - t1) * 1e3,
                "matte": (t3 - t2) * 1e3,
            },
        )


# -- scoring ------------------------------------------------------------------------------------


def shed_score(view: ProductView, version: str, threshold: float) -> ViewScore:
    """The record of a view not scored because the line was too far behind (backpressure)."""
    return ViewScore(
        product_id=view.product_id,
        line=view.line,
        camera=view.camera,
        product_seq=view.product_seq,
        captured_at=view.captured_at,
        score=0.0,
        threshold=threshold,
        is_defect=False,
        model_version=version,
        stage_ms=view.stage_ms,
        shed=True,
    )


class ViewScorer:
    """Scores batches of views with one model version; swapping versions happens between batches."""

    def __init__(self, bundle: ModelBundle, threshold: float | None = None):
        self.bundle = bundle
        self.threshold = bundle.threshold if threshold is None else threshold

    @property
    def version(self) -> str:
        return self.bundle.version

    def score(self, views: list[ProductView]) -> list[ViewScore]:
        """Scores in the order of ``views``; an undecodable view raises (caller dead-letters)."""
        model = self.bundle.model
        prepared = []
        for v in views:
            rgb, alpha = decode_with_alpha(v.image, v.product_id)
            prepared.append(model.prepare(rgb, alpha))
        t0 = time.perf_counter()
        results = model.score_batch(prepared) if prepared else []
        ms = (time.perf_counter() - t0) * 1e3 / max(1, len(prepared))
        return [
            ViewScore(
                product_id=v.product_id,
                line=v.line,
                camera=v.camera,
                product_seq=v.product_seq,
                captured_at=v.captured_at,
                score=r.score,
                threshold=self.threshold,
                is_defect=r.score >= self.threshold,
                model_version=self.bundle.version,
                stage_ms=v.stage_ms | {"score": ms},
            )
            for v, r in zip(views, results, strict=True)
        ]
