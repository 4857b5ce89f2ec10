"""What makes a simulated line hard for the front end: close products, a marked belt, shadows,
changing light and things on the belt that are not products.

Every function draws from the generator it is given, so a scene renders the same from its seed,
and a scene option that is off draws nothing (an easy scene renders as it did without them).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import cv2
import numpy as np

# Brightness of a belt mark against the belt (grey levels): seams are splices, stains are oil or
# dust. Enough for a background model to see them move; the belt's own texture is +-6.
SEAM_DEPTH, STAIN_DEPTH = 35.0, 30.0
GLARE_PEAK = 70.0  # a lamp's specular streak on a glossy belt
SHADOW_DEPTH = 0.4  # a passer-by's shadow takes up to this share of the light
DRIFT_PERIOD_FRAMES = 450  # the light's slow drift: a cycle every 30 s at 15 fps
DISTRACTOR_KINDS = ("glove", "tool")


def sprite_size(
    image_shape: tuple[int, int], scale: float, width: int, height: int
) -> tuple[int, int]:
    """(w, h) of a product image pasted at ``scale`` of a ``width`` x ``height`` frame. Very
    wide images are shrunk to keep a crossing-sized footprint (never squashed: a squashed
    texture is an anomaly of its own)."""
    factor = min(height * scale / image_shape[0], width * 0.6 / image_shape[1])
    return max(8, int(round(image_shape[1] * factor))), max(8, int(image_shape[0] * factor))


def left_edge(start: float, width: float, frame_width: int, crossing: int, f: float) -> float:
    """Where a thing's left edge is at frame ``f``: its centre travels from fully left of the
    view to fully right of it in ``crossing`` frames from ``start``."""
    return -width + (frame_width + width) * (f - start + 0.5) / crossing


def start_after(
    leader_start: float,
    leader_widths: list[int],
    follower_widths: list[int],
    gaps: list[float],
    frame_width: int,
    crossing: int,
) -> float:
    """The earliest start at which a follower stays ``gaps[c]`` pixels behind its leader in
    every camera ``c`` for as long as both are in view (a wider thing crosses faster, so the
    gap changes on the way)."""
    for delta in np.arange(0.0, 2.0 * crossing, 0.05):
        start = leader_start + float(delta)
        frames = np.arange(np.ceil(start), leader_start + crossing)
        if all(
            (
                left_edge(leader_start, wl, frame_width, crossing, frames)
                - left_edge(start, wf, frame_width, crossing, frames)
                - wf
                >= gap
            ).all()
            for wl, wf, gap in zip(leader_widths, follower_widths, gaps, strict=True)
        ):
            return start
    return leader_start + 2.0 * crossing


@dataclass
class DistractorView:
    camera: str
    size: tuple[int, int]  # w, h in pixels
    seed: int  # draws its shape
    frames: tuple[int, int] = (0, -1)
    bboxes: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)


@dataclass
class DistractorPlan:
    """A glove or a tool riding through on the belt between two products: not a product."""

    seq: int
    kind: str
    start: float
    views: list[DistractorView]


def plan_distractors(
    starts: list[tuple[float, list[int], float | None, list[int] | None]],
    cameras: list[str],
    share: float,
    frame_width: int,
    frame_height: int,
    crossing: int,
    rng: random.Random,
) -> list[DistractorPlan]:
    """Distractors in a ``share`` of the gaps. ``starts``: per product, its start and widths per
    camera, and the next product's (None after the last)."""
    plans: list[DistractorPlan] = []
    for start, widths, next_start, next_widths in starts:
        if rng.random() >= share:
            continue
        kind = rng.choice(DISTRACTOR_KINDS)
        height = rng.uniform(0.15, 0.3) * frame_height
        sizes = [(int(height * rng.uniform(1.2, 1.8)), int(height)) for _ in cameras]
        gaps = [0.1 * frame_width] * len(cameras)
        earliest = start_after(start, widths, [w for w, _ in sizes], gaps, frame_width, crossing)
        own = earliest + rng.uniform(0, 2)
        if next_start is not None and next_start < start_after(
            own, [w for w, _ in sizes], next_widths, gaps, frame_width, crossing
        ):
            continue  # no room before the next product
        views = [
            DistractorView(cam, size, rng.randrange(2**31))
            for cam, size in zip(cameras, sizes, strict=True)
        ]
        plans.append(DistractorPlan(len(plans), kind, own, views))
    return plans


