"""Two Ray nodes on this machine, loopback only, and one job submitted to them.

Starts a head and a second node (two raylets, ``ray.cluster_utils.Cluster``), submits
``pretrain run <args>`` to them with ``cluster submit`` (the same command as on one machine: the
job joins its cluster through RAY_ADDRESS), and prints one JSON line: the job's exit code, the
two node ids, and the node id of every Ray Train worker. Used by tests/test_cluster.py and
scripts/bench_cluster.py.

usage: python scripts/two_node_local.py [--cpus-per-node 1] -- <pretrain run arguments>
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # node address 127.0.0.1: bind loopback only
os.environ["RAY_AUTH_MODE"] = "disabled"               # loopback only; see docs/cluster.md
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def main(cpus_per_node: int, pretrain_args: list[str]) -> int:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    dash, agent_head, agent_worker, client = free_ports(4)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": cpus_per_node, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dash, "dashboard_agent_listen_port": agent_head,
        "ray_client_server_port": client, "node_ip_address": "127.0.0.1"})
    worker = cluster.add_node(num_cpus=cpus_per_node, dashboard_agent_listen_port=agent_worker,
                              node_ip_address="127.0.0.1")
    jobs_api = f"http://127.0.0.1:{dash}"
    try:
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", "cluster", "submit", "--address", jobs_api,
                              "--working-dir", str(ROOT), "--", "pretrain", "run", *pretrain_args],
                             cwd=ROOT)
        wall = time.monotonic() - t0
        ray.init(address=cluster.address, log_to_driver=False)
        workers = list_actors(address=jobs_api, detail=True, limit=1000,
                              filters=[("class_name", "=", "RayTrainWorker")])
        print(json.dumps({"rc": rc, "wall_s": round(wall, 1),
                          "nodes": [cluster.head_node.node_id, worker.node_id],
                          "worker_nodes": sorted(a.node_id for a in workers)}), flush=True)
        return rc
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus-per-node", type=int, default=1)
    opts = parser.parse_args(argv[:cut])
    sys.exit(main(opts.cpus_per_node, argv[cut + 1:]))
