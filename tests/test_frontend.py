"""Simulator, motion gate, detectors and matting on a small simulated line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cluster.apps.cli import app
from schemas import CameraFrame
from tests.synthetic import difference_matting_model, make_dataset
from workers.datasets import list_train_samples
from workers.frontend.detect import (
    ContourDetector,
    Detection,
    YoloDetector,
    bootstrap_yolo,
    iou,
    pixel_box,
    read_frames,
)
from workers.frontend.matte import matte, shrink_mask
from workers.frontend.motion import MotionGate
from workers.frontend.stages import DetectMatte, NoProductFound
from workers.simulation.harvest import JitteredDetector, harvest_crops
from workers.simulation.simulate import (
    LineSpec,
    belt_texture,
    camera_videos,
    plan_line,
    render_camera,
    render_line,
    simulate_line,
)
from workers.weights import WeightsError, sha256_of

SPEC = LineSpec(products=5, cameras=2, defect_rate=0.4, width=240, height=160, seed=3)


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    data = make_dataset(tmp_path_factory.mktemp("tiles"), n_train=8, n_good=2, n_defect=2)
    out = tmp_path_factory.mktemp("line")
    return data, out, simulate_line(data, out, SPEC)


def gate_run(video):
    gate, detector, triggers = MotionGate(), ContourDetector(), []
    for index, frame in read_frames(video):
        trigger = gate.update(index, frame)
        if trigger is not None:
            triggers.append((trigger, frame, detector.detect(frame, trigger.composite_mask)))
    return triggers


def test_the_gate_works_scaled_down_and_answers_in_frame_pixels(line):
    _, out, _ = line
    frames = list(read_frames(camera_videos(out)["cam0"]))

    def triggers(work_width):
        gate = MotionGate(work_width=work_width)
        return [t for i, f in frames if (t := gate.update(i, f)) is not None]

    scaled, full = triggers(80), triggers(10_000)  # 240 px frames: a third, and as they are
    assert [t.frame_index for t in scaled] == [t.frame_index for t in full]
    for a, b in zip(scaled, full, strict=True):
        assert a.composite_mask.shape == b.composite_mask.shape == frames[0][1].shape[:2]
        assert iou(a.bbox, b.bbox) > 0.85
        overlap = (a.composite_mask > 0) & (b.composite_mask > 0)
        assert overlap.sum() > 0.85 * max(
            (a.composite_mask > 0).sum(), (b.composite_mask > 0).sum()
        )
    with pytest.raises(ValueError, match="work_width"):
        MotionGate(work_width=16)


def test_the_simulator_is_deterministic_for_a_seed(line, tmp_path):
    data, _, manifest = line
    again = simulate_line(data, tmp_path, SPEC)
    assert again["products"] == manifest["products"]
    other = simulate_line(data, tmp_path / "other", LineSpec(**{**SPEC.__dict__, "seed": 4}))
    assert other["products"] != manifest["products"]


def test_the_manifest_describes_every_product_and_view(line):
    _, out, manifest = line
    assert manifest["cameras"] == ["cam0", "cam1"] and len(manifest["products"]) == 5
    for product in manifest["products"]:
        categories = {v["category"] for v in product["views"].values()}
        assert product["defective"] == (categories != {"good"})
        for view in product["views"].values():
            first, last = view["frames"]
            assert last - first + 1 == len(view["bboxes"]) > 0
    frames = list(read_frames(camera_videos(out)["cam0"]))
    assert len(frames) == manifest["frames"] and frames[0][1].shape == (160, 240, 3)


def test_the_gate_fires_once_per_product_and_the_detector_finds_it(line):
    _, out, manifest = line
    for cam in manifest["cameras"]:
        triggers = gate_run(camera_videos(out)[cam])
        assert [t.product_seq for t, _, _ in triggers] == list(range(5))
        for trigger, _, detections in triggers:
            view = manifest["products"][trigger.product_seq]["views"][cam]
            truth = view["bboxes"][str(trigger.frame_index)]
            assert abs(truth[0] + truth[2] / 2 - SPEC.width / 2) < SPEC.width / 6  # near the centre
            assert iou(detections[0].bbox, tuple(truth)) > 0.85


def test_matting_removes_the_conveyor(line):
    _, out, manifest = line
    belt = belt_texture(SPEC, 0).astype(np.uint8)
    for trigger, frame, detections in gate_run(camera_videos(out)["cam0"]):
        truth = manifest["products"][trigger.product_seq]["views"]["cam0"]["bboxes"][
            str(trigger.frame_index)
        ]
        result = matte(frame, detections[0].bbox, trigger.composite_mask, shrink=0.1)
        x, y, w, h = result.box
        kept = result.mask > 0
        # Pixels kept outside the true product box are conveyor.
        inside = np.zeros((h, w), bool)
        tx, ty, tw, th = truth
        inside[max(0, ty - y) : ty - y + th, max(0, tx - x) : tx - x + tw] = True
        assert (kept & ~inside).sum() / kept.sum() < 0.05
        assert 0.3 < result.coverage < 0.9
        assert not result.crop[~kept].any()
        assert belt.shape[:2] == frame.shape[:2]


def test_shrink_keeps_the_centre_and_drops_the_rim():
    mask = np.full((100, 50), 255, np.uint8)
    shrunk = shrink_mask(mask, 0.1)
    assert shrunk[50, 25] == 255 and shrunk[5, 25] == 0 and shrunk[50, 2] == 0
    assert (shrunk > 0).sum() == 80 * 40
    with pytest.raises(ValueError):
        shrink_mask(mask, 0.6)


def test_the_mask_shapes_follow_the_silhouette_its_hull_or_the_box():
    frame = np.full((100, 120, 3), 200, np.uint8)
    silhouette = np.zeros((100, 120), np.uint8)
    silhouette[20:80, 30:90] = 255
    silhouette[20:30, 50:60] = 0  # a bite out of the edge: a dark spot the belt model took
    silhouette[45:50, 55:60] = 0  # a hole inside
    box = (30, 20, 60, 60)

    def kept(shape):
        cut = matte(frame, box, silhouette, shrink=0.0, margin=0.0, shape=shape)
        return cut.mask > 0

    as_is, hull, whole = kept("silhouette"), kept("hull"), kept("box")
    assert whole.all() and hull.sum() == whole.sum() == 60 * 60
    assert as_is[5, 25] == 0 and as_is[27, 27] == 1  # the bite stays, the hole is filled
    assert as_is.sum() == 60 * 60 - 100
    # Without a composite mask the box still bounds the product; the rest of the crop is belt.
    cut = matte(frame, box, None, shrink=0.0, margin=0.1, shape="box")
    assert cut.mask.shape == (72, 72) and (cut.mask > 0).sum() == 60 * 60


def test_bad_video_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such video"):
        list(read_frames(tmp_path / "absent.mp4"))
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.mp4"):
        list(read_frames(tmp_path / "empty.mp4"))
    gate = MotionGate()
    gate.update(0, np.zeros((40, 60, 3), np.uint8))
    with pytest.raises(ValueError, match="resolution changed"):
        gate.update(1, np.zeros((41, 60, 3), np.uint8))


def test_simulate_command_writes_videos_and_manifest(line, tmp_path):
    data, _, _ = line
    result = CliRunner().invoke(
        app,
        [
            "simulate",
            str(data),
            "--out",
            str(tmp_path),
            "--products",
            "2",
            "--cameras",
            "1",
            "--size",
            "160x120",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["products"] == 2
    assert camera_videos(tmp_path)["cam0"].exists() and (tmp_path / "manifest.json").exists()
    bad = CliRunner().invoke(
        app, ["simulate", str(data), "--out", str(tmp_path), "--products", "2", "--size", "big"]
    )
    assert bad.exit_code == 1 and "--size" in bad.output
    # A hard scene, one of its options changed: the manifest says what was drawn.
    base = ["simulate", str(data), "--products", "3", "--cameras", "1", "--size", "160x120"]
    hard = CliRunner().invoke(
        app, base + ["--out", str(tmp_path / "hard"), "--scene", "hard", "--no-shadows"]
    )
    assert hard.exit_code == 0, hard.output
    spec = json.loads((tmp_path / "hard" / "manifest.json").read_text())["spec"]
    assert spec["belt_marks"] and spec["distractors"] == 0.25 and not spec["shadows"]
    assert spec["product_scale"] == [0.3, 0.7]
    for wrong, said in (["--scene", "night"], "scene"), (["--flicker", "0.7"], "flicker"):
        refused = CliRunner().invoke(app, base + ["--out", str(tmp_path / "x"), *wrong])
        assert refused.exit_code == 1 and said in refused.output


def test_yolo_bootstrap_takes_auto_labels_and_corrected_ones_and_refuses_bad_lines(
    line, touching_scene, tmp_path
):
    _, out, _ = line
    _, _, trained = touching_scene
    # Corrected labels as CVAT exports them (YOLO 1.1): obj.names, obj_train_data/*.jpg + .txt;
    # a glove class is background to a product detector.
    cvat = tmp_path / "cvat"
    (cvat / "obj_train_data").mkdir(parents=True)
    (cvat / "obj.names").write_text("glove\nproduct\n")
    frame = next(f for i, f in read_frames(camera_videos(out)["cam0"]) if i == 40)
    cv2.imwrite(str(cvat / "obj_train_data" / "a.jpg"), frame)
    (cvat / "obj_train_data" / "a.txt").write_text("1 0.5 0.5 0.3 0.4\n0 0.1 0.1 0.05 0.05\n")
    cv2.imwrite(str(cvat / "obj_train_data" / "empty.jpg"), frame)  # no label file: negative
    report = bootstrap_yolo(
        list(camera_videos(out).values()),
        tmp_path / "yolo.pt",
        labelled=[cvat],
        epochs=1,
        image_size=96,
        architecture=trained["architecture"],
    )
    assert report["auto_labelled"] == 10 and report["given_labelled"] == 1
    assert report["sha256"] == sha256_of(tmp_path / "yolo.pt")
    given = sorted((tmp_path / "yolo.bootstrap" / "labels" / "train").glob("given0_*.txt"))
    assert [p.read_text() for p in given] == ["0 0.5 0.5 0.3 0.4\n", ""]
    (cvat / "obj_train_data" / "a.txt").write_text("1 0.5 0.5 1.3\n")
    with pytest.raises(ValueError, match=r"a.txt:1: not a YOLO box line"):
        bootstrap_yolo([], tmp_path / "bad.pt", labelled=[cvat])
    with pytest.raises(FileNotFoundError, match="no such labels folder"):
        bootstrap_yolo([], tmp_path / "bad.pt", labelled=[tmp_path / "absent"])
    nothing = CliRunner().invoke(app, ["detector", "bootstrap", "--out", str(tmp_path / "x.pt")])
    assert nothing.exit_code == 1 and "give videos, --labels folders, or both" in nothing.output


def test_yolo_leaves_the_process_its_torch_threads_in_training_and_prediction(
    touching_scene, tmp_path
):
    import torch
    from ultralytics.utils import NUM_THREADS

    line_dir, _, trained = touching_scene
    frame = next(f for i, f in read_frames(camera_videos(line_dir)["cam0"]) if i == 40)
    # A count of Ray's or the operator's choosing, not the one Ultralytics would set.
    wanted, threads = NUM_THREADS + 1, torch.get_num_threads()
    torch.set_num_threads(wanted)
    during = []
    try:
        report = bootstrap_yolo(
            [],
            tmp_path / "yolo.pt",
            labelled=[Path(trained["weights"]).parent / "labels"],
            epochs=1,
            image_size=96,
            architecture=trained["architecture"],
            on_epoch=lambda *_: during.append(torch.get_num_threads()),
        )
        after_training = torch.get_num_threads()
        YoloDetector(Path(report["weights"]), report["sha256"]).detect(frame)
        after_prediction = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    assert (during, after_training, after_prediction) == ([wanted], wanted, wanted)


def test_a_process_that_imports_yolo_first_keeps_torchs_own_thread_count(touching_scene):
    # Ultralytics sets OMP_NUM_THREADS=1 on import; a torch imported after it would take it.
    _, _, trained = touching_scene
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    uses_yolo = (
        "import os, numpy as np\n"
        "from pathlib import Path\n"
        "from workers.frontend.detect import YoloDetector\n"
        f"yolo = YoloDetector(Path({trained['weights']!r}), {trained['sha256']!r})\n"
        "yolo.detect(np.zeros((64, 96, 3), np.uint8))\n"
        "import torch\n"
        "print(torch.get_num_threads(), 'OMP_NUM_THREADS' in os.environ)\n"
    )
    plain = "import torch\nprint(torch.get_num_threads(), False)\n"
    said = [
        subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout.split()[-2:]
        for code in (uses_yolo, plain)
    ]
    assert said[0] == said[1]


def test_a_simulated_lines_truth_becomes_a_labelled_set(line, tmp_path):
    _, out, manifest = line
    result = CliRunner().invoke(
        app, ["detector", "labels", str(out), "--out", str(tmp_path / "set"), "--every", "5"]
    )
    assert result.exit_code == 0, result.output
    counts = json.loads(result.output.strip().splitlines()[-1])
    labels = sorted((tmp_path / "set" / "labels").glob("*.txt"))
    assert counts["frames"] == len(labels) == len(list((tmp_path / "set" / "images").iterdir()))
    boxes = [line.split() for p in labels for line in p.read_text().splitlines()]
    assert counts["boxes"] == len(boxes) > 0 and all(b[0] == "0" and len(b) == 5 for b in boxes)
    # A frame holding one product: its true box, as YOLO writes one.
    index, (x, y, w, h) = next(
        (int(k), b)
        for p in manifest["products"]
        for k, b in p["views"]["cam0"]["bboxes"].items()
        if int(k) % 5 == 0
    )
    (text,) = (tmp_path / "set" / "labels" / f"cam0_f{index:06d}.txt").read_text().splitlines()
    expected = [(x + w / 2) / 240, (y + h / 2) / 160, w / 240, h / 160]
    assert np.allclose([float(v) for v in text.split()[1:]], expected, atol=1e-5)


def fully_in_view(manifest: dict, kind: str, index: int, width: int) -> list[tuple]:
    """True boxes of the products (or distractors) wholly in view in frame ``index``."""
    boxes = [t["views"]["cam0"]["bboxes"].get(str(index)) for t in manifest[kind]]
    return [tuple(b) for b in boxes if b and b[0] > 0 and b[0] + b[2] < width]


def test_yolo_separates_touching_products_that_the_contour_detector_merges(touching_scene):
    line_dir, manifest, report = touching_scene
    yolo = YoloDetector(Path(report["weights"]), report["sha256"])
    merged = []
    for trigger, frame, found in gate_run(camera_videos(line_dir)["cam0"]):
        box = found[0].bbox
        inside = [
            t
            for t in fully_in_view(manifest, "products", trigger.frame_index, frame.shape[1])
            if iou(box, t) > 0 and _covered(t, box) > 0.8
        ]
        if len(inside) >= 2:
            merged.append((frame, box, inside))
    assert merged  # the gate saw touching products as one, and the contours boxed them as one
    for frame, box, inside in merged:
        assert all(iou(box, t) < 0.6 for t in inside)
        boxes = [d.bbox for d in yolo.detect(frame)]
        assert all(max(iou(b, t) for b in boxes) > 0.6 for t in inside), (boxes, inside)


def _covered(inner: tuple, outer: tuple) -> float:
    """The share of box ``inner`` inside box ``outer``."""
    x, y, w, h = inner
    ox, oy, ow, oh = outer
    ix = max(0, min(x + w, ox + ow) - max(x, ox))
    iy = max(0, min(y + h, oy + oh) - max(y, oy))
    return ix * iy / (w * h)


def test_a_glove_or_tool_the_gate_fires_on_gets_a_view_from_contours_and_none_from_yolo(
    touching_scene,
):
    line_dir, manifest, report = touching_scene
    yolo = DetectMatte(YoloDetector(Path(report["weights"]), report["sha256"]))
    contours = DetectMatte()
    on_distractors = []
    for trigger, frame, found in gate_run(camera_videos(line_dir)["cam0"]):
        things = fully_in_view(manifest, "distractors", trigger.frame_index, frame.shape[1])
        if any(iou(found[0].bbox, t) > 0.5 for t in things):
            on_distractors.append(_camera_frame(frame, trigger))
    assert on_distractors
    assert all(v is not None for v in contours.process_batch(on_distractors))
    assert yolo.process_batch(on_distractors) == [None] * len(on_distractors)
    with pytest.raises(NoProductFound):
        yolo.process(on_distractors[0])


def _camera_frame(frame: np.ndarray, trigger) -> CameraFrame:
    """A gated frame as the camera ingest sends it on."""
    return CameraFrame(
        line="l",
        camera="cam0",
        sequence=trigger.frame_index,
        product_seq=trigger.product_seq,
        timestamp=0.0,
        codec="jpeg",
        shape=frame.shape,
        image=cv2.imencode(".jpg", frame)[1].tobytes(),
        mask=cv2.imencode(".png", trigger.composite_mask)[1].tobytes(),
    )


def test_a_torchscript_matting_model_replaces_the_per_frame_mask(line, tmp_path):
    from workers.frontend.matte import DeepMatter

    path = difference_matting_model(tmp_path / "matte.pt")
    _, out, manifest = line
    matter = DeepMatter(path, sha256_of(path), device="cpu")
    gate, detector, triggers = MotionGate(matter=matter), ContourDetector(), []
    for index, frame in read_frames(camera_videos(out)["cam1"]):
        trigger = gate.update(index, frame)
        if trigger is not None:
            box = detector.detect(frame, trigger.composite_mask)[0].bbox
            truth = manifest["products"][trigger.product_seq]["views"]["cam1"]["bboxes"][
                str(trigger.frame_index)
            ]
            triggers.append(iou(box, tuple(truth)))
    assert len(triggers) == 5 and min(triggers) > 0.8
    with pytest.raises(FileNotFoundError):
        DeepMatter(tmp_path / "absent.pt", "0" * 64)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="TorchScript"):
        DeepMatter(tmp_path / "junk.pt", sha256_of(tmp_path / "junk.pt"))
    with pytest.raises(WeightsError, match="not the 0000"):  # another file than the recorded one
        DeepMatter(path, "0" * 64)


class _RunsCode:
    """What a malicious checkpoint holds: unpickling it calls a function of the attacker's."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_a_networks_sub_pixel_box_takes_the_nearest_pixel_borders():
    # A product covering pixels 11..49 across and 20..60 down, as a network predicts it.
    assert pixel_box((10.6, 20.4, 50.3, 60.7)) == (11, 20, 39, 41)
    assert pixel_box((5.2, 5.2, 5.4, 5.4)) == (5, 5, 1, 1)  # never an empty box


