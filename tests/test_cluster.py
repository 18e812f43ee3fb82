"""`cluster` CLI: a loopback head, job submission with exit codes, scoped teardown, bad input.

The cluster under test is its own Ray (its own processes, temp dir and state dir), started with
the real CLI in subprocesses; the session's `ray_local` Ray is never touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from cluster.cli import main

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def recorded_nodes(state: Path) -> list:
    from cluster.config import LocalClusterConfig
    from cluster.local import read_nodes

    return read_nodes(LocalClusterConfig(state_dir=str(state)))


def live_pids(nodes) -> list[int]:
    """Live processes of these nodes (by process group and by their private temp dir)."""
    import psutil

    from cluster.local import group_pids

    pids = [pid for node in nodes for pid in group_pids(node)]
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


def processes_naming(text: str) -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if text in " ".join(proc.info["cmdline"] or ()) and proc.pid != os.getpid():
            found.append(proc.pid)
    return found


# ---------------------------------------------------------------- bad input, no Ray started


def test_unknown_config_key_names_it(capsys):
    assert main(["up", "bogus_key=1"]) == 2
    assert "bogus_key" in capsys.readouterr().err


def test_binding_beyond_loopback_warns():
    from cluster.config import load_local_config
    from cluster.local import exposure_warnings

    assert exposure_warnings(load_local_config(ROOT / "configs/cluster/local.yaml")) == []
    notes = exposure_warnings(load_local_config(None, ["host=10.0.0.5", "dashboard_host=0.0.0.0",
                                                       "auth=disabled"]))
    assert len(notes) == 2 and "10.0.0.5" in notes[0] and "OFF" in notes[0] and "0.0.0.0" in notes[1]


def test_submit_without_command(capsys):
    assert main(["submit", "--address", "http://127.0.0.1:1", "--"]) == 2
    assert "nothing to submit" in capsys.readouterr().err
    assert main(["submit"]) == 2


def test_unreachable_addresses_fail_fast(capsys, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    assert main(["submit", "--address", f"http://127.0.0.1:{port}", "--", "shards", "info", "x"]) == 2
    assert main(["jobs", "--address", f"http://127.0.0.1:{port}"]) == 2
    assert main(["up", "--join", "mskfm-no-such-host.invalid:6379", f"state_dir={tmp_path}"]) == 2
    assert main(["up", "--join", "127.0.0.1:6379", f"state_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - t0 < 30
    assert f"cannot reach 127.0.0.1:{port}" in err and "mskfm-no-such-host.invalid" in err
    assert "loopback" in err
    assert not list(tmp_path.rglob("*.json"))  # nothing recorded, nothing started


def _launcher_yaml(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load((ROOT / "configs/cluster/aws.yaml").read_text())
    edit(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(head_node_type="gpu_head"), "head_node_type 'gpu_head' is not a node type"),
    (lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"), "lacks node_config"),
    (lambda c: c.pop("cluster_name"), "missing key(s) cluster_name"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(gpus=4), "gpus"),
    (lambda c: c.update(setup_commands=["pip install -e ."]), "constraints.txt"),
    (lambda c: c["provider"].update(aws_secret_access_key="abc"), "provider.aws_secret_access_key"),
    (lambda c: c["setup_commands"].append("export WANDB_API_KEY=abc123"), "WANDB_API_KEY"),
], ids=["unknown-head-type", "missing-node-config", "missing-name", "unknown-field", "unpinned",
        "secret-key", "secret-in-command"])
def test_bad_launcher_config_is_refused_before_ray_up(tmp_path, capsys, edit, message):
    path = _launcher_yaml(tmp_path, edit)
    assert main(["up", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not processes_naming(str(path))  # `ray up` never ran


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_cloud_configs_pass_rays_launcher_schema(name):
    from cluster.launcher import validate_launcher_config

    raw = validate_launcher_config(ROOT / f"configs/cluster/{name}.yaml")
    assert raw["head_node_type"] in raw["available_node_types"]


# ---------------------------------------------------------------- a real loopback head


@pytest.mark.integration
def test_up_submit_down_on_loopback(tmp_path, tiny_shards):
    import psutil

    state = tmp_path / "state"
    opts = [f"state_dir={state}", "num_cpus=1"]
    up = cli("up", *opts)
    assert up.returncode == 0, up.stderr
    assert "loopback only" in up.stdout
    nodes = recorded_nodes(state)
    try:
        pids = live_pids(nodes)
        assert len(nodes) == 1 and pids
        exposed = [c.laddr for p in pids if psutil.pid_exists(p)
                   for c in psutil.Process(p).net_connections("inet")
                   if c.status == psutil.CONN_LISTEN and not _loopback(c.laddr.ip)]
        assert not exposed, f"listening beyond loopback: {exposed}"

        ok = cli("submit", *opts, "--", "shards", "info", str(tiny_shards))
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "knee" in ok.stdout and "(exit 0)" in ok.stdout

        bad = cli("submit", *opts, "--", "python", "-c", "import sys; print('bye'); sys.exit(3)")
        assert bad.returncode == 3, bad.stdout + bad.stderr
        assert "bye" in bad.stdout

        status = cli("status", *opts)
        assert status.returncode == 0 and "1 node(s)" in status.stdout and "CPU=1" in status.stdout
        jobs = cli("jobs", *opts)
        assert "2 job(s)" in jobs.stdout and "exit=3" in jobs.stdout

        again = cli("up", *opts)  # a second head under the same name is refused, nothing started
        assert again.returncode == 2 and "already has a running head" in again.stderr
    finally:
        down = cli("down", *opts)
    assert down.returncode == 0, down.stderr
    assert not live_pids(nodes) and not processes_naming(nodes[0].temp_dir)
    assert not Path(nodes[0].temp_dir).exists() and not recorded_nodes(state)


def _loopback(ip: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(ip.removeprefix("::ffff:")).is_loopback


@pytest.mark.integration
def test_failed_up_leaves_no_ray_processes(tmp_path):
    import socket

    state = tmp_path / "state"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = cli("up", f"state_dir={state}", f"port={port}")
    assert taken.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in taken.stderr
    # Ray itself refuses a dashboard port inside its worker-port range, after `ray start` began.
    failed = cli("up", f"state_dir={state}", "dashboard_port=15000", "start_timeout_s=60")
    assert failed.returncode == 2 and "nothing was left running" in failed.stderr
    assert not recorded_nodes(state) and not (state / "local" / "auth_token").exists()
    log = failed.stderr.split("Log ", 1)[1].split(":", 1)[0]  # the failed start's own log file
    temp_dir = str(Path(tempfile.gettempdir()) / Path(log).stem.removeprefix("head-"))
    assert not processes_naming(temp_dir) and not Path(temp_dir).exists()


# ---------------------------------------------------------------- two nodes, one DeepSpeed group


@pytest.mark.integration
@pytest.mark.slow
def test_two_node_deepspeed_pretraining_checkpoints_to_s3(tmp_path, tiny_shards, s3_endpoint):
    """`cluster submit -- pretrain run ...` onto two raylets: one worker per node, one DeepSpeed
    (gloo) group of world size 2 spanning both, checkpoints in an s3:// bucket on loopback."""
    import json

    import boto3

    args = ["--config", str(ROOT / "configs/pretrain/tiny.yaml"), f"data.source={tiny_shards}",
            f"run_root={tmp_path}/runs", "storage_path=s3://mskfm-test/two-node", "name=two-node",
            "launcher=ray", "ray.num_workers=2", "ray.cpus_per_worker=1", "optim.total_steps=2",
            "checkpoint_every=2", "log_every=1"]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/two_node_local.py"), "--", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"rc"')]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(lines[-1])
    assert "(exit 0)" in proc.stdout  # submitted unchanged; the job joined its cluster (RAY_ADDRESS)
    assert len(report["worker_nodes"]) == 2
    assert sorted(report["worker_nodes"]) == sorted(report["nodes"])  # one worker on each node

    start = json.loads((tmp_path / "runs/two-node/sag/metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["world_size"] == 2
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(
        Bucket="mskfm-test", Prefix="two-node/two-node/sag/")["Contents"]]
    assert any("checkpoint_00000002/loop_state.json" in k for k in keys), keys
