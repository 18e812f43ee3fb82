"""``cluster up | down | submit | status | jobs``: a Ray cluster's lifecycle and its jobs.

    cluster up [--config configs/cluster/local.yaml] [key=value ...]   # a head on this machine
    cluster up --join HOST:PORT                                         # this machine joins a head
    cluster up --config configs/cluster/aws.yaml                        # a cloud cluster (ray up)
    cluster submit [--address http://127.0.0.1:8265] -- pretrain run --config ...
    cluster status | cluster jobs | cluster down [--config ...]
"""

from __future__ import annotations

import argparse
import os
import sys

from . import jobs, launcher, local
from shards.config import OverridesParser, UserError

from .config import ClusterError, LocalClusterConfig, is_loopback, load_local_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OverridesParser)
    for name, text in [("up", "start a head here, join one (--join), or launch a cloud cluster"),
                       ("down", "stop the nodes started here, or tear down a cloud cluster"),
                       ("submit", "run a command as a Ray job: `cluster submit [opts] -- CMD ...`"),
                       ("status", "nodes and their resources"),
                       ("jobs", "submitted jobs and their status")]:
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", help="configs/cluster/*.yaml (default: loopback head defaults)")
        p.add_argument("overrides", nargs="*", help="key=value overrides of the local config")
        if name == "up":
            p.add_argument("--join", metavar="HOST:PORT", help="join the head at this GCS address")
        if name in ("submit", "status", "jobs"):
            p.add_argument("--address", help="the head's dashboard URL (default: the local head "
                                             "started by `cluster up`, or $RAY_API_SERVER_ADDRESS)")
        if name == "submit":
            p.add_argument("--working-dir", default=str(jobs.CHECKOUT),
                           help="code shipped to the cluster (default: this checkout); the command itself "
                                "runs in the current folder")
            p.add_argument("--no-wait", action="store_true", help="return once submitted")
    return parser


def _local_config(args) -> LocalClusterConfig:
    return load_local_config(args.config, args.overrides)


def cmd_up(args) -> int:
    if args.config and not args.join and launcher.is_launcher_config(args.config):
        return launcher.up(args.config)
    cfg = _local_config(args)
    for note in local.exposure_warnings(cfg):
        print(note, file=sys.stderr)
    if args.join:
        print(f"note: this node listens on its routable address to reach {args.join}; "
              "firewall it to the cluster's machines", file=sys.stderr)
        node = local.join(cfg, args.join)
        print(f"joined {args.join} (node log {node.log}); `cluster down` stops this node")
        return 0
    node = local.start_head(cfg)
    print(f"Ray head '{cfg.name}' is up\n  address:   {node.address}")
    if node.dashboard_url:
        print(f"  jobs API:  {node.dashboard_url}"
              + (" (loopback only)" if is_loopback(cfg.dashboard_host) else ""))
    if is_loopback(cfg.host):
        print("  join:      this head listens on loopback only (this machine); to add machines, "
              "start it with host=<interface address>")
    else:
        print(f"  join:      on each other machine run `cluster up --join {node.address}` "
              f"(or `ray start --address={node.address}`)")
    if node.auth_token_path:
        print(f"  auth:      token in {node.auth_token_path} (this user only); other machines and "
              "clients need it: copy the file, export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<file>")
    print("  submit:    cluster submit -- <command>    stop: cluster down")
    auth = f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={node.auth_token_path} " if node.auth_token_path else ""
    print(f"  drivers:   {auth}pretrain run ... ray.address={node.address}   (a command on this machine "
          "joining this head)")
    return 0


def cmd_down(args) -> int:
    if args.config and launcher.is_launcher_config(args.config):
        return launcher.down(args.config)
    cfg = _local_config(args)
    n = local.stop(cfg)
    print(f"cluster '{cfg.name}': stopped {n} process(es)")
    return 0


def _address(args) -> str:
    if args.address:
        return args.address
    if os.environ.get("RAY_API_SERVER_ADDRESS"):
        return os.environ["RAY_API_SERVER_ADDRESS"]
    cfg = _local_config(args)
    head = local.head_record(cfg)
    if head is None:
        raise ClusterError(f"no running head '{cfg.name}' started here: run `cluster up` or pass "
                           "--address http://HOST:PORT (the head's dashboard)")
    if not head.dashboard_url:
        raise ClusterError(f"head '{cfg.name}' runs without its dashboard (dashboard=false): "
                           "the Jobs API needs it")
    os.environ.update(local.auth_env(head.auth_token_path))  # before Ray is first imported
    return head.dashboard_url


def cmd_submit(args, command: list[str]) -> int:
    jobs.entrypoint(command)  # no command: fail before contacting anything
    shared = _local_config(args).shared_dirs
    return jobs.submit(_address(args), command, args.working_dir, wait=not args.no_wait, shared_dirs=shared)


def cmd_status(args) -> int:
    address = _address(args)
    from ray.util.state import list_nodes

    jobs.client(address)  # reachability and a clear error first
    nodes = list_nodes(address=address, detail=True, raise_on_missing_output=False)
    print(f"{len(nodes)} node(s) at {address}")
    for n in sorted(nodes, key=lambda n: (not n.is_head_node, n.node_id)):
        res = ", ".join(f"{k}={v:g}" for k, v in sorted(n.resources_total.items())
                        if not k.startswith("node:") and k != "object_store_memory")
        print(f"  {'head  ' if n.is_head_node else 'worker'} {n.node_id[:12]} {n.node_ip} "
              f"{n.state:6} {res}")
    return 0


def cmd_jobs(args) -> int:
    rows = jobs.list_jobs(_address(args))
    print(f"{len(rows)} job(s)")
    for r in rows:
        code = "-" if r["exit"] is None else r["exit"]
        print(f"  {r['id']}  {r['status']:9} exit={code}  {r['start']}  {r['entrypoint']}")
        if r["outputs"]:
            print(f"      {r['outputs']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = _parser().parse_args(argv)
    try:
        if args.command == "submit":
            return cmd_submit(args, command)
        if command:
            raise ClusterError(f"`cluster {args.command}` takes no command after `--`")
        return {"up": cmd_up, "down": cmd_down, "status": cmd_status, "jobs": cmd_jobs}[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
