"""Data sets in the MVTec AD layout.

DATA_DIR/train/good/*                       defect-free training images
DATA_DIR/test/good/*, DATA_DIR/test/<kind>/* test images, by folder
DATA_DIR/ground_truth/<kind>/<stem>_mask.*   optional pixel masks of defects

One part may be shot several times. MTD shoots each tile a few frames apart, each time at another
exposure (``exp1_num_11276.jpg`` and ``exp2_num_11292.jpg`` are one tile), and its split puts the
shots of one good tile on both sides: 92 of its 95 good test tiles have another shot in
``train/good``, its defective tiles none. A model that holds the very part finds it good more
easily than a new one, which is all a line ever shows it: :func:`without_shots_of` keeps a test
part's other shots out of training.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from workers.images import IMAGE_SUFFIXES

# Shots of one MTD tile lie 10 to 50 frames apart (a few up to 100), their crops within about
# 20 px of each other; the next tile's shots are hundreds of frames on.
SHOT_FRAME_GAP = 100
SHOT_SIZE_GAP = 25
_MTD_SHOT = re.compile(r"exp\d+_num_(\d+)$")


class DatasetError(ValueError):
    """The data folder is not laid out as expected."""


@dataclass(frozen=True)
class Sample:
    path: Path
    category: str  # "good" or the defect folder name
    mask_path: Path | None = None

    @property
    def is_defect(self) -> bool:
        return self.category != "good"


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def list_train_samples(data_dir: Path, shots: int | None = None, seed: int = 0) -> list[Sample]:
    folder = Path(data_dir) / "train" / "good"
    if not folder.is_dir():
        raise DatasetError(f"{data_dir}: no train/good folder (expected the MVTec AD layout)")
    paths = _images(folder)
    if not paths:
        raise DatasetError(f"{folder}: no images")
    if shots is not None:
        if shots < 1:
            raise DatasetError(f"--shots must be at least 1, got {shots}")
        paths = sorted(random.Random(seed).sample(paths, min(shots, len(paths))))
    return [Sample(p, "good") for p in paths]


def list_test_samples(data_dir: Path) -> list[Sample]:
    """Every image under DATA_DIR/test, with its ground-truth mask when there is one."""
    root = Path(data_dir) / "test"
    if not root.is_dir():
        return []
    samples = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in _images(folder):
            mask = None
            if folder.name != "good":
                found = sorted(
                    (Path(data_dir) / "ground_truth" / folder.name).glob(f"{path.stem}_mask.*")
                )
                mask = found[0] if found else None
            samples.append(Sample(path, folder.name, mask))
    return samples


def split_stratified(
    samples: list[Sample], fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Split each category in two: about ``fraction`` of it in the first part."""
    by_category: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_category[s.category].append(s)
    rng = random.Random(seed)
    first, second = [], []
    for category in sorted(by_category):
        group = list(by_category[category])
        rng.shuffle(group)
        cut = round(len(group) * fraction)
        first += group[:cut]
        second += group[cut:]
    return first, second


def fingerprint(samples: list[Sample]) -> str:
    """A hash of the names and sizes of the files: which data trained a model."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: str(s.path)):
        h.update(f"{s.category}/{s.path.name}:{s.path.stat().st_size}\n".encode())
    return h.hexdigest()


def without_shots_of(train: list[Sample], test: list[Sample]) -> list[Sample]:
    """``train`` less every other shot of a good part of ``test``. Shots are known by MTD's
    names (frame number) and sizes; images named otherwise are kept."""
    goods = [shot for s in test if not s.is_defect and (shot := _shot(s))]
    return [s for s in train if not _shot_of_any(_shot(s), goods)]


_Shot = tuple[int, int, int]  # frame number, width, height


def _shot(sample: Sample) -> _Shot | None:
    found = _MTD_SHOT.search(sample.path.stem)
    if found is None:
        return None
    with Image.open(sample.path) as image:  # reads the header only
        return (int(found.group(1)), *image.size)


def _shot_of_any(shot: _Shot | None, parts: list[_Shot]) -> bool:
    """Whether ``shot`` (read once) is another shot of one of ``parts``."""
    return shot is not None and any(
        abs(shot[0] - part[0]) <= SHOT_FRAME_GAP
        and all(abs(x - y) <= SHOT_SIZE_GAP for x, y in zip(shot[1:], part[1:], strict=True))
        for part in parts
    )
