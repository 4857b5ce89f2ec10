"""Large images scored as tiles at their own scale: where the tiles go, and what they find."""

import numpy as np
import pytest
import torch

from tests.synthetic import textured_tile
from workers.contract import InputContract
from workers.differnet.config import DifferNetConfig
from workers.differnet.model import DifferNet, PreparedImage, TiledImage, units
from workers.differnet.recipes import Loaded
from workers.differnet.training import (
    TrainingOptions,
    build_memory,
    embed_training_set,
    memory_pool,
)
from workers.differnet.views import tile_boxes, tile_cores

CONFIG = DifferNetConfig(image_size=64, train_transforms=2, tta=1, memory_size=100_000)


@pytest.mark.parametrize("shape", [(64, 500), (200, 130), (64, 129), (300, 300)])
def test_tiles_cover_the_image_from_border_to_border_inside_it(shape):
    boxes = tile_boxes(shape, 64, 0.25)
    covered = np.zeros(shape, bool)
    for top, left, h, w in boxes:
        assert top >= 0 and left >= 0 and top + h <= shape[0] and left + w <= shape[1]
        assert (h, w) == (min(64, shape[0]), min(64, shape[1]))
        covered[top : top + h, left : left + w] = True
    assert covered.all()
    lefts = sorted({left for _, left, _, _ in boxes})
    # Neighbours overlap by at least the asked share; no more tiles than that needs.
    assert all(0 < b - a <= 48 for a, b in zip(lefts, lefts[1:], strict=False))
    assert len(lefts) == (1 if shape[1] <= 64 else -(-(shape[1] - 64) // 48) + 1)


@pytest.mark.parametrize("shape", [(64, 500), (200, 130), (64, 129), (300, 300)])
def test_tile_cores_split_the_image_so_each_pixel_is_judged_once_away_from_cuts(shape):
    boxes = tile_boxes(shape, 64, 0.25)
    judged = np.zeros(shape, int)
    for (top, left, h, w), (ct, cl, ch, cw) in zip(boxes, tile_cores(shape, boxes), strict=True):
        judged[top + ct : top + ct + ch, left + cl : left + cl + cw] += 1
        # Where a tile was cut out of the image (not at the image's border), its core keeps
        # half the overlap (at least 16 px here) away from the cut.
        assert ct >= (8 if top > 0 else 0) and cl >= (8 if left > 0 else 0)
        assert h - ct - ch >= (8 if top + h < shape[0] else 0)
        assert w - cl - cw >= (8 if left + w < shape[1] else 0)
    assert (judged == 1).all()


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    net = DifferNet(CONFIG)
    goods = [net.prepare(textured_tile(rng, 64, 80)) for _ in range(8)]
    build_memory(net, goods, TrainingOptions(), lambda *a: None)
    # The flow is untrained here: only the memory's evidence counts.
    net.calibration.copy_(torch.tensor([0.0, 1e9, 0.0, 1.0]))
    return net


def long_part(seed: int, spot: tuple[int, int] | None = None) -> np.ndarray:
    rgb = textured_tile(np.random.default_rng(seed), 64, 480)
    if spot is not None:
        yy, xx = np.ogrid[:64, :480]
        rgb[(yy - spot[0]) ** 2 + (xx - spot[1]) ** 2 <= 49] = 240
    return rgb


def test_a_long_image_is_cut_into_tiles_and_its_map_peaks_on_a_small_defect(model):
    spotted = model.prepare(long_part(1, spot=(30, 333)))
    assert isinstance(spotted, TiledImage) and len(spotted.tiles) == 10
    assert all(t.image.box.source_shape == (64, 64) for t in spotted.tiles)
    [result] = model.defect_maps([spotted])
    assert result.defect_map.shape == (64, 480)
    y, x = np.unravel_index(np.argmax(result.defect_map), result.defect_map.shape)
    assert abs(y - 30) <= 6 and abs(x - 333) <= 6, (y, x)
    # The defect covers 0.5 % of the image: scored by its tiles it stands out; letterboxed
    # whole, the image is compared at a scale no good image had and the defect is lost.
    goods = [long_part(seed) for seed in (2, 3, 4)]
    tiled = [r.score for r in model.score_batch([model.prepare(g) for g in goods])]
    [tiled_spot] = [r.score for r in model.score_batch([spotted])]
    whole = model_copy(model, tile_above=None)
    assert isinstance(whole.prepare(goods[0]), PreparedImage)
    whole_goods = [r.score for r in whole.score_batch([whole.prepare(g) for g in goods])]
    [whole_spot] = [r.score for r in whole.score_batch([whole.prepare(long_part(1, (30, 333)))])]
    assert tiled_spot > 1.05 * max(tiled)
    assert tiled_spot / max(tiled) > whole_spot / max(whole_goods)


def model_copy(model: DifferNet, **changes) -> DifferNet:
    model.config = model.config.model_copy(update=changes)
    return model


def test_tiles_without_product_are_left_out_and_the_contract_records_the_rule(model):
    model_copy(model, tile_above=2.0)
    rgb = long_part(5)
    mask = np.zeros(rgb.shape[:2], np.uint8)
    mask[:, :150] = 255
    prepared = model.prepare(rgb, mask)
    assert isinstance(prepared, TiledImage)
    assert [t.left for t in prepared.tiles] == [0, 46, 92, 139]
    # A mask with no product at all: the image is judged whole, as a sliver would be.
    assert isinstance(model.prepare(rgb, np.zeros_like(mask)), PreparedImage)
    contract = InputContract(crops={}, image_size=64)
    assert (contract.tile_above, contract.tile_overlap) == (2.0, 0.25)


def test_training_learns_the_same_from_images_prepared_as_it_reads_them():
    """Training reads its images prepared on use, one at a time (thousands of prepared views
    would not fit in memory), and learns exactly what it learns from them prepared at once."""
    torch.manual_seed(0)
    net = DifferNet(CONFIG)
    rgb = [long_part(6), textured_tile(np.random.default_rng(7), 64, 80), long_part(8)]
    masks = [None, None, np.pad(np.full((64, 200), 255, np.uint8), ((0, 0), (0, 280)))]
    loaded = Loaded([], rgb, masks)
    at_once, on_use = loaded.prepared(net), loaded.prepared_on_use(net)
    assert len(on_use) == 3 and isinstance(on_use[0], TiledImage)
    assert [type(im) for im in on_use[1:]] == [type(im) for im in at_once[1:]]
    options, quiet = TrainingOptions(), lambda *a: None
    assert torch.equal(
        embed_training_set(net, at_once, options, quiet),
        embed_training_set(net, on_use, options, quiet),
    )
    # The memory's draw counts the views of a set prepared on use from the images' sizes, as
    # preparing them would; so too for a long part without product, judged whole.
    assert on_use.unit_count() == len(units(at_once)) == sum(len(units([im])) for im in on_use)
    empty = np.zeros(rgb[0].shape[:2], np.uint8)
    assert net.unit_count(empty.shape, empty) == len(units([net.prepare(rgb[0], empty)])) == 1
    pools = [memory_pool(net, images, options, quiet) for images in (at_once, on_use)]
    assert torch.equal(pools[0][0], pools[1][0]) and torch.equal(pools[0][1], pools[1][1])
    # Each tile is its own owner, and tiles without product are left out.
    assert int(pools[1][1].max()) + 1 == len(units(at_once)) < 10 + 1 + 10
