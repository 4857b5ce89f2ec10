"""Long parts from MTD tiles: 3 to 5 tiles of one acquisition group side by side, at the tiles'
own scale (each brought to the shortest one's height, never enlarged). A defective strip holds
one defective tile among good ones, its ground-truth mask placed where that tile went; a good
strip holds good tiles only. Written in MVTec AD layout, so that the scorer's evaluation reads
them as it reads the tiles: how a defect of a few percent of a long image fares.

A strip's seams, where one tile meets the next, are part of a long part's good look here: a model
that never saw one takes every seam for a defect. So the model that scores strips learns from
good strips too (``training_set``), made from the training tiles only, as a plant's model learns
from its own long parts. Each seam pairs two tiles' textures and lights anew, so the memory
needs many of them: ``bench.accuracy`` builds one good strip per training tile by default.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from workers.datasets import Sample
from workers.images import load_image

TILES_PER_STRIP = (3, 4, 5)
# "matched": each tile scaled to the strip's median luminance first. MTD's tiles of one group
# differ in light by up to 1.5x, and a strip of them as captured has a step of light at every
# seam, which no long part off a line has.
Light = Literal["captured", "matched"]


def group_of(sample: Sample) -> str:
    """MTD's acquisition group (``exp3`` of ``exp3_num_1234.jpg``)."""
    return sample.path.stem.split("_")[0]


def build_strips(
    samples: list[Sample], out: Path, seed: int, light: Light = "captured"
) -> list[Sample]:
    """One defective strip per defective sample and as many good strips, from ``samples`` only;
    returns them as samples of ``out`` (MVTec AD layout)."""
    rng = random.Random(seed)
    goods = _by_group(samples)
    anywhere = [s for group in goods.values() for s in group]
    strips = []
    defects = [s for s in samples if s.is_defect]
    for i, defect in enumerate(defects):
        others = _goods(
            goods.get(group_of(defect)) or anywhere, rng.choice(TILES_PER_STRIP) - 1, rng
        )
        tiles = others[:]
        tiles.insert(rng.randrange(len(tiles) + 1), defect)
        name = f"strip{i:03d}"
        strips.append(_write(tiles, out / "test", defect.category, name, defect, out, light))
    return strips + _good_strips(goods, len(defects), out / "test", rng, light)


def training_set(
    train: list[Sample], out: Path, strips: int, seed: int, light: Light = "captured"
) -> Path:
    """A training folder (``out/train/good``) of the good ``train`` tiles (linked) and
    ``strips`` good strips made from them."""
    folder = out / "train" / "good"
    folder.mkdir(parents=True, exist_ok=True)
    for s in train:
        link = folder / s.path.name
        if not link.exists():
            link.symlink_to(s.path.resolve())
    _good_strips(_by_group(train), strips, out / "train", random.Random(seed), light)
    return out


def _by_group(samples: list[Sample]) -> dict[str, list[Sample]]:
    goods: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        if not s.is_defect:
            goods[group_of(s)].append(s)
    return goods


def _good_strips(
    goods: dict[str, list[Sample]], n: int, folder: Path, rng, light: Light
) -> list[Sample]:
    groups = sorted(g for g, members in goods.items() if members)
    strips = []
    for i in range(n):
        tiles = _goods(goods[rng.choice(groups)], rng.choice(TILES_PER_STRIP), rng)
        strips.append(_write(tiles, folder, "good", f"strip{i:03d}", None, folder.parent, light))
    return strips


def _goods(pool: list[Sample], n: int, rng: random.Random) -> list[Sample]:
    return rng.sample(pool, n) if len(pool) >= n else [rng.choice(pool) for _ in range(n)]


def _write(tiles: list[Sample], folder: Path, category: str, name: str, defect, out, light):
    """The strip in ``folder/category``; the defect's mask in ``out/ground_truth``."""
    images = [load_image(t.path) for t in tiles]
    height = min(im.shape[0] for im in images)
    resized = [_to_height(im, height) for im in images]
    if light == "matched":
        resized = _light_matched(resized)
    strip = np.concatenate(resized, axis=1)
    path = folder / category / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), strip[:, :, ::-1])
    if defect is None:
        return Sample(path, category)
    mask = np.zeros(strip.shape[:2], np.uint8)
    left = 0
    for tile, image in zip(tiles, resized, strict=True):
        if tile is defect and defect.mask_path is not None:
            truth = _to_height(load_image(defect.mask_path), height)[:, :, 0]
            mask[:, left : left + image.shape[1]] = np.where(truth > 127, 255, 0)
        left += image.shape[1]
    mask_path = out / "ground_truth" / category / f"{name}_mask.png"
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(mask_path), mask)
    return Sample(path, category, mask_path)


def _light_matched(images: list[np.ndarray]) -> list[np.ndarray]:
    """Each image scaled to the median of their median luminances."""
    medians = [float(np.median(im.mean(axis=2))) for im in images]
    reference = float(np.median(medians))
    return [
        np.clip(im.astype(np.float32) * reference / max(m, 1.0), 0, 255).round().astype(np.uint8)
        for im, m in zip(images, medians, strict=True)
    ]


def _to_height(image: np.ndarray, height: int) -> np.ndarray:
    if image.shape[0] == height:
        return image
    width = max(1, round(image.shape[1] * height / image.shape[0]))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
