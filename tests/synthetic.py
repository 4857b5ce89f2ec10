"""Small synthetic inspection data in MVTec AD layout: textured tiles, some scratched or spotted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Simulated camera frames for tests: small, so that a line runs in seconds.
LINE_FRAME = {"width": 240, "height": 160}


def textured_tile(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    cells = rng.normal(150, 10, (h // 6 + 1, w // 6 + 1))
    img = np.kron(cells, np.ones((6, 6)))[:h, :w] + rng.normal(0, 3, (h, w))
    return np.repeat(img.clip(0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def add_defect(
    rng: np.random.Generator, img: np.ndarray, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    out, mask = img.copy(), np.zeros((h, w), np.uint8)
    if kind == "scratch":
        y, x0 = rng.integers(h // 4, 3 * h // 4), rng.integers(2, w // 3)
        mask[y : y + 3, x0 : x0 + w // 2] = 255
        out[mask > 0] = 25
    else:  # spot
        cy, cx = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
        yy, xx = np.ogrid[:h, :w]
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= (min(h, w) // 8) ** 2] = 255
        out[mask > 0] = 240
    return out, mask


def make_dataset(
    root: Path,
    *,
    n_train: int = 24,
    n_good: int = 6,
    n_defect: int = 3,
    seed: int = 0,
    shape: tuple[int, int] = (72, 96),
) -> Path:
    """Write train/good, test/good, test/{scratch,spot} and ground_truth masks under ``root``."""
    rng = np.random.default_rng(seed)
    h, w = shape
    for i in range(n_train):
        _save(root / "train" / "good" / f"{i:03d}.png", textured_tile(rng, h, w))
    for i in range(n_good):
        _save(root / "test" / "good" / f"{i:03d}.png", textured_tile(rng, h, w))
    for kind in ("scratch", "spot"):
        for i in range(n_defect):
            img, mask = add_defect(rng, textured_tile(rng, h, w), kind)
            _save(root / "test" / kind / f"{i:03d}.png", img)
            _save(root / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    return root


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def train_line_models(
    root: Path,
    names: tuple[str, ...] = ("model",),
    *,
    products: int = 8,
    epochs: int = 15,
    config=None,
    crops=None,
) -> Path:
    """Tiles in MVTec layout under ``root/tiles``, and one line model per name (seeds 0, 1, ...)
    trained on the front end's crops (cut as ``crops`` says, a ``CropSpec``) of a simulated
    line of good products. Returns the tiles."""
    from workers.contract import CropSpec
    from workers.datasets import list_train_samples
    from workers.differnet.config import DifferNetConfig
    from workers.differnet.recipes import train_from_folder
    from workers.differnet.training import TrainingOptions
    from workers.simulation.harvest import harvest_crops
    from workers.simulation.simulate import LineSpec, render_line

    data = make_dataset(root / "tiles", n_train=12, n_good=4, n_defect=3)
    train = LineSpec(products=products, defect_rate=0, seed=1, **LINE_FRAME)
    render_line(list_train_samples(data), [], root / "train-line", train)
    crops = crops or CropSpec()
    harvest_crops(root / "train-line", root / "crops", "train", crops)
    config = config or DifferNetConfig(image_size=96, train_transforms=4, tta=2)
    for seed, name in enumerate(names):
        options = TrainingOptions(epochs=epochs, seed=seed)
        train_from_folder(root / "crops", root / name, config, options, crops=crops)
    return data


def make_line(root: Path, products: int, seed: int = 4, crops=None) -> tuple[Path, list[Path]]:
    """A tiny line model (trained on crops cut as ``crops`` says) and the videos of a simulated
    4-camera line (half the products defective). Returns (model dir, videos)."""
    from workers.datasets import list_test_samples
    from workers.differnet.config import DifferNetConfig
    from workers.simulation.simulate import LineSpec, camera_videos, render_line

    tiny = DifferNetConfig(image_size=96, train_transforms=2, tta=1)
    data = train_line_models(root, products=6, epochs=5, config=tiny, crops=crops)
    samples = list_test_samples(data)
    render_line(
        [s for s in samples if not s.is_defect],
        [s for s in samples if s.is_defect],
        root / "line",
        LineSpec(products=products, defect_rate=0.5, seed=seed, **LINE_FRAME),
    )
    return root / "model", list(camera_videos(root / "line").values())


def one_camera_video(root: Path, products: int, codec: str = "mjpeg") -> Path:
    """The video of one camera on a simulated line of ``products`` good products."""
    from workers.datasets import list_train_samples
    from workers.simulation.simulate import LineSpec, camera_videos, render_line

    data = make_dataset(root / "tiles", n_train=6, n_good=1, n_defect=1)
    spec = LineSpec(products=products, cameras=1, defect_rate=0, seed=5, codec=codec, **LINE_FRAME)
    render_line(list_train_samples(data), [], root / codec, spec)
    return camera_videos(root / codec)["cam0"]


def difference_matting_model(path: Path) -> Path:
    """A TorchScript matting network with BGMv2's interface, ``(src, bgr) -> (alpha, fg)``:
    alpha marks where the frame differs from the background plate."""
    import torch
    from torch import nn

    class DifferenceMatte(nn.Module):
        def forward(self, src: torch.Tensor, bgr: torch.Tensor):
            pha = ((src - bgr).abs().amax(1, keepdim=True) > 0.12).float()
            return pha, src * pha

    torch.jit.script(DifferenceMatte()).save(str(path))
    return path


# A short hard scene of the test tiles on one camera: products close behind each other (two
# pairs touching while in full view), a glove or a tool in every wider gap.
TOUCHING_SCENE = {
    "products": 6,
    "cameras": 1,
    "defect_rate": 0.0,
    "close_products": 0.6,
    "distractors": 1.0,
    "seed": 2,
    "lead_frames": 20,
    "width": 192,
    "height": 128,
}


def touching_scene_line(root: Path) -> tuple[Path, dict]:
    """The scene's videos and manifest: (line folder, manifest)."""
    from workers.datasets import list_train_samples
    from workers.simulation.simulate import LineSpec, render_line

    data = make_dataset(root / "tiles", n_train=8, n_good=2, n_defect=2)
    manifest = render_line(list_train_samples(data), [], root / "line", LineSpec(**TOUCHING_SCENE))
    return root / "line", manifest


