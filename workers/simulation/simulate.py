"""A multi-camera conveyor built from real product images (MVTec AD layout).

Each product has one view per camera; a defective product shows a defect image in one or two
views and good images elsewhere. Views are pasted at varying scale onto a textured conveyor that
moves with them, under per-camera lighting, noise, slight blur and position jitter. Products
enter on the left, cross the centre and leave on the right, one at a time, with empty belt
between them. The conveyor's texture runs along the direction of travel, so a moving belt looks
still to a background model, as a real belt does to a camera fixed above it.

That is an easy scene. The scene options of :class:`LineSpec` (``SCENES["hard"]`` combines
them) make it as hard as real lines are: products close together or touching, belt seams,
stains and glare, moving shadows, drifting and flickering light, things that are not products
crossing on the belt, mixed product sizes (``workers/simulation/scene.py``).
"""

from __future__ import annotations

import functools
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
from workers.simulation.scene import (
    DistractorPlan,
    SceneLight,
    belt_marks,
    distractor_sprite,
    glare,
    left_edge,
    plan_distractors,
    plan_shadows,
    roll,
    shadow_gain,
    sprite_size,
    start_after,
)

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
    # -- scene options (all off: an easy scene; SCENES["hard"] sets them) --
    # Share of products that follow the one before closely: a gap of 0 (touching) to a quarter
    # of a product's length in the camera where they come closest, two in view at once.
    close_products: float = 0.0
    belt_marks: bool = False  # seams and stains moving with the belt, glare from the lamps
    shadows: bool = False  # soft shadows sweeping across the view now and then
    lighting_drift: float = 0.0  # the scene's brightness drifts by a gain of 1 +- this
    flicker: float = 0.0  # and flickers frame to frame by a gain of 1 +- this
    # Share of the gaps between products in which a glove or a tool rides through on the belt.
    distractors: float = 0.0

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
        for name in ("close_products", "distractors"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("lighting_drift", "flicker"):
            if not 0 <= getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be in [0, 0.5), got {getattr(self, name)}")
        if self.width < 64 or self.height < 64:
            raise ValueError(
                f"frame size must be at least 64 x 64, got {self.width} x {self.height}"
            )


# Named scenes: LineSpec fields each sets. "hard" is what real lines show a detector.
SCENES: dict[str, dict] = {
    "easy": {},
    "hard": {
        "close_products": 0.35,
        "belt_marks": True,
        "shadows": True,
        "lighting_drift": 0.15,
        "flicker": 0.04,
        "distractors": 0.25,
        "product_scale": (0.3, 0.7),
    },
}


def scene_spec(scene: str, **fields) -> LineSpec:
    """A LineSpec of the named scene; ``fields`` set the rest (and may override the scene)."""
    if scene not in SCENES:
        raise ValueError(f"scene must be one of {sorted(SCENES)}, got {scene!r}")
    return LineSpec(**{**SCENES[scene], **fields})


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
    start: float  # frame at which the product's leading edge enters
    views: list[ViewPlan]


@dataclass
class Scene:
    """What a line's cameras show: its products, and what else rides through on the belt."""

    products: list[ProductPlan]
    distractors: list[DistractorPlan] = field(default_factory=list)


def parse_frame_size(text: str) -> tuple[int, int]:
    """``"480x270"`` -> ``(480, 270)``: a frame size as the command line writes it."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a frame size looks like 480x270, got {text!r}") from None
    return width, height


def camera_names(n: int) -> list[str]:
    return [f"cam{i}" for i in range(n)]


def plan_line(good: list[Sample], defects: list[Sample], spec: LineSpec) -> Scene:
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
    # The scene's options draw from their own generator: an easy scene plans as before them.
    scene_rng = random.Random(spec.seed + 7919)
    if not (spec.close_products > 0 or spec.distractors > 0):
        return Scene(plans)
    widths = [_widths(p, spec) for p in plans]
    if spec.close_products > 0:
        _bring_closer(plans, widths, spec, scene_rng)
    distractors = []
    if spec.distractors > 0:
        after = [(p.start, w) for p, w in zip(plans[1:], widths[1:], strict=True)]
        starts = [
            (p.start, w, *nxt)
            for p, w, nxt in zip(plans, widths, after + [(None, None)], strict=True)
        ]
        distractors = plan_distractors(
            starts, cams, spec.distractors, spec.width, spec.height, spec.crossing_frames, scene_rng
        )
    return Scene(plans, distractors)


def _widths(plan: ProductPlan, spec: LineSpec) -> list[int]:
    """The product's width in each camera's frames."""
    return [
        sprite_size(_image_shape(v.source), v.scale, spec.width, spec.height)[0] for v in plan.views
    ]


@functools.lru_cache(maxsize=4096)
def _image_shape(path: str) -> tuple[int, int]:
    return load_image(path).shape[:2]


def _bring_closer(
    plans: list[ProductPlan], widths: list[list[int]], spec: LineSpec, rng: random.Random
) -> None:
    """Move a ``close_products`` share of the products up behind the one before them: a gap of
    0 to a quarter of its length where they come closest; everything after moves up too.
    ``widths``: each product's width in each camera."""
    for i in range(1, len(plans)):
        usual = plans[i - 1].start + spec.crossing_frames + spec.gap_frames
        if rng.random() < spec.close_products:
            share = rng.choice([0.0, rng.uniform(0, 0.25)])  # touching half the time
            gaps = [share * max(widths[i])] * spec.cameras
            close = start_after(
                plans[i - 1].start, widths[i - 1], widths[i], gaps, spec.width, spec.crossing_frames
            )
            plans[i].start = min(usual, close)
        else:
            plans[i].start = usual


def _shuffled_passes(samples: list[Sample], rng: random.Random) -> Iterator[Sample]:
    """Every sample once, in random order, then again: a line shows each image before it shows
    one twice (random draws left a third of them out of a run of as many views as images)."""
    while samples:
        order = list(samples)
        rng.shuffle(order)
        yield from order


def total_frames(spec: LineSpec, scene: Scene) -> int:
    """Frames recorded: empty belt, the products, and a gap after the last."""
    last = max([p.start for p in scene.products] + [d.start for d in scene.distractors], default=0)
    return int(np.ceil(last)) + spec.crossing_frames + spec.gap_frames


def belt_texture(spec: LineSpec, camera_index: int) -> np.ndarray:
    """Dark blue-grey belt with streaks along the direction of travel."""
    rng = np.random.default_rng(spec.seed * 100 + camera_index)
    rows = rng.normal(0, 6, spec.height).cumsum() * 0.15 + rng.normal(0, 4, spec.height)
    base = np.array([88.0, 52.0, 30.0])  # BGR: a dark blue belt, unlike the grey products
    belt = base[None, None, :] + rows[:, None, None]
    return np.repeat(belt, spec.width, axis=1).clip(0, 255)


def render_camera(
    spec: LineSpec, scene: Scene, camera_index: int
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
    scene_rng = np.random.default_rng(spec.seed * 1000 + camera_index + 7919)
    marks = None
    if spec.belt_marks:
        belt = belt + glare(spec.width, spec.height, scene_rng)
        marks = belt_marks(spec.width, spec.height, scene_rng) * lighting
    lit_belt = belt.astype(np.float32)
    frames = total_frames(spec, scene)
    shadows = plan_shadows(frames, scene_rng) if spec.shadows else []
    light = SceneLight(
        spec.lighting_drift, spec.flicker, float(scene_rng.uniform(0, 2 * np.pi)), scene_rng
    )
    # The belt moves as fast as a product of 40 % of the frame's width.
    belt_speed = 1.4 * spec.width / spec.crossing_frames
    sprites: dict[int, np.ndarray] = {}
    things: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for f in range(frames):
        frame = lit_belt.copy()
        if marks is not None:
            frame += roll(marks, spec.width, belt_speed * f)
        for plan in scene.products:
            t = f - plan.start
            if not 0 <= t < spec.crossing_frames:
                continue
            view = plan.views[camera_index]
            sprite = sprites.get(plan.seq)
            if sprite is None:
                sprite = _sprite(view, spec) * lighting
                sprites[plan.seq] = sprite
            h, w = sprite.shape[:2]
            x0 = int(round(left_edge(plan.start, w, spec.width, spec.crossing_frames, f)))
            y0 = (spec.height - h) // 2 + view.dy
            box = _paste(frame, sprite, x0, y0)
            if box is not None:
                view.bboxes[f] = box
            if t + 1 >= spec.crossing_frames:
                del sprites[plan.seq]  # the product has left: free its image
        for thing in scene.distractors:
            t = f - thing.start
            if not 0 <= t < spec.crossing_frames:
                continue
            view = thing.views[camera_index]
            if thing.seq not in things:
                bgr, alpha = distractor_sprite(thing.kind, view.size, view.seed)
                things[thing.seq] = (bgr * lighting, alpha)
            bgr, alpha = things[thing.seq]
            h, w = bgr.shape[:2]
            x0 = int(round(left_edge(thing.start, w, spec.width, spec.crossing_frames, f)))
            box = _paste(frame, bgr, x0, (spec.height - h) // 2, alpha)
            if box is not None:
                view.bboxes[f] = box
            if t + 1 >= spec.crossing_frames:
                del things[thing.seq]
        if shadows and (dark := shadow_gain(shadows, f, spec.width, spec.height)) is not None:
            frame *= dark
        if spec.lighting_drift or spec.flicker:
            frame *= light.gain(f)
        frame += cv2.randn(noise, 0.0, 2.5)
        frame = cv2.GaussianBlur(frame.clip(0, 255).astype(np.uint8), (3, 3), 0.6)
        yield f, frame
    for view in [p.views[camera_index] for p in scene.products] + [
        d.views[camera_index] for d in scene.distractors
    ]:
        view.frames = (min(view.bboxes), max(view.bboxes)) if view.bboxes else (0, -1)


def _sprite(view: ViewPlan, spec: LineSpec) -> np.ndarray:
    rgb = load_image(view.source)
    w, h = sprite_size(rgb.shape[:2], view.scale, spec.width, spec.height)
    bgr = cv2.resize(rgb[:, :, ::-1], (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    return (bgr * view.gain + view.offset).clip(0, 255)


def _paste(frame: np.ndarray, sprite: np.ndarray, x0: int, y0: int, alpha=None):
    """Paste ``sprite`` (blended by ``alpha`` where given) with its corner at (x0, y0); return
    the box of it that is in view, or None."""
    h, w = sprite.shape[:2]
    fx0, fy0 = max(0, x0), max(0, y0)
    fx1, fy1 = min(frame.shape[1], x0 + w), min(frame.shape[0], y0 + h)
    if fx1 <= fx0 or fy1 <= fy0:
        return None
    part = sprite[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
    if alpha is None:
        frame[fy0:fy1, fx0:fx1] = part
    else:
        a = alpha[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0, None]
        frame[fy0:fy1, fx0:fx1] = a * part + (1 - a) * frame[fy0:fy1, fx0:fx1]
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
    scene = plan_line(good, defects, spec)
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
        for _, frame in render_camera(spec, scene, index):
            writer.write(frame)
        writer.release()

    # Cameras render side by side: OpenCV and NumPy let go of the GIL for the heavy work, and
    # each camera fills only its own views' boxes and draws from its own seeded generators.
    with ThreadPoolExecutor(max_workers=min(len(cams), os.cpu_count() or 1)) as pool:
        list(pool.map(record, range(len(cams))))

    def seen(view) -> dict:
        return {
            "frames": list(view.frames),
            "bboxes": {str(k): list(b) for k, b in sorted(view.bboxes.items())},
        }

    manifest = {
        "spec": asdict(spec),
        "cameras": cams,
        "videos": videos,
        "frames": total_frames(spec, scene),
        "products": [
            {
                "seq": p.seq,
                "defective": p.defective,
                "views": {
                    v.camera: {"source": v.source, "category": v.category, **seen(v)}
                    for v in p.views
                },
            }
            for p in scene.products
        ],
        # Things on the belt that are not products: the line must give them no verdict.
        "distractors": [
            {"seq": d.seq, "kind": d.kind, "views": {v.camera: seen(v) for v in d.views}}
            for d in scene.distractors
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