def test_yolo_weights_load_only_as_recorded_and_only_as_plain_weights(tmp_path):
    import torch

    evil = tmp_path / "evil.pt"
    torch.save({"model": _RunsCode()}, evil)
    with pytest.raises(WeightsError, match="not the 0000"):
        YoloDetector(evil, "0" * 64)
    # Even recorded, a checkpoint that would run code is refused before Ultralytics unpickles it.
    with pytest.raises(WeightsError, match="not loadable as plain YOLO weights"):
        YoloDetector(evil, sha256_of(evil))
    with pytest.raises(FileNotFoundError):
        YoloDetector(tmp_path / "absent.pt", "0" * 64)


def test_a_given_background_plate_replaces_the_learned_one(line, tmp_path):
    _, out, manifest = line
    frames = list(read_frames(camera_videos(out)["cam0"]))
    plate = frames[2][1]  # the empty belt, before the first product
    gate, detector, found = MotionGate(plate=plate), ContourDetector(), []
    for index, frame in frames:
        trigger = gate.update(index, frame)
        if trigger is not None:
            box = detector.detect(frame, trigger.composite_mask)[0].bbox
            truth = manifest["products"][trigger.product_seq]["views"]["cam0"]["bboxes"][str(index)]
            found.append(iou(box, tuple(truth)))
    assert len(found) == 5 and min(found) > 0.8
    with pytest.raises(ValueError, match="plate"):
        MotionGate(plate=plate).update(0, np.zeros((10, 10, 3), np.uint8))


