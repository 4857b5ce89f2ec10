"""Data sets in the MVTec AD layout.

DATA_DIR/train/good/*                       defect-free training images
DATA_DIR/test/good/*, DATA_DIR/test/<kind>/* test images, by folder
DATA_DIR/ground_truth/<kind>/<stem>_mask.*   optional pixel masks of defects
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from workers.images import IMAGE_SUFFIXES


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
