"""workers.datasets.without_shots_of: a good test part's other shots leave training, nothing else."""

import numpy as np
from PIL import Image

from workers.datasets import Sample, without_shots_of


def _shot(folder, name: str, size: tuple[int, int], category: str = "good") -> Sample:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jpg"
    Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(path)
    return Sample(path, category)


def test_only_the_shots_of_a_good_test_tile_leave_training(tmp_path):
    train, test = tmp_path / "train", tmp_path / "test"
    same_tile = _shot(train, "exp2_num_11292", (478, 361))  # 16 frames on, 5 px wider
    later_tile = _shot(train, "exp1_num_11900", (473, 360))  # the next tile, the same size
    other_size = _shot(train, "exp3_num_11300", (260, 361))  # a narrower tile, frames apart
    under_defect = _shot(train, "exp1_num_20010", (300, 300))  # a defective tile's other shot
    not_mtd = _shot(train, "part_0001", (473, 360))
    tests = [
        _shot(test, "exp1_num_11276", (473, 360)),
        _shot(test, "exp2_num_20000", (300, 300), category="crack"),
    ]
    kept = without_shots_of([same_tile, later_tile, other_size, under_defect, not_mtd], tests)
    assert kept == [later_tile, other_size, under_defect, not_mtd]