def test_mjpeg_recordings_keep_more_of_the_rendered_frames_than_mp4v(tmp_path, line):
    data, _, _ = line
    good = list_train_samples(data)
    psnr = {}
    for codec in ("mp4v", "mjpeg"):
        spec = LineSpec(
            **{**SPEC.__dict__, "products": 2, "cameras": 1, "defect_rate": 0, "codec": codec}
        )
        render_line(good, [], tmp_path / codec, spec)
        video = camera_videos(tmp_path / codec)["cam0"]
        assert video.suffix == {"mp4v": ".mp4", "mjpeg": ".avi"}[codec]
        rendered = dict(render_camera(spec, plan_line(good, [], spec), 0))
        psnr[codec] = np.mean([cv2.PSNR(rendered[i], f) for i, f in read_frames(video)])
    assert psnr["mjpeg"] > psnr["mp4v"] + 3
    with pytest.raises(ValueError, match="codec"):
        LineSpec(products=1, codec="h265")


def test_lines_simulated_before_the_codec_setting_are_read_as_mp4(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"cameras": ["cam0", "cam1"]}))
    assert camera_videos(tmp_path) == {c: tmp_path / f"{c}.mp4" for c in ("cam0", "cam1")}


def test_a_long_run_of_near_identical_plain_products_is_counted_exactly(tmp_path, line):
    # At 3 % exposure jitter the plain grey tiles all look alike: a background model that keeps
    # learning while they pass takes them for belt after a few, and misses or doubles some.
    data, _, _ = line
    spec = LineSpec(products=10, defect_rate=0, seed=0, exposure_jitter=0.03, width=240, height=160)
    render_line(list_train_samples(data), [], tmp_path, spec)
    for video in camera_videos(tmp_path).values():
        triggers = gate_run(video)
        assert [t.product_seq for t, _, _ in triggers] == list(range(10)), video.name


