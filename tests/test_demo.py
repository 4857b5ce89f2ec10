"""`defectflow demo` end to end: a real model, a real embedded Redis, real streams."""

import json

import redis
from typer.testing import CliRunner

from cluster.cli import app
from cluster.redis_conn import EmbeddedRedis
from schemas import Verdict
from tests.synthetic import make_dataset


def test_demo_trains_streams_and_reports(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=16, n_good=4, n_defect=2)
    good = sorted((data / "test" / "good").glob("*.png"))[0]
    (data / "test" / "good" / "zz_corrupt.png").write_bytes(good.read_bytes()[:100])
    out = tmp_path / "out"
    args = ["demo", "--data", str(data), "--out", str(out), "--products", "20", "--epochs", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["products"] == 8 and summary["dead_lettered"] == 1
    assert summary["auroc"] > 0.9
    lines = [json.loads(x) for x in (out / "verdicts.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and all(v["status"] == "complete" for v in lines)

    # The verdicts are in the Redis stream, and survive the embedded server's restart.
    with EmbeddedRedis(out / "redis") as server:
        client = redis.Redis.from_url(server.url)
        verdicts = [Verdict.from_entry(fields) for _, fields in client.xrange("verdicts:demo")]
        assert sorted(v.product_seq for v in verdicts) == sorted(x["product_seq"] for x in lines)
        [(_, dead)] = client.xrange("deadletter")
        assert b"not a readable image" in dead[b"_dl_reason"]
        assert dead[b"_dl_stream"] == b"frames:demo:cam0"

    # A second run reuses the trained model.
    again = CliRunner().invoke(app, args[:-2] + ["--products", "4"])
    assert again.exit_code == 0 and "reusing model" in again.output
