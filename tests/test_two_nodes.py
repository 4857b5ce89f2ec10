"""Ray's GPU grants on a real two-node cluster (ray.cluster_utils). A line on two nodes, with
status and metrics, is tests/test_operations.py."""

import pytest
import ray
from ray.cluster_utils import Cluster


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1, num_gpus=1)  # declared: Ray schedules by what nodes declare
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_an_actor_runs_its_models_on_the_gpu_ray_gave_it_else_on_the_cpu(two_nodes):
    @ray.remote
    def where() -> tuple[str, str | None]:
        import os

        from cluster.runtime.actors import granted_device

        return granted_device(), os.environ.get("CUDA_VISIBLE_DEVICES")

    assert ray.get(where.options(num_cpus=0.1, num_gpus=0.5).remote()) == ("cuda", "0")
    # Given no GPU it keeps to the CPU, even where CUDA_VISIBLE_DEVICES would show it one.
    assert ray.get(where.options(num_cpus=0.1, num_gpus=0).remote())[0] == "cpu"
