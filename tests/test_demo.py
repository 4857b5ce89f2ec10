"""`defectflow demo` end to end on small made-up data: train, simulate, inspect, report."""

import json
import shutil
from pathlib import Path

import pytest
import redis
import yaml
from typer.testing import CliRunner

from cluster.apps.cli import app
from cluster.demo import DEMO_CROPS, reusable_line_model
from cluster.transport.connection import EmbeddedRedis
from cluster.transport.streams import Streams
from schemas import Verdict
from tests.conftest import PASSWORD
from workers.differnet.store import load_model, update_metadata


def test_demo_trains_inspects_a_simulated_line_and_reports(
    demo_run, tmp_path, monkeypatch, protected_redis
):
    root, _, output = demo_run
    monkeypatch.chdir(root)  # where the README's commands run: demo-out/ beside deploy/
    out = Path("demo-out")
    assert "reusing model" not in output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["products"] == 5 and summary["verdicts"] == 5
    assert summary["matched"] == 5  # each verdict tied to its product by capture time
    assert summary["latency_p99_s"] >= summary["latency_p50_s"] > 0
    lines = [json.loads(x) for x in (out / "verdicts.jsonl").read_text().splitlines()]
    assert sorted(v["product_seq"] for v in lines) == list(range(5))
    assert all(v["truth"] in ("good", "defect") and len(v["views"]) == 4 for v in lines)
    assert [v["simulated_product"] for v in lines] == list(range(5))
    assert sorted(p.name for p in out.glob("annotated_*.mp4")) == [
        f"annotated_cam{i}.mp4" for i in range(4)
    ]
    assert (out / "model" / "model.json").exists() and (out / "model" / "roc.png").exists()
    # Its threshold was chosen on validation products (each its worst view), as a line judges.
    rule = load_model(out / "model").metadata["threshold_rule"]
    assert rule["source"] == "validation products"
    # The embedded Redis kept its verdicts under the demo's data folder.
    with EmbeddedRedis(out / "redis") as embedded:
        assert redis.Redis.from_url(embedded.url).xlen(Streams("demo").verdicts) == 5

    # The README's production command on the demo's videos and model, against a
    # password-protected Redis, gives the demo's verdicts: its line file names no crop settings,
    # the line takes them from the model.
    server = protected_redis("plant-redis")
    monkeypatch.setenv("DEFECTFLOW_REDIS_URL", server.url)
    monkeypatch.setenv("DEFECTFLOW_REDIS_PASSWORD", PASSWORD)
    example = Path(__file__).parents[1] / "deploy" / "lines" / "example.yaml"
    assert "mask_" not in yaml.safe_dump(yaml.safe_load(example.read_text()))
    run = CliRunner().invoke(app, ["run", "--config", str(example), "--replay"])
    assert run.exit_code == 0, run.output
    entries = server.admin.xrange(Streams("line1").verdicts)
    production = {v.product_seq: v for v in (Verdict.from_entry(f) for _, f in entries)}
    assert sorted(production) == list(range(5))
    for demo_verdict in lines:
        verdict = production[demo_verdict["product_seq"]]
        assert verdict.decision == demo_verdict["decision"]
        demo_scores = {r["camera"]: r["score"] for r in demo_verdict["views"]}
        for view in verdict.views:
            assert view.score == pytest.approx(demo_scores[view.camera], rel=1e-4, abs=1e-4)
    # A second demo run reusing the model, against a protected Redis: the dashboard's test.

    # The model records how its crops were cut; one that learned from crops cut another way
    # (another mask shape) would take the line's crops for defects, so it is not reused.
    model = shutil.copytree(out / "model", tmp_path / "model")
    assert reusable_line_model(model) is not None
    contract = load_model(model).metadata["input_contract"]
    assert contract["crops"] == DEMO_CROPS.model_dump()
    crops = contract["crops"] | {"mask_shape": "silhouette"}
    update_metadata(model, input_contract=contract | {"crops": crops})
    assert reusable_line_model(model) is None


def test_demo_without_data_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--data", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "MVTec AD layout" in result.output


def test_run_with_a_bad_config_is_a_clear_error(tmp_path):
    path = tmp_path / "lines.yaml"
    path.write_text("lines:\n  - id: l1\n    cameras: []\n")
    result = CliRunner().invoke(app, ["run", "--config", str(path)])
    assert (
        result.exit_code == 1 and "lines.0.cameras" in result.output and str(path) in result.output
    )


def test_verdicts_meet_their_products_by_capture_time_where_the_numbers_slip():
    from cluster.demo import TruthMatch, summarize

    # Three products crossing the centre (x 40 of an 80 px frame) at frames 10, 30 and 50.
    def product(seq: int, defective: bool) -> dict:
        boxes = {str(f): [f - 20 * seq + 25, 0, 10, 10] for f in range(0, 80)}
        return {"seq": seq, "defective": defective, "views": {"cam0": {"bboxes": boxes}}}

    manifest = {
        "spec": {"fps": 10.0, "width": 80},
        "products": [product(0, False), product(1, True), product(2, False)],
    }
    epoch = 1000.0

    def verdict(number: int, frame: float, decision: str) -> Verdict:
        view = {"camera": "cam0", "score": 2.0 if decision == "defect" else 0.0}
        return Verdict.build(
            product_id=f"l:{number}",
            line="l",
            product_seq=number,
            decision=decision,
            status="complete",
            views=[
                view | {"threshold": 1.0, "is_defect": decision == "defect", "model_version": "m"}
            ],
            captured_at=epoch + frame / 10,
            decided_at=epoch + 9,
            latency_ms={"frame_to_verdict": 300.0},
        )

    # The gate counted a glove first (number 0, no verdict), and product 2 twice.
    verdicts = [verdict(1, 10.2, "good"), verdict(2, 29.9, "defect"), verdict(3, 50, "good")]
    verdicts.append(verdict(4, 51, "good"))
    truth = TruthMatch(manifest, epoch)
    matched = truth.matched(verdicts)
    assert {q: v.product_seq for q, v in matched.items()} == {0: 1, 1: 2, 2: 3}
    assert truth.nearest(verdict(5, 20, "good")) is None  # between two products: neither
    summary = summarize(manifest, verdicts, 10.0, 0, epoch)
    assert (summary.matched, summary.defects_found, summary.false_alarms) == (3, 1, 0)
    assert summary.product_auroc == 1.0
    # By number (no epoch), the slip would judge every product by another's verdict.
    assert summarize(manifest, verdicts, 10.0, 0).defects_found == 0


def test_the_joins_tolerance_stays_under_half_the_shortest_gap_between_products(tmp_path):
    import json

    from cluster.demo import DEMO_MAX_CAMERA_SPREAD_S, camera_spread_s

    # Products crossing the centre (x 40 of an 80 px frame) at 10 fps at these frames.
    def manifest(crossings: list[int]) -> dict:
        products = [
            {"seq": i, "views": {"cam0": {"bboxes": {str(c): [35, 0, 10, 10]}}}, "defective": False}
            for i, c in enumerate(crossings)
        ]
        return {"spec": {"fps": 10.0, "width": 80}, "products": products}

    for crossings, expected in (([10, 30, 50], DEMO_MAX_CAMERA_SPREAD_S), ([10, 30, 34], 0.18)):
        (tmp_path / "manifest.json").write_text(json.dumps(manifest(crossings)))
        # 0.4 s between the last two: a view 0.2 s from either would be joined to either.
        assert camera_spread_s(tmp_path) == pytest.approx(expected)
