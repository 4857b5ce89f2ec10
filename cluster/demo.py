"""The demo line, end to end on the embedded defaults (embedded Redis, local Ray).

1. The line learns from its own cameras: a simulated run of good products goes through the front
   end (gate, detector, matting); DifferNet trains on those crops. A second simulated run, with
   defects, validates it (epoch choice, threshold). Both are built from images the test line
   never shows, and the training run from no other shot of a part the other two show
   (``without_shots_of``): the line's model meets new parts, as a plant's does.
2. A 4-camera test line is simulated, and the whole cluster (ingest, detect+matte, scorer,
   aggregator actors over Redis streams) inspects it.
3. The verdicts are compared with the simulator's truth.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from cluster.runtime.settings import CameraConfig, LineConfig, ReplicaConfig, SampleConfig
from cluster.transport.qa import read_verdicts
from schemas import Verdict
from workers.contract import CropSpec, InputContract
from workers.datasets import (
    Sample,
    list_test_samples,
    list_train_samples,
    split_stratified,
    without_shots_of,
)
from workers.differnet.config import DifferNetConfig
from workers.differnet.recipes import load_samples, score_images, train_from_folder
from workers.differnet.store import (
    ModelBundle,
    ModelError,
    load_model,
    update_metadata,
)
from workers.differnet.training import Progress, TrainingOptions
from workers.frontend.detect import Detector, YoloDetector, bootstrap_yolo
from workers.simulation.annotate import annotate_video, frame_outline
from workers.simulation.harvest import Boxes, harvest_crops
from workers.simulation.labels import truth_labels
from workers.simulation.simulate import LineSpec, camera_videos, render_line, scene_spec
from workers.threshold import auroc, auroc_interval
from workers.weights import sha256_of

LINE = "demo"
# The demo's crops are small (about 130 px tall): a 224 px input keeps their detail, and is fast.
# With the patch memory, as the tile scorer: it ranks the line's views better than the flow
# alone, at one test-time transform; two training transforms learn as well as four on the
# line's crops, in two thirds of the time (docs/benchmarks.md).
# Exposure brought to the training crops' median product luminance (117): the simulated views
# vary in gain and offset as cameras and lamps do (docs/benchmarks.md, "The whole line").
DEMO_MODEL = DifferNetConfig(image_size=224, train_transforms=2, tta=1, exposure_target=117.0)
# How the demo line cuts its crops, written into its model's input contract (the line then
# follows the model). ZeroBox's 10 % shrink per side. Whole-box masks: MTD tiles are rectangles,
# and the box gives every crop the same clean border where the silhouette's corners and notches
# vary from product to product (docs/benchmarks.md).
DEMO_CROPS = CropSpec(mask_shape="box", mask_shrink=0.1)
# A product crosses the view in 20 frames at 15 fps: the gate needs half of them (every product
# triggered exactly once at stride 2 and 3 in bench.frontend), and the front end then costs half.
DEMO_FRAME_STRIDE = 2
# Products follow each other every 1.7 s (26 frames at 15 fps): a view captured 0.5 s from its
# product's others is a neighbour's, its camera counting out of step. On a hard scene products
# close up to a third of a second apart: the tolerance is then under half the shortest gap, as
# an operator sets it from the line's pitch (a view within it of two products would be joined
# to either; views were, to the neighbour's, before it was).
DEMO_MAX_CAMERA_SPREAD_S = 0.5
# The training line shows every training image this many times, each time at another scale,
# place and exposure: the simulator is the augmentation, and random draws leave images out
# (docs/benchmarks.md, "Tried").
TRAIN_PASSES = 2
# Each side of a training crop's box moves by up to this share of the frame's width (3 px at
# 480 x 270), so that the line's model forgives a border a few pixels off instead of learning
# each product's border exactly; twice as much did worse (docs/benchmarks.md, "Tried").
TRAIN_BOX_JITTER = 0.006
# With `--detector yolo` the line first learns a YOLOv8n from a labelled run of this many
# products on two cameras (the simulator's truth stands for a plant's corrected labels; every
# fourth frame), for this many epochs at this input size: under 10 minutes on 2 CPU cores.
YOLO_TRAIN_PRODUCTS = 20
YOLO_EPOCHS = 40
YOLO_IMAGE_SIZE = 256


@dataclass
class DemoSummary:
    products: int
    verdicts: int
    matched: int  # simulated products with a verdict (TruthMatch)
    complete: int
    defective_truth: int
    defects_found: int
    false_alarms: int
    product_accuracy: float
    product_auroc: float | None
    product_auroc_ci95: tuple[float, float] | None  # bootstrap over the products
    latency_p50_s: float
    latency_p99_s: float
    products_per_s: float
    model_version: str
    dead_letters: int

    def to_dict(self) -> dict:
        return asdict(self)


def demo_line_spec(
    products: int,
    defect_rate: float,
    seed: int,
    frame_size: tuple[int, int] | None = None,
    scene: str = "easy",
) -> LineSpec:
    """The demo's simulated lines: an inspection station's controlled light, 3 % exposure
    jitter (the simulator's default is 15 %), in the named scene (``SCENES``).
    ``frame_size``: (width, height), else the simulator's."""
    size = dict(zip(("width", "height"), frame_size, strict=True)) if frame_size else {}
    return scene_spec(
        scene,
        products=products,
        defect_rate=defect_rate,
        seed=seed,
        exposure_jitter=0.03,
        **size,
    )


def demo_crops(detector: str) -> CropSpec:
    """How the demo line cuts its crops with the named detector."""
    return DEMO_CROPS.model_copy(update={"box_source": detector})


def train_yolo(data_dir: Path, work: Path, *, scene: str, seed: int, on_epoch=None) -> Path:
    """A YOLOv8n for the demo line, trained on the truth of a labelled run of its scene (the
    training images only); reused while its record says it was trained so. The weights."""
    weights, record_file = work / "yolo.pt", work / "yolo.json"
    record = {
        "scene": scene,
        "products": YOLO_TRAIN_PRODUCTS,
        "epochs": YOLO_EPOCHS,
        "image_size": YOLO_IMAGE_SIZE,
        "seed": seed,
    }
    if weights.is_file() and record_file.is_file():
        kept = json.loads(record_file.read_text())
        if kept.get("trained") == record and kept.get("sha256") == sha256_of(weights):
            return weights
    spec = replace(demo_line_spec(YOLO_TRAIN_PRODUCTS, 0.0, seed + 4, scene=scene), cameras=2)
    render_line(list_train_samples(data_dir), [], work / "line-yolo", spec)
    truth_labels(work / "line-yolo", work / "yolo-labels", every=4)
    report = bootstrap_yolo(
        [],
        weights,
        labelled=[work / "yolo-labels"],
        epochs=YOLO_EPOCHS,
        image_size=YOLO_IMAGE_SIZE,
        seed=seed,
        on_epoch=on_epoch,
    )
    record_file.write_text(json.dumps({"trained": record, "sha256": report["sha256"]}))
    return weights


def split_halves(data_dir: Path, seed: int):
    """Test images split in two: one half validates the model, the other feeds the test line."""
    halves = split_stratified(list_test_samples(data_dir), 0.5, seed)
    return tuple(
        ([s for s in half if not s.is_defect], [s for s in half if s.is_defect]) for half in halves
    )


def train_line_model(
    data_dir: Path,
    work: Path,
    *,
    train_products: int | None,
    epochs: int,
    seed: int,
    progress: Progress,
    frame_size: tuple[int, int] | None = None,
    boxes: Boxes = "detected",
    scene: str = "easy",
    yolo_weights: Path | None = None,
) -> Path:
    """Simulate, harvest and train; returns the model folder. ``train_products``: by default as
    many as show every training image ``TRAIN_PASSES`` times. ``boxes="true"`` harvests at the
    simulator's boxes instead of the front end's: the reference model a front end is measured
    against. ``yolo_weights``: the line's detector is YOLO (else contours)."""
    (val_good, val_bad), (test_good, _) = split_halves(data_dir, seed)
    crops = work / "crops"
    train_line = work / "line-train"
    # The line's model never saw the tiles its validation and test lines show.
    train = without_shots_of(list_train_samples(data_dir), val_good + test_good)
    train_products = train_products or TRAIN_PASSES * -(-len(train) // LineSpec.cameras)
    spec = demo_line_spec(train_products, 0.0, seed + 1, frame_size, scene)
    render_line(train, [], train_line, spec)
    jitter = TRAIN_BOX_JITTER if boxes == "detected" else 0.0
    detector: Detector | None = None
    if yolo_weights is not None:
        detector = YoloDetector(yolo_weights, sha256_of(yolo_weights))
    cut = demo_crops("yolo" if detector else "contour")
    harvest_crops(train_line, crops, "train", cut, DEMO_FRAME_STRIDE, boxes, jitter, detector)
    # The crops are what the model learns from; the videos (about 0.8 GB) go.
    for video in camera_videos(train_line).values():
        video.unlink()
    val_line = work / "line-val"
    val_products = max(8, train_products // 3)
    render_line(
        val_good,
        val_bad,
        val_line,
        demo_line_spec(val_products, 0.5, seed + 2, frame_size, scene),
    )
    harvest_crops(val_line, crops, "test", cut, DEMO_FRAME_STRIDE, boxes, detector=detector)
    model_dir = work / "model"
    train_from_folder(
        crops,
        model_dir,
        DEMO_MODEL,
        TrainingOptions(epochs=epochs, seed=seed),
        crops=cut,
        product_of=harvested_product,
        progress=progress,
    )
    update_metadata(model_dir, harvest=harvest_record(boxes, scene))
    return model_dir


def harvest_record(boxes: Boxes = "detected", scene: str = "easy") -> dict:
    """How the training crops were harvested beyond the input contract: whose boxes, jittered
    by how much, from which scene (recorded in the model's metadata)."""
    jitter = TRAIN_BOX_JITTER if boxes == "detected" else 0.0
    # An easy scene is not named: models harvested before scenes existed stay reusable.
    named = {"scene": scene} if scene != "easy" else {}
    return {"boxes": boxes, "train_box_jitter": jitter, "test_parts_unseen": True} | named


def reusable_line_model(
    model_dir: Path, boxes: Boxes = "detected", scene: str = "easy", detector: str = "contour"
) -> ModelBundle | None:
    """The model in ``model_dir`` if it is the demo's network (``DEMO_MODEL``), learned from
    crops cut and harvested as the demo cuts and harvests them now, and has a region threshold
    (one from before defect regions would give the line none), else None."""
    try:
        bundle = load_model(model_dir)
    except ModelError:
        return None
    contract = InputContract.of(bundle.metadata)
    same = contract is not None and contract.crops == demo_crops(detector)
    harvest = bundle.metadata.get("harvest")
    current = same and harvest == harvest_record(boxes, scene)
    current = current and bundle.model.config == DEMO_MODEL
    return bundle if current and bundle.region_threshold is not None else None


def harvested_product(sample: Sample) -> int:
    """The product a harvested crop is a view of: crops are named ``<camera>_<product seq>``."""
    return int(sample.path.stem.split("_")[-1])


def validation_products(bundle: ModelBundle, crops: Path) -> dict[int, tuple[float, bool]]:
    """Each validation product's highest view score and whether it is defective, by product
    number, from crops harvested as ``<camera>_<product seq>.png`` under ``crops/test``."""
    loaded = load_samples(list_test_samples(crops))
    scored = score_images(bundle.model, loaded.prepared(bundle.model))
    products: dict[int, tuple[float, bool]] = {}
    for sample, result in zip(loaded.samples, scored, strict=True):
        seq = harvested_product(sample)
        best, bad = products.get(seq, (float("-inf"), False))
        products[seq] = (max(best, result.score), bad or sample.is_defect)
    return products


def simulate_test_line(
    data_dir: Path,
    work: Path,
    products: int,
    seed: int,
    frame_size: tuple[int, int] | None = None,
    scene: str = "easy",
) -> dict:
    _, (test_good, test_bad) = split_halves(data_dir, seed)
    spec = demo_line_spec(products, 0.25, seed + 3, frame_size, scene)
    return render_line(test_good, test_bad, work / "line-test", spec)


def line_config(
    line_dir: Path,
    cameras: list[str],
    replicas: ReplicaConfig,
    fps: float | None = None,
    yolo_weights: Path | None = None,
) -> LineConfig:
    """The simulated line's config; ``fps`` replays the videos at the cameras' rate;
    ``yolo_weights``: its detector is YOLO. Its crops are cut as its model says (the model's
    input contract)."""
    videos = camera_videos(line_dir)
    yolo = {}
    if yolo_weights is not None:
        yolo = {
            "detector": "yolo",
            "yolo_weights": yolo_weights,
            "yolo_weights_sha256": sha256_of(yolo_weights),
        }
    return LineConfig(
        id=LINE,
        cameras=[
            CameraConfig(id=c, source=str(videos[c]), fps=fps, frame_stride=DEMO_FRAME_STRIDE)
            for c in cameras
        ],
        replicas=replicas,
        view_timeout_s=15.0,
        # Replayed at the cameras' rate, the views of a product are captured together (within
        # a frame); unpaced, each camera stamps when it read, which says nothing of the product.
        max_camera_spread_s=camera_spread_s(line_dir) if fps else None,
        **yolo,
    )


def camera_spread_s(line_dir: Path) -> float:
    """The join's tolerance for the simulated line in ``line_dir``: under half the shortest
    time between two products' crossings, and at most ``DEMO_MAX_CAMERA_SPREAD_S``."""
    manifest = json.loads((line_dir / "manifest.json").read_text())
    times = sorted(TruthMatch(manifest).crossing.values())
    shortest = float(np.min(np.diff(times))) if len(times) > 1 else np.inf
    return min(DEMO_MAX_CAMERA_SPREAD_S, 0.45 * shortest)


def demo_settings(
    out: Path, model_dir: Path, cameras: list[str], fps: float, yolo_weights: Path | None = None
) -> dict:
    """What the demo sets on top of the settings every command reads: its state under ``out``
    and its one line, replayed at the cameras' rate, inspected with ``model_dir`` (and YOLO
    where ``yolo_weights`` are given)."""
    line = line_config(out / "line-test", cameras, ReplicaConfig(), fps, yolo_weights)
    return {
        "data_dir": out,
        "model_dir": out,  # the trainer's candidates: OUT/demo/candidates
        "samples": SampleConfig(dir=out / "samples"),
        "lines": [line.model_copy(update={"model_dir": model_dir})],
    }


def product_score(verdict: Verdict) -> float:
    """A product's score: its most anomalous view, relative to the threshold."""
    return max((r.score - r.threshold for r in verdict.views), default=0.0)


class TruthMatch:
    """Which simulated product a verdict is about.

    With ``replay_epoch`` (when a paced replay's frame 0 was due: ``RunningLine.replay_epochs``)
    by capture time: the product whose centre crossed the cameras' centre line nearest the
    verdict's capture, within half the usual time between two products; the line's own numbers
    differ from the simulator's wherever a gate counted a glove or two touching products once.
    Without it (an unpaced replay stamps frames when read) by number, which holds on easy scenes.
    """

    def __init__(self, manifest: dict, replay_epoch: float | None = None):
        self.defective = {p["seq"]: bool(p["defective"]) for p in manifest["products"]}
        self.epoch = replay_epoch
        fps, centre = manifest["spec"]["fps"], manifest["spec"]["width"] / 2
        self.crossing = {}  # product -> seconds after frame 0 its centre crossed the line
        for p in manifest["products"]:
            frames = [
                min(boxes, key=lambda f: abs(boxes[f][0] + boxes[f][2] / 2 - centre))
                for boxes in (view["bboxes"] for view in p["views"].values())
                if boxes
            ]
            if frames:
                self.crossing[p["seq"]] = float(np.median([int(f) for f in frames])) / fps
        times = sorted(self.crossing.values())
        self.tolerance_s = float(np.median(np.diff(times))) / 2 if len(times) > 1 else 1.0

    def nearest(self, verdict: Verdict) -> tuple[int, float] | None:
        """The product this verdict is about and how far its crossing is from the capture."""
        if self.epoch is None:
            seq = verdict.product_seq
            return (seq, 0.0) if seq in self.defective else None
        at = verdict.captured_at - self.epoch
        seq = min(self.crossing, key=lambda q: abs(self.crossing[q] - at), default=None)
        gap = abs(self.crossing[seq] - at) if seq is not None else np.inf
        return (seq, gap) if gap < self.tolerance_s else None

    def matched(self, verdicts: list[Verdict]) -> dict[int, Verdict]:
        """Each simulated product's verdict (the nearest where two claim it); products with
        none are left out."""
        best: dict[int, tuple[float, Verdict]] = {}
        for v in verdicts:
            found = self.nearest(v)
            if found is not None and found[1] < best.get(found[0], (np.inf,))[0]:
                best[found[0]] = (found[1], v)
        return {seq: v for seq, (_, v) in sorted(best.items())}


def summarize(
    manifest: dict,
    verdicts: list[Verdict],
    elapsed_s: float,
    dead_letters: int,
    replay_epoch: float | None = None,
) -> DemoSummary:
    """The verdicts against the simulator's truth (matched as :class:`TruthMatch` says)."""
    truth = TruthMatch(manifest, replay_epoch)
    matched = truth.matched(verdicts)
    judged = list(matched.values())
    labels = [int(truth.defective[seq]) for seq in matched]
    scores = [product_score(v) for v in judged]
    said_defect = [v.decision != "good" for v in judged]
    latencies = [v.latency_ms["frame_to_verdict"] / 1e3 for v in judged]
    return DemoSummary(
        products=len(truth.defective),
        verdicts=len(verdicts),
        matched=len(matched),
        complete=sum(v.status == "complete" for v in verdicts),
        defective_truth=sum(truth.defective.values()),
        defects_found=sum(d and t for d, t in zip(said_defect, labels, strict=True)),
        false_alarms=sum(d and not t for d, t in zip(said_defect, labels, strict=True)),
        product_accuracy=float(
            np.mean([d == bool(t) for d, t in zip(said_defect, labels, strict=True)])
        )
        if judged
        else 0.0,
        product_auroc=auroc(scores, labels),
        product_auroc_ci95=auroc_interval(scores, labels),
        latency_p50_s=float(np.percentile(latencies, 50)) if latencies else 0.0,
        latency_p99_s=float(np.percentile(latencies, 99)) if latencies else 0.0,
        products_per_s=len(judged) / elapsed_s if elapsed_s > 0 else 0.0,
        model_version=judged[0].views[0].model_version if judged and judged[0].views else "",
        dead_letters=dead_letters,
    )


def write_outputs(
    out: Path,
    line_dir: Path,
    manifest: dict,
    verdicts: list[Verdict],
    fps: float,
    replay_epoch: float | None = None,
) -> None:
    """verdicts.jsonl (each with the simulated product it is about and its truth, where
    :class:`TruthMatch` finds one) and the annotated videos."""
    truth = TruthMatch(manifest, replay_epoch)
    about = {v.product_id: seq for seq, v in truth.matched(verdicts).items()}
    with (out / "verdicts.jsonl").open("w") as f:
        for v in sorted(verdicts, key=lambda v: v.product_seq):
            record = v.model_dump(mode="json")
            if v.product_id in about:
                seq = about[v.product_id]
                record["simulated_product"] = seq
                record["truth"] = "defect" if truth.defective[seq] else "good"
            f.write(json.dumps(record) + "\n")
    decisions = {v.product_seq: v.decision for v in verdicts}
    regions: dict[str, dict[int, list]] = {}
    for v in verdicts:
        for view in v.views:
            outlines = [frame_outline(r) for r in view.regions]
            regions.setdefault(view.camera, {})[v.product_seq] = outlines
    for cam, video in camera_videos(line_dir).items():
        annotate_video(video, out / f"annotated_{cam}.mp4", decisions, fps, regions.get(cam))


def watch_verdicts(client, line: str, last_id: str, on_verdict: Callable[[Verdict], None]) -> str:
    """Hand every verdict of ``line`` after ``last_id`` to ``on_verdict``; the new last id."""
    for entry in read_verdicts(client, line, after=last_id):
        if entry.verdict is not None:
            on_verdict(entry.verdict)
        last_id = entry.entry_id
    return last_id


def timer() -> Callable[[], float]:
    start = time.monotonic()
    return lambda: time.monotonic() - start
