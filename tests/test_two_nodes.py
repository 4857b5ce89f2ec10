"""A line on a real two-node Ray cluster (ray.cluster_utils): actors land on both nodes."""

import pytest
import ray
import redis
from ray.cluster_utils import Cluster

from cluster.demo import line_config
from cluster.runtime.graph import drain_and_stop, start_line
from cluster.runtime.settings import ReplicaConfig
from cluster.transport.connection import EmbeddedRedis
from cluster.transport.streams import Streams
from schemas import Verdict
from tests.test_cluster import SMALL, line_model, simulate  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1, num_gpus=1)  # declared: Ray schedules by what nodes declare
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_a_line_spreads_over_two_nodes_and_inspects_every_product(line_model, two_nodes, tmp_path):  # noqa: F811
    data, root = line_model
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    manifest = simulate(data, tmp_path / "line", 4, seed=7)
    with EmbeddedRedis(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        line = line_config(tmp_path / "line", manifest["cameras"], ReplicaConfig(detect=2, score=2))
        running = start_line(line, server.access, root / "model", resources=SMALL)
        actors = running.ingest + running.workers
        nodes = set(ray.get([a.node_id.remote() for a in actors]))
        drain_and_stop([running], timeout_s=300)
        got = [Verdict.from_entry(f) for _, f in client.xrange(Streams("demo").verdicts)]
    assert len(nodes) == 2
    assert sorted(v.product_seq for v in got) == list(range(4))


def test_an_actor_runs_its_models_on_the_gpu_ray_gave_it_else_on_the_cpu(two_nodes):
    @ray.remote
    def where() -> tuple[str, str | None]:
        import os

        from cluster.runtime.actors import granted_device

        return granted_device(), os.environ.get("CUDA_VISIBLE_DEVICES")

    assert ray.get(where.options(num_cpus=0.1, num_gpus=0.5).remote()) == ("cuda", "0")
    # Given no GPU it keeps to the CPU, even where CUDA_VISIBLE_DEVICES would show it one.
    assert ray.get(where.options(num_cpus=0.1, num_gpus=0).remote())[0] == "cpu"
