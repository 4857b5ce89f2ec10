"""Exposure normalisation: a model with an exposure target sees a product the same under any
light; one without sees it as captured."""

import numpy as np
from typer.testing import CliRunner

from cluster.apps.cli import app
from tests.synthetic import make_dataset, textured_tile
from workers.differnet.config import DifferNetConfig
from workers.differnet.model import DifferNet
from workers.differnet.views import MAX_EXPOSURE_GAIN, normalised_exposure

CONFIG = DifferNetConfig(image_size=64, train_transforms=2, tta=1, memory_size=0)


def _product_on_belt(gain: float) -> tuple[np.ndarray, np.ndarray]:
    """A textured product in the middle of a black belt, under a light of ``gain``."""
    rgb = np.zeros((60, 90, 3), np.uint8)
    rgb[10:50, 20:70] = textured_tile(np.random.default_rng(0), 40, 50)
    mask = np.zeros((60, 90), np.uint8)
    mask[10:50, 20:70] = 255
    return np.clip(rgb * gain, 0, 255).astype(np.uint8), mask


def test_the_products_median_luminance_is_brought_to_the_target_whatever_the_belt():
    rgb, mask = _product_on_belt(0.6)
    out = normalised_exposure(rgb, mask, 117.0)
    luma = out.astype(np.float32) @ np.float32([0.299, 0.587, 0.114])
    assert abs(np.median(luma[mask > 0]) - 117.0) <= 1.0
    assert (out[mask == 0] == 0).all()  # the belt counted for nothing and stays black
    # A lamp out is not the light drifting: a near-black product is brought only so far.
    dark = (rgb // 20).astype(np.uint8)
    assert normalised_exposure(dark, mask, 117.0).max() <= dark.max() * MAX_EXPOSURE_GAIN + 1


def test_a_model_with_an_exposure_target_sees_a_product_the_same_in_any_light():
    bright, mask = _product_on_belt(1.0)
    dim, _ = _product_on_belt(0.7)
    steady = DifferNet(CONFIG.model_copy(update={"exposure_target": 117.0}))
    captured = DifferNet(CONFIG)

    def seen(net: DifferNet, rgb: np.ndarray):
        return net.prepare(rgb, mask).pixels

    assert (seen(steady, bright) - seen(steady, dim)).abs().max() <= 3 / 255
    assert (seen(captured, bright) - seen(captured, dim)).abs().max() > 20 / 255


def test_train_takes_an_exposure_target_and_refuses_one_off_the_scale(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=4, n_good=1, n_defect=1)
    bad = ["train", str(data), "--out", str(tmp_path / "m"), "--exposure-target", "300"]
    result = CliRunner().invoke(app, bad)
    assert result.exit_code == 1 and "--exposure-target" in result.output
    assert "Traceback" not in result.output
