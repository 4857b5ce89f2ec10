"""The scorer on a GPU: it trains, scores, localises and retrains there as on the CPU.

Skipped where this process sees no CUDA device (CI has none). On a GPU machine:
``pytest tests/test_cuda.py`` (it needs neither Redis nor Ray).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.synthetic import add_defect, difference_matting_model, make_dataset, textured_tile
from workers.datasets import list_test_samples
from workers.differnet.config import DifferNetConfig
from workers.differnet.learning import LabelledProduct, retrain
from workers.differnet.recipes import load_samples, score_images, train_from_folder
from workers.differnet.store import FEATURE_CACHE, load_model
from workers.differnet.training import TrainingOptions
from workers.frontend.matte import DeepMatter
from workers.images import encode_png
from workers.threshold import auroc
from workers.weights import sha256_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

POOLED = DifferNetConfig(image_size=96, tta=2)
LOCAL = DifferNetConfig(image_size=96, tta=2, head="local", memory_size=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("tiles"))


def _scores(bundle, data: Path) -> tuple[np.ndarray, list[int]]:
    loaded = load_samples(list_test_samples(data))
    results = score_images(bundle.model, loaded.prepared(bundle.model))
    return np.array([r.score for r in results]), [int(s.is_defect) for s in loaded.samples]


@pytest.mark.parametrize("config", [POOLED, LOCAL], ids=["differnet", "local"])
def test_a_model_trained_on_the_gpu_scores_there_as_on_the_cpu(config, data, tmp_path):
    train_from_folder(data, tmp_path, config, TrainingOptions(epochs=12, device="cuda"))
    on_gpu, on_cpu = load_model(tmp_path), load_model(tmp_path, "cpu")
    assert on_gpu.model.device.type == "cuda" and on_cpu.model.device.type == "cpu"
    # The weights file holds CPU tensors: it loads anywhere, and its sha256 says what it holds.
    state = torch.load(tmp_path / on_gpu.metadata["weights_file"], weights_only=True)
    assert {t.device.type for t in state.values()} == {"cpu"}
    gpu, labels = _scores(on_gpu, data)
    cpu, _ = _scores(on_cpu, data)
    assert auroc(gpu, labels) == 1.0
    # cuDNN's convolutions round differently from the CPU's: close, not equal.
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=0.01 * np.ptp(cpu))


def test_gradient_defect_maps_on_the_gpu_match_the_cpu(data, tmp_path):
    train_from_folder(data, tmp_path, POOLED, TrainingOptions(epochs=4, device="cuda"))
    image = load_samples(list_test_samples(data)[-1:])
    maps = []
    for device in ("cuda", "cpu"):
        model = load_model(tmp_path, device).model
        maps.append(model.defect_maps(image.prepared(model))[0].defect_map)
    assert maps[0].shape == maps[1].shape == image.rgb[0].shape[:2]
    assert np.corrcoef(maps[0].ravel(), maps[1].ravel())[0, 1] > 0.99


def _tiles(folder: Path, n: int, seed: int, defect: bool = False) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        tile = (textured_tile(rng, 72, 96) * 1.4).clip(0, 255).astype(np.uint8)
        if defect:
            tile, _ = add_defect(rng, tile, "spot")
        paths.append(folder / f"{i:03d}.png")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        paths[-1].write_bytes(encode_png(tile))
    return paths


def test_a_cpu_trained_parent_is_retrained_on_the_gpu(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=8, n_good=3, n_defect=2)
    parent = tmp_path / "parent"
    train_from_folder(data, parent, POOLED, TrainingOptions(epochs=3, device="cpu"))
    validation = [
        LabelledProduct(f"l:{i}", (p,), 0) for i, p in enumerate(_tiles(tmp_path / "vg", 3, 8))
    ] + [
        LabelledProduct(f"l:{10 + i}", (p,), 1)
        for i, p in enumerate(_tiles(tmp_path / "vd", 3, 9, defect=True))
    ]
    new_good = _tiles(tmp_path / "new", 6, seed=7)
    result = retrain(
        parent,
        tmp_path / "cand",
        new_good,
        validation,
        options=TrainingOptions(epochs=2, device="cuda"),
    )
    cache = torch.load(tmp_path / "cand" / FEATURE_CACHE, weights_only=True)
    assert cache.shape[0] == (8 + 6) * POOLED.train_transforms
    candidate = load_model(tmp_path / "cand", "cpu")
    assert candidate.threshold == result.judgement.candidate["threshold"]
    assert result.metadata["training"]["n_new_good"] == 6 and candidate.model.memory.size > 0


def test_a_matting_network_runs_on_the_gpu_as_on_the_cpu(tmp_path):
    path = difference_matting_model(tmp_path / "matte.pt")
    plate = np.full((90, 160, 3), 40, np.uint8)
    frame = plate.copy()
    frame[20:70, 50:120] = 200
    on_gpu = DeepMatter(path, sha256_of(path))
    assert on_gpu.device.type == "cuda"
    alpha = on_gpu.alpha(frame, plate)
    np.testing.assert_array_equal(
        alpha, DeepMatter(path, sha256_of(path), "cpu").alpha(frame, plate)
    )
    assert alpha.sum() == 50 * 70
