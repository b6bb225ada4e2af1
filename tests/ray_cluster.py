"""One local Ray cluster for a test module: a head and a second node on this machine, one CPU each, started through
Ray's own test helper (ray.cluster_utils.Cluster), so two workers or job slots land one per node, as on two
machines. Both bind this machine's own address (Ray turns a client's 127.0.0.1 into that address, so a loopback-only
cluster cannot be joined)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil


class TwoNodes:
    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    @property
    def address(self) -> str:
        """For `ray.init(address=...)` or `--ray-address`."""
        return str(self.cluster.address)

    def on_head(self, pid: int) -> bool:
        """Whether the Ray worker process `pid` runs on the head node (a node's raylet starts its workers)."""
        return psutil.Process(pid).ppid() == _raylet_pid(self.cluster.head_node)

    def kill_node_of(self, pid: int) -> None:
        """Kill the (non-head) node running the worker `pid` at once, raylet, object store and workers, as a
        machine that dies; then start a fresh node in its place (`replace`) when the test is done with it."""
        node = next(n for n in self.cluster.worker_nodes if _raylet_pid(n) == psutil.Process(pid).ppid())
        self.cluster.remove_node(node, allow_graceful=False)

    def add_node(self) -> None:
        self.cluster.add_node(num_cpus=1)
        self.cluster.wait_for_nodes()


def _raylet_pid(node: Any) -> int:
    return int(node.all_processes["raylet"][0].process.pid)


@contextmanager
def two_nodes() -> Iterator[TwoNodes]:
    """The cluster, shut down on exit."""
    from ray import cluster_utils

    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        nodes = TwoNodes(cluster)
        nodes.add_node()
        yield nodes
    finally:
        cluster.shutdown()  # ends the processes this cluster started, and only those
