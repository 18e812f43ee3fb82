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


def test_job_package_leaves_data_and_outputs_behind(tmp_path):
    """What `cluster submit` uploads: code and configs, never data/, runs/, cache/, hub/, .venv/."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    from cluster.jobs import EXCLUDES

    tree = tmp_path / "checkout"
    for name in ["pkg/mod.py", "pkg/data/keep.py", "configs/a.yaml", "data/shards/x.tar", "runs/r/m.json",
                 "cache/f.npy", "hub/knee-sag/w.safetensors", ".venv/bin/python", "wandb/run.log"]:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("x")
    zipped = tmp_path / "pkg.zip"
    create_package(str(tree), zipped, include_gitignore=False, excludes=EXCLUDES)
    names = {n for n in zipfile.ZipFile(zipped).namelist() if not n.endswith("/")}
    assert names == {"pkg/mod.py", "pkg/data/keep.py", "configs/a.yaml"}

    zipped = tmp_path / "checkout.zip"  # create_package leaves an existing file alone
    create_package(str(ROOT), zipped, include_gitignore=True, excludes=EXCLUDES)
    size = zipped.stat().st_size
    assert size < 2 * 2**20, f"job package of this checkout is {size / 2**20:.1f} MiB"
    roots = {n.split("/", 1)[0] for n in zipfile.ZipFile(zipped).namelist()}
    assert not roots & {"data", "runs", "cache", "hub", ".venv", ".git", "docs"} and "configs" in roots


def test_multi_node_path_check_names_the_key(tmp_path):
    from cluster.config import ClusterError
    from cluster.jobs import placed_command

    shared = tmp_path / "nfs"
    work = shared / "me"
    (work / "configs").mkdir(parents=True)
    config = work / "configs" / "p.yaml"
    config.write_text("name: p\ndata: {source: data/shards/demo}\nstorage_path: /home/me/ckpt\n")
    run = ["pretrain", "run", "--config", "configs/p.yaml"]

    def refused(command, cwd=work, shared_dirs=(str(shared),)) -> str:
        with pytest.raises(ClusterError) as err:
            placed_command(command, cwd, ROOT, local=False, shared_dirs=shared_dirs)
        return str(err.value)

    assert "key 'storage_path' (--config p.yaml) = '/home/me/ckpt'" in refused(run)
    assert "s3://" in refused(run) and "shared_dirs" in refused(run)
    ok = [*run, "storage_path=s3://bucket/ckpt"]
    assert "key 'data.source'" in refused([*ok, "data.source=/scratch/shards"])
    assert placed_command(ok, work, ROOT, local=False, shared_dirs=[str(shared)]) \
        == f"cd {work} && python -m pretrain run --config configs/p.yaml storage_path=s3://bucket/ckpt"
    # Outside shared storage even relative paths (and the run folders under runs/) stay behind.
    assert "option --config = 'configs/p.yaml'" in refused(ok, shared_dirs=())
    assert "key 'data.source'" in refused(["pretrain", "run", "data.source=data/shards/demo"], shared_dirs=())
    assert "the submitting folder" in refused(["pretrain", "publish", "p", "--to", "s3://b/hub"], shared_dirs=())
    # A task name: its YAML's paths (shards, backbones) are checked too.
    assert "key 'backbones.sag' (--task knee-dx.yaml)" in refused(["downstream", "finetune", "--task", "knee-dx"], shared_dirs=())
    assert "option --to = '/home/me/hub'" in refused(["pretrain", "publish", "p", "--to", "/home/me/hub"])
    assert "key 'out' = '/home/me/x'" in refused(["downstream", "study", "robustness", "--quick", "out=/home/me/x"])
    # All nodes on this machine: nothing to refuse, the command runs where it was submitted.
    assert placed_command(run, work, ROOT, local=True).startswith(f"cd {work} && python -m pretrain")


def test_nodes_on_this_machine():
    from cluster.paths import local_addresses, on_this_machine

    assert on_this_machine(["127.0.0.1", "127.0.0.1"])
    assert on_this_machine(sorted(local_addresses() - {"localhost"})[:1])
    assert not on_this_machine(["127.0.0.1", "10.254.3.7"], mine={"127.0.0.1", "10.0.0.5"})


def test_joining_a_missing_head_fails_in_seconds(monkeypatch):
    import socket

    from pretrain.launchers.ray import join
    from shards.config import ConfigError

    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=f"key 'ray.address': no Ray head answers at 127.0.0.1:{port}"):
        join(f"127.0.0.1:{port}", {})
    with pytest.raises(ConfigError, match="'auto' would join whichever Ray"):
        join("auto", {})
    assert time.monotonic() - t0 < 10


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


@pytest.fixture(scope="module")
def loopback_head(tmp_path_factory):
    """The module's one loopback head, started and stopped with the real CLI; teardown checks
    that `down` left nothing running."""
    state = tmp_path_factory.mktemp("cluster") / "state"
    opts = [f"state_dir={state}", "num_cpus=1"]
    up = cli("up", *opts)
    assert up.returncode == 0, up.stderr
    nodes = recorded_nodes(state)
    try:
        yield opts, nodes, up.stdout
    finally:
        down = cli("down", *opts)
    assert down.returncode == 0, down.stderr
    assert not live_pids(nodes) and not processes_naming(nodes[0].temp_dir)
    assert not Path(nodes[0].temp_dir).exists() and not recorded_nodes(state)


@pytest.mark.integration
def test_up_submit_down_on_loopback(loopback_head, tiny_shards):
    import psutil

    opts, nodes, up = loopback_head
    assert "loopback only" in up
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
    assert "exit=3" in jobs.stdout, jobs.stdout
    assert f"outputs: relative paths resolve in {ROOT}" in jobs.stdout, jobs.stdout

    again = cli("up", *opts)  # a second head under the same name is refused, nothing started
    assert again.returncode == 2 and "already has a running head" in again.stderr


@pytest.mark.integration
def test_submitted_commands_run_in_the_submitting_folder(loopback_head, tiny_shards, tmp_path):
    """The README's flow from another folder: a relative config with relative data, submitted;
    the run published locally; a finetune submitted; every result under this folder."""
    opts, _, _ = loopback_head
    work = tmp_path / "work"
    (work / "configs/pretrain").mkdir(parents=True)
    (work / "configs/pretrain/tiny.yaml").write_text((ROOT / "configs/pretrain/tiny.yaml").read_text())
    source = yaml.safe_load((ROOT / "configs/pretrain/tiny.yaml").read_text())["data"]["source"]
    assert not Path(source).is_absolute()
    (work / source).parent.mkdir(parents=True)
    (work / source).symlink_to(tiny_shards, target_is_directory=True)

    def submit(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cluster", "submit", *opts,  # code: this checkout
                               "--", *command], cwd=work, capture_output=True, text=True, timeout=400)

    run = submit("pretrain", "run", "--config", "configs/pretrain/tiny.yaml", "optim.total_steps=2",
                 "checkpoint_every=2", "ray.num_workers=1", "ray.cpus_per_worker=0.5")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"outputs: relative paths resolve in {work}; run folders under {work}/runs/" in run.stdout
    resolved = yaml.safe_load((work / "runs/pretrain/tiny/config.yaml").read_text())
    assert resolved["run_root"] == str(work / "runs/pretrain")
    assert (work / "runs/pretrain/tiny/sag/checkpoint_00000002").is_dir()

    publish = subprocess.run([sys.executable, "-m", "pretrain", "publish", "tiny", "--to", "hub"], cwd=work,
                             capture_output=True, text=True, timeout=300)
    assert publish.returncode == 0, publish.stderr[-2000:]
    assert (work / "hub/knee-sag/config.json").is_file()

    tune = submit("downstream", "finetune", "--task", "knee-dx", "planes=[sag]", f"shards={source}",
                  "baselines.names=[]", "train.epochs=2", "metrics.bootstrap=10", "name=submitted")
    assert tune.returncode == 0, tune.stdout[-3000:] + tune.stderr[-3000:]
    runs = list((work / "runs/finetune").glob("submitted*/metrics.json"))
    assert len(runs) == 1, sorted(p.name for p in work.rglob("*"))[:50]
    assert (work / "cache").is_dir() and not list((ROOT / "runs/finetune").glob("submitted*"))

    # A command on this machine joins the head by the address `cluster up` printed (no hang).
    head = recorded_nodes(Path(opts[0].split("=", 1)[1]))[0]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": head.auth_token_path}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    joined = subprocess.run([sys.executable, "-c", "from pretrain.launchers.ray import join; "
                             f"join('{head.address}', {{}}); import ray; print('CPUs', ray.cluster_resources()['CPU'])"],
                            cwd=work, env=env, capture_output=True, text=True, timeout=90)
    assert joined.returncode == 0 and "CPUs 1.0" in joined.stdout, joined.stderr[-2000:]


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
