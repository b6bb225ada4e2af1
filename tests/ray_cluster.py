"""One local Ray cluster for a test module: a head and a second node on this machine, one CPU each, started through
Ray's own test helper (ray.cluster_utils.Cluster), so two workers or job slots land one per node, as on two
machines. Both bind this machine's own address (Ray turns a client's 127.0.0.1 into that address, so a loopback-only
cluster cannot be joined)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def two_nodes() -> Iterator[str]:
    """The cluster's address, for `ray.init(address=...)` or `--ray-address`; shut down on exit."""
    from ray import cluster_utils

    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield str(cluster.address)
    finally:
        cluster.shutdown()  # ends the processes this cluster started, and only those
