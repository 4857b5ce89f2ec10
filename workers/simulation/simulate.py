"""A multi-camera conveyor built from real product images (MVTec AD layout).

Each product has one view per camera; a defective product shows a defect image in one or two
views and good images elsewhere. Views are pasted at varying scale onto a textured conveyor that
moves with them, under per-camera lighting, noise, slight blur and position jitter. Products
enter on the left, cross the centre and leave on the right, one at a time, with empty belt
between them. The conveyor's texture runs along the direction of travel, so a moving belt looks
still to a background model, as a real belt does to a camera fixed above it.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from workers.datasets import Sample, list_test_samples, list_train_samples
from workers.images import load_image

# How a camera's recording is written: OpenCV backend, FourCC, file suffix, writer parameters.
# MPEG-4 Part 2 at OpenCV's default bitrate is small but smears fine texture (37 dB PSNR on a
# product, where MJPEG at quality 95 keeps 45.5 dB): an inspection camera is set to the latter.
VIDEO_CODECS = {
    "mp4v": (cv2.CAP_FFMPEG, "mp4v", ".mp4", []),
    "mjpeg": (cv2.CAP_OPENCV_MJPEG, "MJPG", ".avi", [cv2.VIDEOWRITER_PROP_QUALITY, 95]),
}


@dataclass(frozen=True)
class LineSpec:
    products: int
    cameras: int = 4
    defect_rate: float = 0.2
    fps: float = 15.0
    # A product is 120 to 160 px tall here. At 960 x 540 (240 to 320 px, as MTD photographed its
    # tiles) the line scored no better and decoding the larger frames cost it a quarter of its
    # throughput (bench.pipeline; docs/benchmarks.md).
    width: int = 480
    height: int = 270
    seed: int = 0
    crossing_frames: int = 20  # frames from entering to having left the view
    gap_frames: int = 6  # empty belt between two products
    lead_frames: int = 30  # empty belt before the first product: background models settle
    # Gain per colour channel (B, G, R) of the whole scene: new lamps, a warmer light, ...
    lighting: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # Each view's exposure varies by a gain in [1 - j, 1 + j] and an offset of up to 64 j grey
    # levels: auto-exposure and flicker. It blurs brightness defects ("uneven").
    exposure_jitter: float = 0.15
    # A product's height as a share of the frame's, drawn per view from this range.
    product_scale: tuple[float, float] = (0.45, 0.6)
    codec: str = "mjpeg"  # a key of VIDEO_CODECS

    def __post_init__(self):
        if self.products < 1 or self.cameras < 1:
            raise ValueError("products and cameras must be at least 1")
        if not 0 <= self.defect_rate <= 1:
            raise ValueError(f"defect_rate must be in [0, 1], got {self.defect_rate}")
        if any(not 0 < g <= 4 for g in self.lighting):
            raise ValueError(f"lighting gains must be in (0, 4], got {self.lighting}")
        if not 0 <= self.exposure_jitter < 1:
            raise ValueError(f"exposure_jitter must be in [0, 1), got {self.exposure_jitter}")
        low, high = self.product_scale
        if not 0.05 <= low <= high <= 0.9:
            raise ValueError(
                f"product_scale must be a range within [0.05, 0.9], got {self.product_scale}"
            )
        if self.codec not in VIDEO_CODECS:
            raise ValueError(f"codec must be one of {sorted(VIDEO_CODECS)}, got {self.codec!r}")
        if self.width < 64 or self.height < 64:
            raise ValueError(
                f"frame size must be at least 64 x 64, got {self.width} x {self.height}"
            )


@dataclass
class ViewPlan:
    camera: str
    source: str
    category: str
    scale: float  # product height / frame height
    dy: int  # vertical offset from the belt centre, pixels
    gain: float
    offset: float
    frames: tuple[int, int] = (0, 0)  # first and last frame in which the product is visible
    bboxes: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)


@dataclass
class ProductPlan:
    seq: int
    defective: bool
    start: int  # frame at which the product's leading edge enters
    views: list[ViewPlan]


def parse_frame_size(text: str) -> tuple[int, int]:
    """``"480x270"`` -> ``(480, 270)``: a frame size as the command line writes it."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a frame size looks like 480x270, got {text!r}") from None
    return width, height


