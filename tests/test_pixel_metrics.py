import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from workers.differnet.reports import pixel_metrics
from workers.images import encode_png


def _mask(path, truth: np.ndarray):
    path.write_bytes(encode_png(np.repeat(truth[:, :, None] * 255, 3, axis=2).astype(np.uint8)))
    return path


def test_pixel_auroc_weighs_every_pixel_the_same_whatever_the_images_size(tmp_path):
    rng = np.random.default_rng(0)
    small, large = np.zeros((20, 20), bool), np.zeros((120, 200), bool)
    small[5:10, 5:10], large[40:80, 50:120] = True, True
    maps = [rng.normal(t * 1.0, 1.0) for t in (small, large)]
    paths = [_mask(tmp_path / "small.png", small), _mask(tmp_path / "large.png", large)]
    every_pixel = roc_auc_score(
        np.concatenate([small.ravel(), large.ravel()]),
        np.concatenate([m.ravel() for m in maps]),
    )
    assert pixel_metrics(maps, paths)["auroc"] == pytest.approx(every_pixel)


def test_aupro_averages_the_overlap_of_each_region_whatever_its_size(tmp_path):
    truth = np.zeros((100, 100), bool)
    truth[10:40, 10:40] = True  # a large region, found
    truth[70:73, 70:73] = True  # a small one, missed: below every normal pixel
    found = np.where(truth, 2.0, np.linspace(0, 1, 10_000).reshape(100, 100))
    found[70:73, 70:73] = -1.0
    paths = [_mask(tmp_path / "mask.png", truth), None]
    good = np.linspace(0, 1, 10_000).reshape(100, 100)
    report = pixel_metrics([found, good], paths)
    # The region mean is 0.5 at every FPR up to 0.3 though 99 % of defect pixels are found.
    assert report["aupro"] == pytest.approx(0.5, abs=0.01)
    assert report["auroc"] == pytest.approx(0.99, abs=0.01)
    assert pixel_metrics([np.where(truth, 2.0, 0.0), good], paths)["aupro"] == 1.0
    assert pixel_metrics([good], [None]) == {"auroc": None, "aupro": None}
