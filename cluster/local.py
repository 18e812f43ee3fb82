"""A Ray head on this machine (``cluster up``), joining one (``--join``), and stopping what we started.

Every ``ray start`` runs in its own session, so all the processes of one node share a process
group; the group id, the node's private ``--temp-dir``, the boot time and the processes (pid and
start time) are recorded under ``<state_dir>/<name>/nodes/``. ``cluster down`` signals only the
processes it can show are that node's (never ``ray stop``, which would stop every Ray on the
machine, other users' and tests' included): a recorded process with the same start time, a process
whose command line names the private temp dir, or a child of one of those. A group id reused after a
reboot or by another program is left alone, with a warning.

Loopback by default: Ray's CLI turns ``--node-ip-address 127.0.0.1`` into the machine's routable
address and then binds its gRPC servers there; with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` the node
address stays 127.0.0.1 and GCS, raylet, object manager, agents and dashboard all bind loopback
only. Such a head takes nodes of this machine only; other machines need ``host: <interface>``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import ClusterError, LocalClusterConfig, is_loopback

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
log = logging.getLogger(__name__)


@dataclass
class NodeRecord:
    role: str            # "head" or "worker"
    pgid: int
    temp_dir: str
    address: str         # GCS address host:port
    dashboard_url: str   # "" when the node serves no dashboard
    log: str
    auth_token_path: str = ""  # the head's token file ("" when auth is disabled)
    boot_time: float = 0.0     # the machine's boot time when the node started (0: not recorded)
    processes: list = field(default_factory=list)  # [pid, create_time] of the node's processes


def free_ports(host: str, n: int) -> list[int]:
    """``n`` distinct free ports (held open together, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _agent_port_args(host: str) -> list[str]:
    """Ray's fixed default agent ports (52365, 10001) clash between clusters on one machine."""
    ports = free_ports(host, 5)
    return ["--dashboard-agent-listen-port", str(ports[0]), "--dashboard-agent-grpc-port",
            str(ports[1]), "--runtime-env-agent-port", str(ports[2]),
            "--metrics-export-port", str(ports[3]), "--ray-client-server-port", str(ports[4])]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def check_reachable(host: str, port: int, timeout: float = 5.0) -> None:
    """Fail fast with a clear message (Ray itself retries an unreachable GCS for minutes)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        raise ClusterError(f"cannot reach {host}:{port} ({exc.strerror or exc}); check the address, "
                           "that the head is up, and that the network allows the port") from None


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterError(f"address '{address}' is not of the form host:port")
    return host.strip("[]"), int(port)


def ray_env(loopback: bool, auth_token_path: str | None = None) -> dict:
    """The environment of Ray processes: this interpreter's scripts first on PATH, no usage stats.

    ``auth_token_path``: "" disables Ray's token authentication, a path enables it with that
    token file, None leaves the caller's RAY_AUTH_* environment as it is.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if loopback:
        env[LOOPBACK_ENV] = "0"
    if auth_token_path is not None:
        env.update(auth_env(auth_token_path))
    return env


def auth_env(auth_token_path: str) -> dict:
    if not auth_token_path:
        return {"RAY_AUTH_MODE": "disabled"}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": auth_token_path}


def new_token_file(cfg: LocalClusterConfig) -> str:
    """A fresh random token, readable by this user only; its value is never printed or logged."""
    import secrets

    path = cfg.state_path / "auth_token"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return str(path)


def _ray_cli() -> list[str]:
    exe = Path(sys.executable).parent / "ray"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


def _nodes_dir(cfg: LocalClusterConfig) -> Path:
    return cfg.state_path / "nodes"


def read_nodes(cfg: LocalClusterConfig) -> list[NodeRecord]:
    folder = _nodes_dir(cfg)
    return [NodeRecord(**json.loads(p.read_text())) for p in sorted(folder.glob("*.json"))] \
        if folder.is_dir() else []


def head_record(cfg: LocalClusterConfig) -> NodeRecord | None:
    heads = [n for n in read_nodes(cfg) if n.role == "head" and group_pids(n)]
    return heads[0] if heads else None


def group_pids(node: NodeRecord) -> list[int]:
    """Live processes of a node (see :func:`node_processes`)."""
    return node_processes(node)[0]


def node_processes(node: NodeRecord) -> tuple[list[int], list[int]]:
    """(the node's live processes, strangers): processes in its process group or naming its temp
    dir; a process is the node's when it is a recorded one (same pid and start time, same boot),
    names the node's private temp dir, or descends from one that is."""
    import psutil

    same_boot = not node.boot_time or abs(psutil.boot_time() - node.boot_time) < 2.0
    recorded = {(int(pid), round(float(t), 2)) for pid, t in node.processes} if same_boot else set()
    ours, others = set(), []
    for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
        try:
            names_dir = node.temp_dir in " ".join(proc.info["cmdline"] or ())
            if proc.pid == os.getpid() or not (names_dir or os.getpgid(proc.pid) == node.pgid):
                continue
        except (ProcessLookupError, psutil.Error):
            continue
        if names_dir or (proc.pid, round(proc.info["create_time"] or 0.0, 2)) in recorded:
            ours.add(proc.pid)
        else:
            others.append(proc)
    strangers = []
    for proc in others:  # e.g. Ray workers (their command line is rewritten to ray::...)
        try:
            mine = any(parent.pid in ours for parent in proc.parents())
        except psutil.Error:
            continue
        if mine:
            ours.add(proc.pid)
        else:
            strangers.append(proc.pid)
    return sorted(ours), strangers


def _snapshot(pgid: int) -> list[list]:
    """[pid, create_time] of the live processes of a process group (recorded with the node)."""
    import psutil

    out = []
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getpgid(proc.pid) == pgid:
                out.append([proc.pid, round(proc.info["create_time"], 2)])
        except (ProcessLookupError, psutil.Error):
            continue
    return out


def _run_ray_start(args: list[str], env: dict, temp_dir: str, log: Path, timeout: float) -> int:
    """Run ``ray start`` in a new session; on failure kill everything it spawned. Returns the pgid."""
    with log.open("w") as out:
        proc = subprocess.Popen(_ray_cli() + ["start", *args, "--temp-dir", temp_dir,
                                              "--disable-usage-stats"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        node = NodeRecord("starting", proc.pid, temp_dir, "", "", str(log))
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        except BaseException:  # Ctrl-C: its own session does not get the signal; stop it here
            node.processes = _snapshot(proc.pid)
            _kill(node, grace_s=2.0)
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
    if rc != 0:
        node.processes = _snapshot(proc.pid)  # the group we have just started
        _kill(node, grace_s=5.0)
        shutil.rmtree(temp_dir, ignore_errors=True)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        why = f"timed out after {timeout:.0f}s" if rc is None else f"exited with {rc}"
        raise ClusterError(f"ray start {why}; nothing was left running. Log {log}:\n{tail}")
    return proc.pid


def _record(cfg: LocalClusterConfig, node: NodeRecord) -> NodeRecord:
    import psutil

    node.boot_time, node.processes = psutil.boot_time(), _snapshot(node.pgid)
    _nodes_dir(cfg).mkdir(parents=True, exist_ok=True)
    (_nodes_dir(cfg) / f"{node.role}-{node.pgid}.json").write_text(json.dumps(asdict(node), indent=1))
    return node


def _prepare(cfg: LocalClusterConfig, role: str) -> tuple[str, Path]:
    cfg.state_path.mkdir(parents=True, exist_ok=True)
    # Ray's unix sockets live under the temp dir: keep its path short (sockets allow ~107 bytes).
    temp_dir = tempfile.mkdtemp(prefix=f"mskfm-ray-{role}-")
    return temp_dir, cfg.state_path / f"{role}-{Path(temp_dir).name}.log"


def _resource_args(cfg: LocalClusterConfig) -> list[str]:
    args = []
    if cfg.num_cpus is not None:
        args += ["--num-cpus", str(cfg.num_cpus)]
    if cfg.num_gpus is not None:
        args += ["--num-gpus", str(cfg.num_gpus)]
    if cfg.object_store_memory_mb is not None:
        args += ["--object-store-memory", str(cfg.object_store_memory_mb * 2**20)]
    return args


def exposure_warnings(cfg: LocalClusterConfig) -> list[str]:
    notes = []
    if cfg.auth == "disabled" and is_loopback(cfg.host):
        notes.append("WARNING: token authentication is OFF (auth=disabled): any process of any user "
                     "on this machine that reaches the Ray ports can run code as you.")
    if not is_loopback(cfg.host):
        guard = ("token authentication is on" if cfg.auth == "token" else
                 "token authentication is OFF (auth=disabled): anyone who reaches it can run code")
        notes.append(f"WARNING: Ray binds {cfg.host}, not loopback; {guard}. Firewall the Ray "
                     "ports to your cluster's machines (see docs/cluster.md).")
    if cfg.dashboard and not is_loopback(cfg.dashboard_host):
        notes.append(f"WARNING: the Ray dashboard and Jobs API listen on {cfg.dashboard_host}: job "
                     "submission there is remote code execution. Prefer an SSH tunnel to 127.0.0.1.")
    return notes


def start_head(cfg: LocalClusterConfig) -> NodeRecord:
    if head_record(cfg):
        raise ClusterError(f"cluster '{cfg.name}' already has a running head; `cluster down` first")
    if cfg.port and port_in_use(cfg.host, cfg.port):
        raise ClusterError(f"port {cfg.port} on {cfg.host} is in use (another Ray head?); "
                           "pick another `port=` or 0 for a free one")
    if cfg.dashboard and cfg.dashboard_port and port_in_use(cfg.dashboard_host, cfg.dashboard_port):
        raise ClusterError(f"dashboard port {cfg.dashboard_port} on {cfg.dashboard_host} is in use")
    port = cfg.port or free_ports(cfg.host, 1)[0]
    dash_port = cfg.dashboard_port or free_ports(cfg.dashboard_host, 1)[0]
    args = ["--head", "--node-ip-address", cfg.host, "--port", str(port), *_agent_port_args(cfg.host),
            "--include-dashboard", str(cfg.dashboard).lower(),
            *_resource_args(cfg)]
    if cfg.dashboard:
        args += ["--dashboard-host", cfg.dashboard_host, "--dashboard-port", str(dash_port)]
    temp_dir, log = _prepare(cfg, "head")
    token = new_token_file(cfg) if cfg.auth == "token" else ""
    env = ray_env(is_loopback(cfg.host), token)
    try:
        pgid = _run_ray_start(args, env, temp_dir, log, cfg.start_timeout_s)
    except ClusterError:
        if token:
            Path(token).unlink(missing_ok=True)
        raise
    url = f"http://{_url_host(cfg.dashboard_host)}:{dash_port}" if cfg.dashboard else ""
    return _record(cfg, NodeRecord("head", pgid, temp_dir, f"{_url_host(cfg.host)}:{port}", url,
                                   str(log), token))


def join(cfg: LocalClusterConfig, address: str, timeout: float = 5.0) -> NodeRecord:
    """Start a worker node on this machine that joins the head at ``address``."""
    host, port = split_address(address)
    if is_loopback_name(host):
        raise ClusterError(f"'{address}' is a loopback address: that head accepts nodes of its own "
                           "machine only and nodes on it need no join. To add machines, start the "
                           "head with `host=<interface address>`.")
    check_reachable(host, port, timeout)
    args = ["--address", address, *_agent_port_args("0.0.0.0")[:8], *_resource_args(cfg)]
    temp_dir, log = _prepare(cfg, "worker")
    pgid = _run_ray_start(args, ray_env(False), temp_dir, log, cfg.start_timeout_s)
    return _record(cfg, NodeRecord("worker", pgid, temp_dir, address, "", str(log)))


def is_loopback_name(host: str) -> bool:
    try:
        return is_loopback(host)
    except ValueError:
        return host == "localhost"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _kill(node: NodeRecord, grace_s: float) -> int:
    pids, strangers = node_processes(node)
    for pid in strangers:
        log.warning("left alone: process %d is in the recorded process group %d of the %s node "
                    "but is not one that `cluster up` started (group id reused?)", pid, node.pgid, node.role)
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and group_pids(node):
        time.sleep(0.3)
    left = group_pids(node)
    _signal_all(left, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and group_pids(node):
        time.sleep(0.2)
    return len(set(pids) | set(left))


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop(cfg: LocalClusterConfig, grace_s: float = 5.0) -> int:
    """Stop the nodes this machine started for ``cfg.name`` (workers first). Returns processes stopped."""
    stopped = 0
    for node in sorted(read_nodes(cfg), key=lambda n: n.role == "head"):
        stopped += _kill(node, grace_s)
        shutil.rmtree(node.temp_dir, ignore_errors=True)
        (_nodes_dir(cfg) / f"{node.role}-{node.pgid}.json").unlink(missing_ok=True)
        if node.auth_token_path:
            Path(node.auth_token_path).unlink(missing_ok=True)
    return stopped
