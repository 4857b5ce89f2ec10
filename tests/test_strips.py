"""bench.strips: long images built from tiles, their masks where the defective tile went."""

import numpy as np

from bench.strips import build_strips
from tests.synthetic import make_dataset
from workers.datasets import list_test_samples
from workers.images import load_image


def test_strips_hold_one_defective_tile_with_its_mask_in_place(tmp_path):
    data = make_dataset(tmp_path / "tiles", n_train=2, n_good=6, n_defect=3)
    tiles = list_test_samples(data)
    strips = build_strips(tiles, tmp_path / "strips", seed=0)
    defective = [s for s in strips if s.is_defect]
    assert len(defective) == 6 and len(strips) == 12
    # Read back as any MVTec AD folder is, masks found.
    assert sorted(map(str, list_test_samples(tmp_path / "strips"))) == sorted(map(str, strips))
    tile_height, tile_width = load_image(tiles[0].path).shape[:2]
    for strip in strips:
        image = load_image(strip.path)
        assert image.shape[0] == tile_height and image.shape[1] >= 3 * tile_width
        if strip.is_defect:
            mask = load_image(strip.mask_path)[:, :, 0] > 127
            columns = np.flatnonzero(mask.any(0))
            assert mask.shape == image.shape[:2] and len(columns)
            assert columns.max() - columns.min() < tile_width  # within one tile
