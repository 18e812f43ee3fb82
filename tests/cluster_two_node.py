"""Two Ray nodes on this machine (``ray.cluster_utils.Cluster``), loopback only, then the real
``pretrain run`` CLI against them; prints one JSON line with the node ids of the Ray Train workers.

Run by tests/test_cluster.py in a subprocess, so the test session's own Ray is never touched.
usage: python tests/cluster_two_node.py -- <pretrain run arguments>
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # node address 127.0.0.1: bind loopback only
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def main(pretrain_args: list[str]) -> int:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    dash, agent_head, agent_worker, client = free_ports(4)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dash, "dashboard_agent_listen_port": agent_head,
        "ray_client_server_port": client, "node_ip_address": "127.0.0.1"})
    worker = cluster.add_node(num_cpus=1, dashboard_agent_listen_port=agent_worker,
                              node_ip_address="127.0.0.1")
    try:
        cmd = [sys.executable, "-m", "pretrain", "run", *pretrain_args, f"ray.address={cluster.address}"]
        rc = subprocess.call(cmd)
        ray.init(address=cluster.address, log_to_driver=False)
        workers = list_actors(address=f"http://127.0.0.1:{dash}", detail=True, limit=1000,
                              filters=[("class_name", "=", "RayTrainWorker")])
        print(json.dumps({"rc": rc, "nodes": [cluster.head_node.node_id, worker.node_id],
                          "worker_nodes": sorted(a.node_id for a in workers)}), flush=True)
        return rc
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main(argv[argv.index("--") + 1:] if "--" in argv else argv))