def camera_names(n: int) -> list[str]:
    return [f"cam{i}" for i in range(n)]


def plan_line(good: list[Sample], defects: list[Sample], spec: LineSpec) -> list[ProductPlan]:
    if not good:
        raise ValueError("the simulator needs good images")
    if spec.defect_rate > 0 and not defects:
        raise ValueError("defect_rate > 0 needs defect images (DATA_DIR/test/<defect>/)")
    rng = random.Random(spec.seed)
    cams = camera_names(spec.cameras)
    next_good, next_defect = _shuffled_passes(good, rng), _shuffled_passes(defects, rng)
    plans = []
    for seq in range(spec.products):
        defective = rng.random() < spec.defect_rate
        bad_cams = (
            set(rng.sample(cams, min(len(cams), rng.choice([1, 1, 2])))) if defective else set()
        )
        views = []
        for cam in cams:
            sample = next(next_defect) if cam in bad_cams else next(next_good)
            views.append(
                ViewPlan(
                    camera=cam,
                    source=str(sample.path),
                    category=sample.category,
                    scale=rng.uniform(*spec.product_scale),
                    dy=rng.randint(-spec.height // 20, spec.height // 20),
                    gain=1 + spec.exposure_jitter * rng.uniform(-1, 1),
                    offset=64 * spec.exposure_jitter * rng.uniform(-1, 1),
                )
            )
        start = spec.lead_frames + seq * (spec.crossing_frames + spec.gap_frames)
        plans.append(ProductPlan(seq, defective, start, views))
    return plans


def _shuffled_passes(samples: list[Sample], rng: random.Random) -> Iterator[Sample]:
    """Every sample once, in random order, then again: a line shows each image before it shows
    one twice (random draws left a third of them out of a run of as many views as images)."""
    while samples:
        order = list(samples)
        rng.shuffle(order)
        yield from order


def total_frames(spec: LineSpec) -> int:
    return (
        spec.lead_frames
        + spec.products * (spec.crossing_frames + spec.gap_frames)
        + spec.gap_frames
    )


def belt_texture(spec: LineSpec, camera_index: int) -> np.ndarray:
    """Dark blue-grey belt with streaks along the direction of travel."""
    rng = np.random.default_rng(spec.seed * 100 + camera_index)
    rows = rng.normal(0, 6, spec.height).cumsum() * 0.15 + rng.normal(0, 4, spec.height)
    base = np.array([88.0, 52.0, 30.0])  # BGR: a dark blue belt, unlike the grey products
    belt = base[None, None, :] + rows[:, None, None]
    return np.repeat(belt, spec.width, axis=1).clip(0, 255)


def render_camera(
    spec: LineSpec, plans: list[ProductPlan], camera_index: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Frames (BGR uint8) of one camera; fills each view's ``frames`` and ``bboxes``."""
    rng = np.random.default_rng(spec.seed * 1000 + camera_index)
    # OpenCV draws the sensor noise (four times faster than NumPy), from its own seeded state
    # (one per thread).
    cv2.setRNGSeed(spec.seed * 1000 + camera_index)
    noise = np.empty((spec.height, spec.width, 3), np.float32)
    # The scene's light falls on belt and products alike: folded into both once, not into every
    # frame (a quarter of the time a 960 x 540 frame took).
    lighting = np.asarray(spec.lighting, np.float32)
    belt = belt_texture(spec, camera_index) * rng.uniform(0.9, 1.1) * lighting
    lit_belt = belt.astype(np.float32)
    sprites: dict[int, np.ndarray] = {}
    for f in range(total_frames(spec)):
        frame = lit_belt.copy()
        for plan in plans:
            t = f - plan.start
            if not 0 <= t < spec.crossing_frames:
                continue
            view = plan.views[camera_index]
            sprite = sprites.get(plan.seq)
            if sprite is None:
                sprite = _sprite(view, spec) * lighting
                sprites[plan.seq] = sprite
            h, w = sprite.shape[:2]
            # The product's centre travels from fully left of the view to fully right of it.
            cx = -w / 2 + (spec.width + w) * (t + 0.5) / spec.crossing_frames
            x0 = int(round(cx - w / 2))
            y0 = (spec.height - h) // 2 + view.dy
            box = _paste(frame, sprite, x0, y0)
            if box is not None:
                view.bboxes[f] = box
            if t == spec.crossing_frames - 1:
                del sprites[plan.seq]  # the product has left: free its image
        frame += cv2.randn(noise, 0.0, 2.5)
        frame = cv2.GaussianBlur(frame.clip(0, 255).astype(np.uint8), (3, 3), 0.6)
        yield f, frame
    for plan in plans:
        view = plan.views[camera_index]
        view.frames = (min(view.bboxes), max(view.bboxes)) if view.bboxes else (0, -1)


def _sprite(view: ViewPlan, spec: LineSpec) -> np.ndarray:
    rgb = load_image(view.source)
    # Very wide tiles are shrunk to keep a crossing-sized footprint (never squashed: a squashed
    # texture is an anomaly of its own).
    factor = min(spec.height * view.scale / rgb.shape[0], spec.width * 0.6 / rgb.shape[1])
    h = max(8, int(rgb.shape[0] * factor))
    w = max(8, int(round(rgb.shape[1] * factor)))
    bgr = cv2.resize(rgb[:, :, ::-1], (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    return (bgr * view.gain + view.offset).clip(0, 255)


def _paste(frame: np.ndarray, sprite: np.ndarray, x0: int, y0: int):
    h, w = sprite.shape[:2]
    fx0, fy0 = max(0, x0), max(0, y0)
    fx1, fy1 = min(frame.shape[1], x0 + w), min(frame.shape[0], y0 + h)
    if fx1 <= fx0 or fy1 <= fy0:
        return None
    frame[fy0:fy1, fx0:fx1] = sprite[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
    return (fx0, fy0, fx1 - fx0, fy1 - fy0)


def simulate_line(data_dir: Path, out: Path, spec: LineSpec) -> dict:
    """A line from every image of ``data_dir`` (MVTec AD layout); see :func:`render_line`."""
    good = list_train_samples(data_dir) + [
        s for s in list_test_samples(data_dir) if not s.is_defect
    ]
    defects = [s for s in list_test_samples(data_dir) if s.is_defect]
    return render_line(good, defects, out, spec)


def render_line(good: list[Sample], defects: list[Sample], out: Path, spec: LineSpec) -> dict:
    """Write one video per camera and ``manifest.json`` under ``out``; return the manifest."""
    plans = plan_line(good, defects, spec)
    out.mkdir(parents=True, exist_ok=True)
    cams = camera_names(spec.cameras)
    backend, fourcc, suffix, params = VIDEO_CODECS[spec.codec]
    videos = {cam: f"{cam}{suffix}" for cam in cams}

    def record(index: int) -> None:
        path = out / videos[cams[index]]
        writer = cv2.VideoWriter(
            str(path),
            backend,
            cv2.VideoWriter_fourcc(*fourcc),
            spec.fps,
            (spec.width, spec.height),
            params,
        )
        if not writer.isOpened():
            raise RuntimeError(f"OpenCV cannot write {path} (no {fourcc} encoder?)")
        for _, frame in render_camera(spec, plans, index):
            writer.write(frame)
        writer.release()

    # Cameras render side by side: OpenCV and NumPy let go of the GIL for the heavy work, and
    # each camera fills only its own views' boxes and draws from its own seeded generators.
    with ThreadPoolExecutor(max_workers=min(len(cams), os.cpu_count() or 1)) as pool:
        list(pool.map(record, range(len(cams))))
    manifest = {
        "spec": asdict(spec),
        "cameras": cams,
        "videos": videos,
        "frames": total_frames(spec),
        "products": [
            {
                "seq": p.seq,
                "defective": p.defective,
                "views": {
                    v.camera: {
                        "source": v.source,
                        "category": v.category,
                        "frames": list(v.frames),
                        "bboxes": {str(k): list(b) for k, b in sorted(v.bboxes.items())},
                    }
                    for v in p.views
                },
            }
            for p in plans
        ],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def camera_videos(line_dir: Path) -> dict[str, Path]:
    """Each camera's video in a simulated line's folder, by camera name (from its manifest)."""
    manifest = json.loads((Path(line_dir) / "manifest.json").read_text())
    # Manifests written before the codec was a setting name no videos: those lines are MP4.
    names = manifest.get("videos") or {cam: f"{cam}.mp4" for cam in manifest["cameras"]}
    return {cam: Path(line_dir) / name for cam, name in names.items()}
