"""The patch memory beside the flow: one size for all products, leave-one-out, calibration."""

import json

import numpy as np
import pytest
import torch

from tests.synthetic import add_defect, textured_tile
from workers.differnet.config import DifferNetConfig
from workers.differnet.model import DifferNet
from workers.differnet.neighbours import memory_image
from workers.differnet.training import TrainingOptions, build_memory, memory_pool

CONFIG = DifferNetConfig(image_size=64, train_transforms=2, tta=1, memory_size=100_000)


@pytest.fixture(scope="module")
def tiles():
    rng = np.random.default_rng(0)
    return [textured_tile(rng, 64, 80) for _ in range(8)], rng


@pytest.fixture(scope="module")
def model(tiles):
    torch.manual_seed(0)
    net = DifferNet(CONFIG)
    # A memory larger than the pool keeps every position of every view.
    build_memory(net, [net.prepare(t) for t in tiles[0]], TrainingOptions(), lambda *a: None)
    return net


def test_memory_images_of_any_size_share_one_area_and_keep_their_aspect():
    rgb = np.zeros((300, 900, 3), np.uint8)
    mask = np.zeros((300, 900), np.uint8)
    mask[:, :450] = 255
    small = memory_image(rgb[:100, :200], mask[:100, :200], side=300)
    assert small.pixels.shape == (3, 212, 424)
    large = memory_image(rgb, mask, side=300)
    assert large.pixels.shape == (3, 173, 520)
    assert large.mask[0, :, :259].min() == 1 and large.mask[0, :, 261:].max() == 0
    # A sliver keeps a few cells of stride 8 across.
    assert memory_image(rgb[:10, :900], None, side=60).pixels.shape[1] == 32


def test_each_training_image_is_found_in_memory_unless_its_own_positions_are_left_out(model, tiles):
    images = [model.prepare(t) for t in tiles[0]]
    pool, owner = memory_pool(model, images, TrainingOptions(), lambda *a: None)
    assert model.memory.size == len(pool) and set(owner.tolist()) == set(range(len(images)))
    for i, im in enumerate(images[:3]):
        # Found again up to the float16 the memory keeps positions in.
        assert model.memory.score(im.for_memory) < 0.02
        assert model.memory.score(im.for_memory, leave_out=i) > 0.2