def distractor_sprite(kind: str, size: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(BGR float32, alpha float32 in [0, 1]) of a glove or a tool lying on the belt."""
    w, h = size
    rng = np.random.default_rng(seed)
    alpha = np.zeros((h, w), np.float32)
    if kind == "glove":  # a blue nitrile glove: a palm and four fingers
        colour = np.array([200.0, 140.0, 60.0]) * rng.uniform(0.8, 1.1)
        cv2.ellipse(alpha, (int(w * 0.35), h // 2), (int(w * 0.3), int(h * 0.4)), 0, 0, 360, 1, -1)
        for i in range(4):
            y = int(h * (0.2 + 0.2 * i))
            finger = (int(w * 0.24), max(2, int(h * 0.07)))
            cv2.ellipse(alpha, (int(w * 0.72), y), finger, 0, 0, 360, 1, -1)
    else:  # a spanner: a metal bar with a dark grip
        colour = np.array([150.0, 150.0, 155.0]) * rng.uniform(0.8, 1.2)
        cv2.rectangle(alpha, (0, int(h * 0.35)), (w - 1, int(h * 0.65)), 1, -1)
        cv2.circle(alpha, (int(w * 0.9), h // 2), int(h * 0.45), 1, -1)
    bgr = np.empty((h, w, 3), np.float32)
    bgr[:] = colour
    if kind == "tool":
        bgr[:, : int(w * 0.45)] = (30.0, 30.0, 40.0)  # the grip
    bgr += rng.normal(0, 6, (h, w, 1)).astype(np.float32)
    return bgr.clip(0, 255), cv2.GaussianBlur(alpha, (3, 3), 0.8)


def belt_marks(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """An additive (height, 2 * width, 3) strip of seams and stains that rolls with the belt."""
    length = 2 * width
    strip = np.zeros((height, length), np.float32)
    for x in rng.choice(length, size=2, replace=False):  # splices across the belt
        strip[:, x : x + 3] -= SEAM_DEPTH
    for _ in range(6):
        centre = (int(rng.integers(length)), int(rng.integers(height)))
        axes = (int(rng.integers(4, 14)), int(rng.integers(3, 10)))
        sign = -1.0 if rng.random() < 0.7 else 1.0
        cv2.ellipse(strip, centre, axes, float(rng.uniform(0, 180)), 0, 360, sign * STAIN_DEPTH, -1)
    strip = cv2.GaussianBlur(strip, (5, 5), 1.2)
    return np.repeat(strip[:, :, None], 3, axis=2)


def roll(strip: np.ndarray, width: int, shift: float) -> np.ndarray:
    """The strip's window in view after the belt moved ``shift`` pixels to the right."""
    cols = (np.arange(width) - int(shift)) % strip.shape[1]
    return strip[:, cols]


def glare(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """An additive (height, width, 1) streak of the lamps' reflection, fixed in the view."""
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    row = rng.uniform(0.15, 0.85) * height + rng.uniform(-0.1, 0.1) * (x - width / 2)
    streak = GLARE_PEAK * np.exp(-(((y - row) / rng.uniform(3, 7)) ** 2))
    return streak[:, :, None].astype(np.float32)


@dataclass
class SceneLight:
    """A camera's light over the run: a slow drift and a frame-to-frame flicker."""

    drift: float
    flicker: float
    phase: float
    rng: np.random.Generator

    def gain(self, f: int) -> float:
        slow = 1 + self.drift * np.sin(2 * np.pi * f / DRIFT_PERIOD_FRAMES + self.phase)
        return float(slow * (1 + self.flicker * self.rng.uniform(-1, 1)))


@dataclass
class Shadow:
    start: int
    frames: int
    depth: float
    x: tuple[float, float]  # centre from, to (share of the width)
    y: tuple[float, float]
    sigma: tuple[float, float]  # across and down, share of the height


def plan_shadows(total: int, rng: np.random.Generator) -> list[Shadow]:
    """A shadow every 60 to 150 frames, sweeping through in 20 to 40."""
    shadows, f = [], int(rng.integers(20, 80))
    while f < total:
        shadows.append(
            Shadow(
                start=f,
                frames=int(rng.integers(20, 40)),
                depth=SHADOW_DEPTH * rng.uniform(0.5, 1.0),
                x=(rng.uniform(-0.3, 1.3), rng.uniform(-0.3, 1.3)),
                y=(-0.4, 1.4) if rng.random() < 0.5 else (1.4, -0.4),
                sigma=(rng.uniform(0.2, 0.5), rng.uniform(0.2, 0.4)),
            )
        )
        f += int(rng.integers(60, 150))
    return shadows


def shadow_gain(shadows: list[Shadow], f: int, width: int, height: int) -> np.ndarray | None:
    """(height, width, 1) light left under the shadows at frame ``f``, or None if none falls."""
    gain = None
    for s in shadows:
        t = (f - s.start) / s.frames
        if not 0 <= t <= 1:
            continue
        cx = (s.x[0] + (s.x[1] - s.x[0]) * t) * width
        cy = (s.y[0] + (s.y[1] - s.y[0]) * t) * height
        gx = np.exp(-(((np.arange(width) - cx) / (s.sigma[0] * height)) ** 2))
        gy = np.exp(-(((np.arange(height) - cy) / (s.sigma[1] * height)) ** 2))
        dark = 1 - s.depth * np.outer(gy, gx).astype(np.float32)
        gain = dark if gain is None else gain * dark
    return None if gain is None else gain[:, :, None]
