import json

import pytest
from typer.testing import CliRunner

from cluster.apps.cli import app
from cluster.runtime.settings import ConfigError, load_settings
from schemas import STREAM_MESSAGES

SHA = "ab" * 32  # a sha256, as a line file records it for a weights file

LINE_YAML = """
redis_url: redis://localhost:6379/0
model_dir: /models
lines:
  - id: line1
    cameras:
      - {id: cam0, source: sim}
      - {id: cam1, source: /videos/cam1.mp4, fps: 15}
    replicas: {detect: 2, score: 3}
    target_tpr: 0.9
"""


def test_a_line_file_loads(tmp_path):
    path = tmp_path / "line.yaml"
    path.write_text(LINE_YAML)
    settings = load_settings(path)
    line = settings.lines[0]
    assert settings.redis_url == "redis://localhost:6379/0"
    assert [c.id for c in line.cameras] == ["cam0", "cam1"]
    assert line.replicas.score == 3 and line.target_tpr == 0.9


def test_the_environment_overrides_the_file(tmp_path, monkeypatch):
    path = tmp_path / "line.yaml"
    path.write_text(LINE_YAML)
    monkeypatch.setenv("DEFECTFLOW_REDIS_URL", "rediss://redis.factory:6380/1")
    monkeypatch.setenv("DEFECTFLOW_REDIS_PASSWORD", "s3cret")
    settings = load_settings(path)
    assert settings.redis_url == "rediss://redis.factory:6380/1"
    assert settings.redis_password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    "text, field",
    [
        (LINE_YAML.replace("score: 3", "score: 0"), "lines.0.replicas.score"),
        (LINE_YAML.replace("target_tpr: 0.9", "target_tpr: 1.5"), "lines.0.target_tpr"),
        (LINE_YAML.replace("fps: 15", "fps: fast"), "lines.0.cameras.1.fps"),
        (
            LINE_YAML.replace("fps: 15", "fps: 15, frame_stride: 0"),
            "lines.0.cameras.1.frame_stride",
        ),
        (
            LINE_YAML.replace("target_tpr: 0.9", "target_tpr: 0.9\n    view_max_side: 8"),
            "lines.0.view_max_side",
        ),
        (
            LINE_YAML.replace("target_tpr: 0.9", "target_tpr: 0.9\n    mask_shape: oval"),
            "lines.0.mask_shape",
        ),
        (
            # A backlog is counted up to 10,000 views: a larger limit would never shed.
            LINE_YAML.replace("target_tpr: 0.9", "target_tpr: 0.9\n    max_backlog_products: 5000"),
            "lines.0",
        ),
        (LINE_YAML.replace("id: cam1", "id: cam0"), "lines.0"),
        (
            LINE_YAML.replace("target_tpr: 0.9", "target_tpr: 0.9\n    yolo_weights: w.pt"),
            "lines.0",
        ),
        (
            # Tracking needs a detector that boxes each product.
            LINE_YAML.replace("target_tpr: 0.9", "target_tpr: 0.9\n    trigger: tracking"),
            "lines.0",
        ),
        (
            LINE_YAML.replace("/videos/cam1.mp4", "rtsp://cam1.line/stream"),
            "lines.0.cameras.1",
        ),
        (LINE_YAML.replace("model_dir", "modle_dir"), "modle_dir"),
        (LINE_YAML.replace("id: line1", "id: 'line 1'"), "lines.0.id"),
    ],
)
def test_an_invalid_value_names_the_field_and_the_file(tmp_path, text, field):
    path = tmp_path / "line.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(path) in str(info.value)
    assert f"'{field}" in str(info.value)


