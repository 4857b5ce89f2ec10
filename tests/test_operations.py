"""What ops run (docs/operations.md), on a real two-node Ray cluster started with `ray start`.

Both nodes run on this machine; the line's actors spread over them; `defectflow run` attaches
with --ray-address, `defectflow status` reports, and each node's Prometheus endpoint serves the
line's metrics.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import ray
import redis
import yaml

from tests.synthetic import make_line

ROOT = Path(__file__).parents[1]
RAY = str(Path(sys.executable).parent / "ray")
DEFECTFLOW = [sys.executable, "-m", "cluster"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("path", ["deploy/cluster.yaml", "deploy/cluster-onprem.yaml"])
def test_ray_up_configs_follow_rays_autoscaler_schema(path):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / path).read_text())
    jsonschema.validate(config, schema)
    commands = " ".join(config["setup_commands"] + config["head_start_ray_commands"])
    assert "torch==2.14.1" in commands and "torchvision==0.29.1" in commands
    assert "defectflow run --config" in commands and "--metrics-export-port" in commands
    if config["provider"]["type"] == "aws":
        types = config["available_node_types"]
        assert types["gpu_worker"]["node_config"]["InstanceType"].startswith("g5.")
        assert types["cpu_worker"]["min_workers"] <= types["cpu_worker"]["max_workers"]


def test_kuberay_manifests_and_dockerfile_are_complete():
    cluster = yaml.safe_load((ROOT / "deploy/kuberay/raycluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for pod in [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups.values()]:
        [container] = pod["spec"]["containers"]
        assert container["image"] == "defectflow:0.1.0"
        env = {
            e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
            for e in container["env"]
            if "valueFrom" in e
        }
        assert env == {
            "DEFECTFLOW_REDIS_URL": "defectflow-redis",
            "DEFECTFLOW_REDIS_PASSWORD": "defectflow-redis",
            "RAY_AUTH_TOKEN": "defectflow-ray",
        }
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    assert all(
        g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in spec["workerGroupSpecs"]
    )
    job = yaml.safe_load((ROOT / "deploy/kuberay/rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["clusterSelector"] == {
        "ray.io/cluster": "defectflow"
    }
    assert job["spec"]["entrypoint"].startswith("defectflow run --config ")
    docker = (ROOT / "deploy/Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:[\d.]+-py311-gpu", docker, re.M)
    assert "torch==2.14.1" in docker and "torchvision==0.29.1" in docker
    for source in re.findall(r"^COPY (?:--\S+ )*(\S+(?: \S+)*) \S+$", docker, re.M):
        for part in source.split():
            assert (ROOT / part).exists(), part
    grafana = json.loads((ROOT / "deploy/grafana/defectflow.json").read_text())
    exprs = " ".join(t["expr"] for p in grafana["panels"] for t in p["targets"])
    for metric in (
        "frames_in",
        "verdicts",
        "stage_seconds",
        "stream_lag",
        "active_model",
        "camera_reconnects",
        "camera_resyncs",
        "shed",
        "unread_trimmed",
    ):
        assert f"ray_defectflow_{metric}" in exprs


@pytest.fixture
def two_node_cluster(tmp_path):
    """`ray start --head` and `ray start --address` as docs/operations.md says, on one machine."""
    port, metrics = free_port(), [free_port(), free_port()]
    # Token authentication, as in production: every node and client presents the same token.
    env = os.environ | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_metrics_report_interval_ms": "1000",
    }
    address = f"127.0.0.1:{port}"
    head = [RAY, "start", "--head", f"--port={port}", f"--metrics-export-port={metrics[0]}"]
    # The dashboard process serves Ray's state API, which `defectflow status` reads actors from.
    head += ["--num-cpus=4", "--dashboard-port=8265", "--disable-usage-stats"]
    worker = [RAY, "start", f"--address={address}", f"--metrics-export-port={metrics[1]}"]
    worker += ["--num-cpus=4"]  # logical CPUs: they schedule, the 2 cores are shared
    try:
        for command in (head, worker):
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the dashboard serves the state API `status` uses
            try:
                urllib.request.urlopen("http://127.0.0.1:8265/api/version", timeout=5).read()
                break
            except urllib.error.HTTPError:
                break  # it answers (asking for the token): it is up
            except OSError:
                time.sleep(1)
        yield address, metrics, env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def line_file(tmp_path: Path) -> Path:
    """A line file for a tiny trained model and a simulated 4-camera line."""
    model, videos = make_line(tmp_path, products=6)
    config = {
        "data_dir": str(tmp_path / "state"),
        "lines": [
            {
                "id": "line1",
                "model_dir": str(model),
                # Paced, the run lasts long enough to read metrics while it goes.
                "cameras": [{"id": v.stem, "source": str(v), "fps": 15} for v in videos],
                "replicas": {"detect": 2, "score": 2},
            }
        ],
    }
    path = tmp_path / "line.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def scrape(ports: list[int]) -> str:
    text = ""
    for port in ports:
        try:
            text += (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
                .read()
                .decode()
            )
        except OSError:
            pass
    return text


def test_a_line_runs_on_two_ray_nodes_with_status_and_prometheus_metrics(
    two_node_cluster, tmp_path
):
    address, metrics_ports, env = two_node_cluster
    config = line_file(tmp_path)
    run = subprocess.Popen(
        DEFECTFLOW + ["run", "--config", str(config), "--ray-address", address],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # The run starts the embedded Redis; a status started before it would start (and stop) its own.
    socket_path = tmp_path / "state" / "redis" / "redis.sock"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None:
        try:
            client = redis.Redis(unix_socket_path=str(socket_path))
            if client.get("model-active:{line1}"):
                # QA's own consumer group on the verdicts: its lag is a metric too.
                client.xgroup_create("verdicts:{line1}", "qa", id="0", mkstream=True)
                break
        except redis.ConnectionError:
            pass
        time.sleep(0.5)
    seen_status = None
    last_status = ""
    seen_metrics = ""
    deadline = time.monotonic() + 240
    try:
        while run.poll() is None and time.monotonic() < deadline:
            time.sleep(2)
            if seen_status is None:
                status = subprocess.run(
                    DEFECTFLOW
                    + ["status", "--config", str(config), "--ray-address", address, "--json"],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                last_status = status.stdout[-1500:] + status.stderr[-1500:]
                report = json.loads(status.stdout) if status.returncode == 0 else {}
                if len({a["class"] for a in report.get("actors", [])}) >= 4:
                    seen_status = report
            seen_metrics += scrape(metrics_ports)  # gauges show up a few seconds after counters
        output = run.communicate(timeout=120)[0]
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, output[-3000:]
    # Ray forwards its daemons' warnings (a nearly full disk, ...) into the same output.
    summary = [line for line in output.splitlines() if line.startswith("{")][-1]
    stats = json.loads(summary)["line1"]
    assert stats["aggregate"]["verdicts_complete"] == 6  # every product, every view

    # Status while the line ran: its streams, lag, active model, and actors on both nodes.
    assert seen_status is not None, last_status
    line = seen_status["lines"]["line1"]
    assert line["active_model"] and set(line["lag"]) >= {
        "views:{line1}/score",
        "scores:{line1}/aggregate",
    }
    assert len({a["node_id"] for a in seen_status["actors"]}) == 2

    # Prometheus text from the nodes' metrics endpoints.
    for name in ("frames_in", "views_scored", "verdicts", "stage_seconds_bucket", "stream_lag"):
        assert f"ray_defectflow_{name}" in seen_metrics, name
    assert re.search(r'ray_defectflow_active_model\{[^}]*line="line1"', seen_metrics)
    assert re.search(r'ray_defectflow_stream_lag\{[^}]*group="qa"', seen_metrics)