def test_the_memory_takes_images_as_they_are_unless_one_view_is_too_few_positions(tiles):
    torch.manual_seed(0)
    net = DifferNet(CONFIG)
    images = [net.prepare(t) for t in tiles[0]]
    as_they_are = torch.cat([net.memory.positions(im.for_memory, 0) for im in images])
    turned = torch.cat([net.memory.positions(im.for_memory, 1) for im in images])

    def drawn_from(pool: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        exact = torch.cdist(pool, views, compute_mode="donot_use_mm_for_euclid_dist")
        return (exact.min(1).values < 1e-4).float().mean()

    # Three quarters of a view's positions per image: every one from the image as it is.
    size = net.memory.view_positions(CONFIG.memory_side) * len(images) * 3 // 4
    net.config = CONFIG.model_copy(update={"memory_size": size})
    pool, _ = memory_pool(net, images, TrainingOptions(), lambda *a: None)
    assert len(pool) == size and drawn_from(pool, as_they_are) == 1.0
    # More than a view holds (a few shots): the turned view too.
    net.config = CONFIG
    pool, _ = memory_pool(net, images, TrainingOptions(), lambda *a: None)
    assert len(pool) == len(as_they_are) + len(turned) and drawn_from(pool, turned) == 0.5


def test_a_defect_is_farther_from_good_positions_than_a_new_good_tile(model, tiles):
    rng = np.random.default_rng(7)
    good = model.memory.score(model.prepare(textured_tile(rng, 64, 80)).for_memory)
    spotted, _ = add_defect(rng, textured_tile(rng, 64, 80), "spot")
    assert model.memory.score(model.prepare(spotted).for_memory) > 1.2 * good


def test_a_small_defect_stands_out_among_new_good_tiles_by_the_memorys_peak(model, monkeypatch):
    """A spot on about 1 % of a tile barely moves the mean of its distances; half the score
    from the farthest positions sets it apart from new good tiles."""
    rng = np.random.default_rng(11)
    good = [textured_tile(rng, 64, 80) for _ in range(12)]
    spotted = textured_tile(rng, 64, 80)
    spotted[30:38, 40:48] = 240
    cells = [model.memory.distance_map(model.prepare(t).for_memory) for t in [*good, spotted]]

    def standing(share: float) -> float:
        monkeypatch.setattr(model.memory, "peak_share", share)
        *of_good, of_spotted = [model.memory.score_of_map(c) for c in cells]
        return (of_spotted - np.mean(of_good)) / np.std(of_good)

    assert standing(0.5) > 4 > 3 > standing(0.0)


def test_calibration_centres_the_fused_score_of_its_good_images(model):
    rng = np.random.default_rng(3)
    goods = [model.prepare(textured_tile(rng, 64, 80)) for _ in range(6)]
    values = model.calibrate(goods)
    assert values["flow_std"] > 0 and values["memory_std"] > 0
    fused = [r.score for r in model.score_batch(goods)]
    # Each part is standardised on these very images: their sum has mean 0.
    assert np.mean(fused) == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        model.calibrate(goods[:1])


def test_extending_gives_new_positions_their_share_and_keeps_the_subspace(tiles):
    torch.manual_seed(0)
    net = DifferNet(CONFIG.model_copy(update={"memory_size": 400}))
    images = [net.prepare(t) for t in tiles[0]]
    build_memory(net, images, TrainingOptions(), lambda *a: None)
    basis, before = net.memory.basis.clone(), net.memory.bank.clone()
    rng = np.random.default_rng(11)
    new = [net.prepare(textured_tile(rng, 64, 80)) for _ in range(2)]
    pool, _ = memory_pool(net, new, TrainingOptions(), lambda *a: None)
    net.memory.extend(pool, share=0.25, size=400, seed=0)
    assert net.memory.size == 400 and torch.equal(net.memory.basis, basis)
    kept = (net.memory.bank[:, None] == before[None]).all(-1).any(1)
    assert int(kept.sum()) == 300


def test_without_validation_data_calibration_leaves_each_training_image_out(tmp_path):
    import shutil

    from tests.synthetic import make_dataset
    from workers.differnet.recipes import train_from_folder

    data = make_dataset(tmp_path / "tiles", n_train=8)
    shutil.rmtree(data / "test")
    meta = train_from_folder(data, tmp_path / "model", CONFIG, TrainingOptions(epochs=2))
    calibration = meta["calibration"]
    assert calibration["source"] == "training goods" and calibration["n"] == 8
    # Compared with their own positions the training images would all sit at distance 0.
    assert calibration["memory_mean"] > 0.1 and calibration["memory_std"] > 0


def test_the_flow_can_learn_from_a_draw_of_the_images_and_the_memory_from_all(tmp_path):
    from tests.synthetic import make_dataset
    from workers.differnet.recipes import train_from_folder
    from workers.differnet.store import load_feature_cache, load_model

    data = make_dataset(tmp_path / "tiles", n_train=8, n_good=2, n_defect=2)
    options = TrainingOptions(epochs=2, flow_images=3)
    meta = train_from_folder(data, tmp_path / "model", CONFIG, options)
    assert meta["training"]["n_images"] == 8 and meta["training"]["flow_images"] == 3
    model = load_model(tmp_path / "model").model
    cache = load_feature_cache(tmp_path / "model", model.feature_mean.numel())
    assert len(cache) == 3 * CONFIG.train_transforms
    # The memory holds a view of each of the eight images (three, turned too, hold fewer).
    assert model.memory.size >= 8 * model.memory.view_positions(CONFIG.memory_side)
    with pytest.raises(ValueError, match="flow_images"):
        TrainingOptions(flow_images=0)


def test_validation_chooses_the_flow_share_that_ranks_its_images_best():
    from workers.differnet.recipes import best_flow_share

    rng = np.random.default_rng(5)
    labels = [0] * 12 + [1] * 12
    units = list(range(24))
    loud = rng.normal(scale=100, size=24)  # no evidence, and far larger than the evidence
    separates = np.array(labels) * 4.0 + rng.normal(scale=0.1, size=24)
    share, rule = best_flow_share(loud, separates, units, labels)
    assert share == 0.0 and rule.startswith("best validation image AUROC: 1.0000")
    assert best_flow_share(separates, loud, units, labels)[0] == 1.0
    # Both separate: every share ties, and equal shares stay.
    assert best_flow_share(separates, separates, units, labels)[0] == 0.5
    # An image scores its worst unit: a defect seen by the memory in one of its two tiles.
    tiled = [i // 2 for i in range(48)]
    memory = np.zeros(48)
    memory[[2 * i + 1 for i in range(12, 24)]] = 5.0
    assert best_flow_share(np.repeat(loud, 2), memory, tiled, labels)[0] == 0.0
    # Too few labelled images of a class: the choice would be noise.
    share, rule = best_flow_share(separates[:17], separates[:17], units[:17], labels[:17])
    assert share == 0.5 and rule.startswith("equal: 12 good and 5 defective")


def test_training_records_the_chosen_flow_share_and_old_models_keep_equal_shares_and_the_mean(
    tmp_path,
):
    from tests.synthetic import make_dataset
    from workers.differnet.recipes import FLOW_SHARES, train_from_folder
    from workers.differnet.store import METADATA_FILE, load_model

    data = make_dataset(tmp_path / "tiles", n_train=8, n_good=10, n_defect=5)
    meta = train_from_folder(data, tmp_path / "model", CONFIG, TrainingOptions(epochs=2))
    calibration = meta["calibration"]
    assert calibration["flow_share"] in FLOW_SHARES
    assert calibration["flow_share_rule"].startswith("best validation image AUROC")
    assert load_model(tmp_path / "model").model.memory.peak_share == CONFIG.memory_peak_share > 0
    # A model saved before the memory's peak existed scores by the mean of its distances.
    saved = json.loads((tmp_path / "model" / METADATA_FILE).read_text())
    del saved["config"]["memory_peak_share"]
    (tmp_path / "model" / METADATA_FILE).write_text(json.dumps(saved))
    model = load_model(tmp_path / "model").model
    assert model.memory.peak_share == 0
    assert float(model.flow_share) == pytest.approx(calibration["flow_share"])
    # The fused score weighs the standardised scores by the share.
    model.flow_share.fill_(0.0)
    flow_mean, flow_std, memory_mean, memory_std = model.calibration.tolist()
    assert model.fuse(flow_mean + 7 * flow_std, memory_mean + memory_std) == pytest.approx(2.0)
    # Weights saved before the share existed load with equal shares, and those saved before
    # the memory's spacing was measured with none: they score plain distances, as they did.
    image = model.prepare(textured_tile(np.random.default_rng(5), 64, 80)).for_memory
    plain = model.memory.nearest_good(model.memory.project(model.memory.positions(image)))[0]
    state = model.trainable_state()
    del state["flow_share"], state["memory.spacing"]
    model.load_trainable_state(state)
    assert float(model.flow_share) == 0.5
    assert model.memory.spacing.shape == (model.memory.size,) and model.memory.spacing.max() == 0
    assert model.memory.score(image) == pytest.approx(
        float(plain[model.memory._spread(len(plain))].mean()), rel=1e-5
    )


@pytest.mark.parametrize("draw", ["random", "coverage"])
def test_a_coverage_draw_keeps_more_of_a_rare_good_pattern_than_a_random_one(tiles, draw):
    """Two good images in eight carry stripes (a rare good pattern, as a long part's seams
    are): a random memory keeps their share of positions, one drawn for coverage more."""
    torch.manual_seed(0)
    net = DifferNet(CONFIG.model_copy(update={"memory_size": 600, "memory_draw": draw}))
    rare = [t.copy() for t in tiles[0][:2]]
    for image, x in zip(rare, (30, 50), strict=True):
        image[:, x : x + 3], image[:, x + 20 : x + 23] = 240, 20
    images = [net.prepare(t) for t in [*rare, *tiles[0][2:]]]
    build_memory(net, images, TrainingOptions(), lambda *a: None)
    # The draw's spacing is measured on what it kept, not on the random share it drew against.
    assert net.memory.size == len(net.memory.spacing) == 600 and net.memory.spacing.min() > 0
    rare_share = float((net.memory.owner < 2).float().mean())
    assert (rare_share < 0.27) if draw == "random" else (rare_share > 0.3), rare_share


def test_each_remembered_position_knows_its_distance_to_its_nearest_other_one(model):
    bank = model.memory.bank.float()
    assert len(model.memory.centroids) <= model.memory.probes  # every list searched: exact
    brute = torch.cdist(bank, bank).fill_diagonal_(float("inf")).min(1).values
    assert torch.allclose(model.memory.spacing.float(), brute, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("peak_share", [0.0, CONFIG.memory_peak_share])
def test_a_good_pattern_rare_among_good_images_counts_less_against_a_product(peak_share):
    """One good image in four carries stripes (as a long part's seams): a new good image with
    stripes elsewhere is scored nearer the plain good ones when the remembered stripes' sparse
    spacing is taken off, while defects stay as far above them; by the mean of the distances
    and with the memory's peak (where the stripes are the farthest positions either way)."""
    rng = np.random.default_rng(0)

    def striped(tile, x):
        tile = tile.copy()
        tile[:, x : x + 3], tile[:, x + 20 : x + 23] = 240, 20
        return tile

    train = [textured_tile(rng, 64, 80) for _ in range(8)]
    train = [striped(t, 30) if i < 2 else t for i, t in enumerate(train)]
    torch.manual_seed(0)
    net = DifferNet(
        CONFIG.model_copy(update={"memory_size": 1500, "memory_peak_share": peak_share})
    )
    build_memory(net, [net.prepare(t) for t in train], TrainingOptions(), lambda *a: None)
    goods = [textured_tile(rng, 64, 80) for _ in range(6)]
    rare = [striped(textured_tile(rng, 64, 80), 45) for _ in range(3)]
    defects = [add_defect(rng, textured_tile(rng, 64, 80), k)[0] for k in ("scratch", "spot")]

    def standardised(share):
        net.memory.spacing_share = share
        good, *others = (
            np.array([net.memory.score(net.prepare(t).for_memory) for t in group])
            for group in (goods, rare, defects)
        )
        return [(o - good.mean()) / good.std() for o in others]

    rare_plain, defect_plain = standardised(0.0)
    rare_spaced, defect_spaced = standardised(0.5)
    assert rare_spaced.mean() < rare_plain.mean() - 0.75, (rare_plain, rare_spaced)
    assert defect_spaced.min() > max(defect_plain.min() * 0.9, rare_spaced.max() + 5)


def test_averaged_over_the_image_the_edge_marks_a_defect_there_no_less_than_in_the_middle(tiles):
    """With the zero padding counted in, the edge's features shrink and its distances with them."""
    strength = {}
    for border in ("zeros", "valid"):
        torch.manual_seed(0)
        net = DifferNet(CONFIG.model_copy(update={"memory_border": border}))
        build_memory(net, [net.prepare(t) for t in tiles[0]], TrainingOptions(), lambda *a: None)
        rng = np.random.default_rng(7)
        for i in range(4):
            tile = textured_tile(rng, 64, 80)
            for where, rows in (("edge", slice(0, 5)), ("middle", slice(30, 35))):
                img, mask = tile.copy(), np.zeros(tile.shape[:2], bool)
                mask[rows, 25:55] = True
                img[mask] = 230
                [result] = net.defect_maps([net.prepare(img)], "memory")
                m = result.defect_map
                strength[border, where, i] = m[mask].mean() / np.median(m[~mask])
    for i in range(4):
        assert strength["valid", "edge", i] >= strength["valid", "middle", i]
        ratio = {b: strength[b, "edge", i] / strength[b, "middle", i] for b in ("zeros", "valid")}
        assert ratio["valid"] > ratio["zeros"]