def test_missing_and_broken_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_settings(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("lines: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(tmp_path / "bad.yaml")


def test_an_invalid_environment_value_names_the_variable_field(monkeypatch):
    monkeypatch.setenv("DEFECTFLOW_STREAM_MAXLEN", "ten")
    with pytest.raises(ConfigError, match="environment: field 'stream_maxlen'"):
        load_settings()


def test_schemas_command_writes_one_schema_per_message(tmp_path):
    result = CliRunner().invoke(app, ["schemas", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in tmp_path.iterdir())
    assert "verdict.v3.schema.json" in written and len(written) == len(STREAM_MESSAGES)
    verdict = json.loads((tmp_path / "verdict.v3.schema.json").read_text())
    assert verdict["x-stream-entry"]["kind"] == "verdict"
    assert "decision" in verdict["properties"]


def test_line_resources_take_gpus_where_the_cluster_has_them_and_obey_the_line():
    from cluster.runtime.graph import line_cpus, line_resources
    from cluster.runtime.settings import LineConfig

    cams = [{"id": f"c{i}", "source": "sim"} for i in range(4)]
    plain = LineConfig(id="a", cameras=cams)
    cpu = line_resources(plain, cluster_gpus=0)
    assert (cpu.score_gpus, cpu.detect_gpus, cpu.train_gpus) == (0, 0, 0)
    gpu = line_resources(plain, cluster_gpus=2)
    assert (gpu.score_gpus, gpu.detect_gpus, gpu.train_gpus) == (0.5, 0, 1.0)
    yolo = LineConfig(
        id="b",
        cameras=cams,
        yolo_weights="w.pt",
        yolo_weights_sha256=SHA,
        resources={"score_gpus": 1},
    )
    res = line_resources(yolo, cluster_gpus=4)
    # Its cameras track the products with the YOLO too; counting blobs, they run no network.
    assert (res.score_gpus, res.detect_gpus, res.ingest_gpus) == (1, 0.25, 0.25)
    blobs = yolo.model_copy(update={"trigger": "motion"})
    assert line_resources(blobs, cluster_gpus=4).ingest_gpus == 0
    matted = [{"id": "c0", "source": "sim", "matting_model": "bgm.pt", "matting_model_sha256": SHA}]
    assert line_resources(LineConfig(id="m", cameras=matted), cluster_gpus=4).ingest_gpus == 0.25
    tuned = LineConfig(id="c", cameras=cams, resources={"score_cpus": 2, "ingest_cpus": 0.5})
    assert line_cpus(tuned) == 4 * 0.5 + 0.5 + 2 + 0.1 + 0.5
    with pytest.raises(ValueError, match="score_cpus"):
        LineConfig(id="d", cameras=cams, resources={"score_cpus": 0})
    with pytest.raises(ValueError, match="whole number of GPUs"):
        LineConfig(id="e", cameras=cams, resources={"train_gpus": 1.5})
    assert LineConfig(id="f", cameras=cams, resources={"train_gpus": 2}).resources.train_gpus == 2


def test_on_fewer_gpus_than_the_lines_ask_for_every_default_share_shrinks_until_all_fit():
    from cluster.runtime.graph import line_gpus, line_resources, lines_resources
    from cluster.runtime.settings import LineConfig

    cams = [
        {"id": f"c{i}", "source": "sim", "matting_model": "bgm.pt", "matting_model_sha256": SHA}
        for i in range(4)
    ]

    def make(**settings) -> LineConfig:
        base = {
            "id": "a",
            "cameras": cams,
            "yolo_weights": "w.pt",
            "yolo_weights_sha256": SHA,
            "replicas": {"score": 2},
        }
        return LineConfig(**(base | settings))

    line = make()
    # 2 scorers x 0.5 + a detector 0.25 + 4 matting cameras x 0.25 + the trainer 1 = 3.25 GPUs
    assert line_resources(line, cluster_gpus=4).train_gpus == 1.0

    def used(lines, resources) -> float:
        return sum(line_gpus(x, r) for x, r in zip(lines, resources, strict=True))

    for lines, gpus in (([line], 1), ([line, make(id="b")], 1), ([line], 2)):
        resources = lines_resources(lines, gpus)
        assert gpus - 0.001 * len(lines) <= used(lines, resources) <= gpus
        assert resources[0].score_gpus == pytest.approx(resources[0].train_gpus / 2, abs=1e-3)
    # A line's own setting stands, and the defaults share what it leaves.
    fixed = make(resources={"train_gpus": 0.5})
    res = line_resources(fixed, cluster_gpus=1)
    assert res.train_gpus == 0.5 and 0.99 <= used([fixed], [res]) <= 1
    # A line without a trainer leaves its share to the others.
    assert line_resources(make(retrain={"enabled": False}), cluster_gpus=2.25).score_gpus == 0.5
