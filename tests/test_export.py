"""Exported models: ONNX Runtime and OpenVINO give PyTorch's scores; a changed file is refused."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.synthetic import make_dataset, textured_tile
from workers.datasets import list_test_samples
from workers.differnet.model import TiledImage
from workers.differnet.recipes import load_samples
from workers.differnet.store import ModelError, load_model

runner = CliRunner()


def cli(*args):
    from cluster.apps.cli import app

    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def exported(contract_line, tmp_path_factory):
    """The production path's line model, exported both ways, and a few images to score."""
    model, _ = contract_line
    for fmt in ("onnx", "openvino"):
        result = cli("export", model, "--format", fmt)
        assert result.exit_code == 0, result.output
    return model, make_dataset(tmp_path_factory.mktemp("images"), n_train=0, n_good=3, n_defect=2)


def images(data):
    loaded = load_samples(list_test_samples(data))
    # A long part too: scored as tiles, the memory's graph taking each at its own size.
    rng = np.random.default_rng(3)
    loaded.rgb.append(textured_tile(rng, 72, 300))
    loaded.alpha.append(None)
    return loaded


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_an_exported_model_scores_as_pytorch_does(exported, runtime):
    model_dir, data = exported
    record = json.loads((model_dir / f"export-{runtime}" / "export.json").read_text())
    assert record["model_sha256"] == load_model(model_dir).metadata["sha256"]
    assert set(record["graphs"]) == {"pooled", "memory"} and len(record["files"]) >= 2
    loaded = images(data)
    scores = {}
    for name in ("torch", runtime):
        bundle = load_model(model_dir, runtime=name)
        prepared = loaded.prepared(bundle.model)
        assert isinstance(prepared[-1], TiledImage)
        scores[name] = np.array([r.score for r in bundle.model.score_batch(prepared)])
        maps = bundle.model.defect_maps(prepared[-3:])
        assert all(m.defect_map is not None for m in maps)
    spread = scores["torch"].max() - scores["torch"].min()
    assert np.abs(scores[runtime] - scores["torch"]).max() <= 1e-3 * spread
    # The CLI scores with it too.
    path = list_test_samples(data)[0].path
    result = cli("score", model_dir, path, "--runtime", runtime)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["score"] == pytest.approx(
        scores["torch"][0], abs=1e-3 * spread
    )


def test_a_changed_graph_or_another_models_export_is_refused(exported, tmp_path):
    model_dir, _ = exported
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    graph = copy / "export-onnx" / "pooled.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        load_model(copy, runtime="onnx")
    record_path = copy / "export-openvino" / "export.json"
    record = json.loads(record_path.read_text())
    record["model_sha256"] = "0" * 64
    record_path.write_text(json.dumps(record))
    with pytest.raises(ModelError, match="export this model again"):
        load_model(copy, runtime="openvino")
    shutil.rmtree(copy / "export-onnx")
    with pytest.raises(ModelError, match="defectflow export"):
        load_model(copy, runtime="onnx")
    refused = cli("score", copy, "x.png", "--runtime", "onnx")
    assert refused.exit_code == 1 and "defectflow export" in refused.output
