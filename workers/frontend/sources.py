"""Camera sources: video files, folders of frames, live network streams (RTSP, HTTP)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from workers.images import IMAGE_SUFFIXES, ImageError, decode_image


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

    def whole(self) -> np.ndarray:
        """The camera's frame (BGR) at its own size: ``image``, or ``jpeg`` decoded in full
        where ``image`` is a scaled-down decoding of it."""
        if self.jpeg is None or self.image is None or self.image.shape == self.shape:
            return self.image
        return cv2.imdecode(np.frombuffer(self.jpeg, np.uint8), cv2.IMREAD_COLOR)


# Waits before reopening a live stream that dropped, then the last one for as long as it is down.
RECONNECT_WAITS_S = (0.5, 1.0, 2.0, 5.0)


# A live stream that stalls without closing (a camera hung, a link half down) counts as dropped
# after this long: FFmpeg would otherwise wait on it for ever, and the camera with it.
LIVE_TIMEOUT_MS = 5000


def _open_capture(source: str) -> cv2.VideoCapture:
    if not is_live(source):
        return cv2.VideoCapture(source)
    timeouts = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, LIVE_TIMEOUT_MS]
    timeouts += [cv2.CAP_PROP_READ_TIMEOUT_MSEC, LIVE_TIMEOUT_MS]
    return cv2.VideoCapture(source, cv2.CAP_FFMPEG, timeouts)


def shown(source: str) -> str:
    """``source`` as logs and errors may show it: a URL's password replaced by ``***``
    (cameras take credentials in their RTSP URLs)."""
    return re.sub(r"(://[^/@:]*):[^/@]*@", r"\1:***@", source)


def is_live(source: str) -> bool:
    """A network stream (RTSP, HTTP, ...): it may drop and come back, where a recording ends."""
    return "://" in source and not source.lower().startswith("file:")


def open_source(
    source: str, stride: int = 1, max_width: int | None = None, first_index: int = 0
) -> Iterator[SourceFrame]:
    """Every ``stride``-th frame of a video file, an RTSP/HTTP URL or a folder of images (sorted
    by name). The frames in between are skipped undecoded where the source allows: image files,
    and MJPEG video. ``max_width``: MJPEG frames are decoded scaled down (by 2, 4 or 8, the
    smallest factor that brings them to at most this many pixels across), their JPEG kept.
    ``first_index``: the number of a reopened stream's first frame (numbers go on)."""
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
    capture = _open_capture(source)
    if not capture.isOpened():
        raise ValueError(f"{shown(source)}: OpenCV cannot open this source")
    return _capture_frames(capture, source, stride, max_width, first_index)


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
    capture: cv2.VideoCapture, source: str, stride: int, max_width: int | None, first_index: int
) -> Iterator[SourceFrame]:
    packets = _as_jpeg_packets(capture)
    decoder = _PacketDecoder(max_width)
    n = first_index
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
            if image is None and n == first_index:
                # Packets without their Huffman tables (AVI1 MJPEG) need FFmpeg's decoder.
                capture.release()
                capture = _open_capture(source)
                packets = False
                continue
            jpeg = frame.tobytes() if image is not None else None
            yield SourceFrame(n, image, jpeg, shape)
            n += 1
    finally:
        capture.release()
    if n == first_index:
        raise ValueError(f"{shown(source)}: no frames (empty or unreadable video)")


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