def test_a_line_shows_every_image_once_before_it_repeats_one(line):
    data, _, _ = line
    good = list_train_samples(data)
    spec = LineSpec(products=len(good) // 2, cameras=2, defect_rate=0, seed=1)
    shown = [v.source for plan in plan_line(good, [], spec).products for v in plan.views]
    assert sorted(shown) == sorted(str(s.path) for s in good)
    twice = LineSpec(products=len(good), cameras=2, defect_rate=0, seed=1)
    shown = [v.source for plan in plan_line(good, [], twice).products for v in plan.views]
    assert all(shown.count(str(s.path)) == 2 for s in good)


@pytest.mark.parametrize("stride", [1, 2])
def test_the_front_end_benchmark_runs_and_counts_every_product_once(tmp_path, line, stride):
    from bench import frontend

    data, _, _ = line
    out = tmp_path / "bench.json"
    args = ["--data", str(data), "--json", str(out), "--out", str(tmp_path / "line")]
    result = frontend.main(args + ["--products", "3", "--frame-stride", str(stride)])
    (row,) = result["rows"]
    assert row["trigger_exactly_once_rate"] == 1.0 and row["crop_iou_min"] > 0.8
    assert row["scene"] == "easy" and row["detector"] == "contour"
    per_camera = json.loads((tmp_path / "line" / "easy" / "manifest.json").read_text())["frames"]
    assert row["frames_gated"] == result["cameras"] * -(-per_camera // stride)
    assert json.loads(out.read_text()) == result


def test_crops_cut_at_the_true_boxes_are_the_front_ends_views_of_the_same_products(line, tmp_path):
    _, out, manifest = line
    counts = harvest_crops(out, tmp_path / "detected", "test")
    assert harvest_crops(out, tmp_path / "true", "test", boxes="true") == counts
    assert sum(counts.values()) == len(manifest["products"]) * len(manifest["cameras"])
    for path in sorted((tmp_path / "true").rglob("*.png")):
        true = np.asarray(Image.open(path))
        detected = np.asarray(
            Image.open(tmp_path / "detected" / path.relative_to(tmp_path / "true"))
        )
        assert true.shape[2] == 4 and abs(true.shape[0] / detected.shape[0] - 1) < 0.15
        assert abs(true.shape[1] / detected.shape[1] - 1) < 0.15
        # The mask is the true box, shrunk: a filled rectangle of product pixels.
        rows, cols = np.nonzero(true[:, :, 3])
        kept = true[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert (kept[:, :, 3] == 255).all() and kept[:, :, :3].any(axis=2).mean() > 0.95
        assert 0.5 < kept.shape[0] * kept.shape[1] / (true.shape[0] * true.shape[1]) < 0.8


def test_training_crops_boxes_move_by_at_most_their_jitter_and_stay_in_the_frame(line, tmp_path):
    class Fixed:
        def detect(self, frame, foreground=None):
            return [Detection((0, 50, 80, 120), 0.9), Detection((300, 10, 20, 20), 0.1)]

    jittered = JitteredDetector(Fixed(), 0.01, seed=1)  # 5 px at 480 px across
    frame = np.zeros((270, 480, 3), np.uint8)
    found = [jittered.detect(frame) for _ in range(500)]
    assert all(len(f) == 1 for f in found)  # the product the gate fired on, jittered
    sides = np.array([(x, y, x + w, y + h) for (x, y, w, h) in (f[0].bbox for f in found)])
    moved = sides - np.array((0, 50, 80, 170))
    assert sides[:, 0].min() == 0 and np.abs(moved).max() == 5  # kept inside the frame
    assert len({tuple(m) for m in moved}) > 100  # every side moves, independently
    # Harvested with jitter, the same views are cut, their sizes a few pixels apart.
    _, out, _ = line
    plain = harvest_crops(out, tmp_path / "plain", "train")
    assert harvest_crops(out, tmp_path / "jittered", "train", box_jitter=0.02) == plain
    sizes = {p.name: Image.open(p).size for p in (tmp_path / "plain").rglob("*.png")}
    moved = [
        np.subtract(Image.open(p).size, sizes[p.name])
        for p in (tmp_path / "jittered").rglob("*.png")
    ]
    assert any(np.abs(m).max() > 0 for m in moved) and all(np.abs(m).max() <= 12 for m in moved)