def touching_scene(root: Path) -> tuple[Path, dict, dict]:
    """The scene's videos and manifest, and a tiny YOLO trained on its truth (YOLOv8 at an
    eighth of the width: 0.35 M parameters, under a minute on 2 cores). Returns (line folder,
    manifest, the bootstrap's report: weights, sha256, ...)."""
    import yaml
    from ultralytics.nn.tasks import yaml_model_load

    from workers.frontend.detect import bootstrap_yolo
    from workers.simulation.labels import truth_labels

    _, manifest = touching_scene_line(root)
    truth_labels(root / "line", root / "labels", every=1)
    tiny = {k: v for k, v in yaml_model_load("yolov8n.yaml").items() if k != "yaml_file"}
    tiny |= {"nc": 1, "scales": {"t": [0.33, 0.125, 256]}, "scale": "t"}
    (root / "yolov8t.yaml").write_text(yaml.safe_dump(tiny))
    report = bootstrap_yolo(
        [],
        root / "yolo.pt",
        labelled=[root / "labels"],
        epochs=30,
        image_size=128,
        architecture=str(root / "yolov8t.yaml"),
        batch=8,
    )
    return root / "line", manifest, report


class TruthDetector:
    """A detector that makes no mistakes: the simulator's true product boxes of a frame of one
    camera's recording (the frame known by its pixels), to test what uses a detector apart
    from any detector's errors."""

    def __init__(self, line_dir: Path, manifest: dict, camera: str):
        import hashlib

        from workers.frontend.sources import open_source

        self._hash = lambda frame: hashlib.sha1(np.ascontiguousarray(frame).tobytes()).digest()
        video = line_dir / f"{camera}.avi"
        self._index = {self._hash(f.whole()): f.index for f in open_source(str(video), 1, 160)}
        self._boxes = [p["views"][camera]["bboxes"] for p in manifest["products"]]

    def detect(self, frame: np.ndarray, foreground: np.ndarray | None = None) -> list:
        from workers.frontend.detect import Detection

        key = str(self._index[self._hash(frame)])
        return [Detection(tuple(boxes[key]), 0.9) for boxes in self._boxes if key in boxes]
