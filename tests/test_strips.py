"""bench.strips: long images built from tiles, their masks where the defective tile went."""

import numpy as np
from PIL import Image

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


def test_matched_light_leaves_no_step_of_light_at_a_seam(tmp_path):
    data = make_dataset(tmp_path / "tiles", n_train=2, n_good=6, n_defect=1)
    goods = sorted((data / "test" / "good").glob("*.png"))
    for i, path in enumerate(goods):  # tiles of one group in different light, as MTD's are
        image = load_image(path).astype(np.float32) * (0.5 + 0.2 * i)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
        path.rename(path.with_name(f"exp1_{path.name}"))
    tiles = list_test_samples(data)
    width = load_image(tiles[0].path).shape[1]

    def spread(light: str) -> float:
        """The largest difference of median luminance between the tiles of a good strip."""
        strips = build_strips(tiles, tmp_path / light, seed=0, light=light)
        worst = 0.0
        for strip in (s for s in strips if not s.is_defect):
            luminance = load_image(strip.path).mean(axis=2)
            spans = [luminance[:, i : i + width] for i in range(0, luminance.shape[1], width)]
            medians = [float(np.median(span)) for span in spans]
            worst = max(worst, max(medians) - min(medians))
        return worst

    assert spread("captured") > 30
    assert spread("matched") < 3
