"""platform/ and configs/cluster/ reference only commands and versions that exist: every pin
matches constraints.txt, every entrypoint is a console script of pyproject.toml with a real
subcommand and real config files, every image is the one platform/Dockerfile builds."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
IMAGE = f"mskfm:{PYPROJECT['project']['version']}"
PIN = re.compile(r"\b([A-Za-z][A-Za-z0-9_.\-]*)==([0-9][A-Za-z0-9.+\-]*)")


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def check_pins(text: str, where: str) -> None:
    pins = constraints()
    for name, version in PIN.findall(text):
        assert pins.get(name.lower()) == version, f"{where}: {name}=={version}, constraints: {pins.get(name.lower())}"


def yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_platform_holds_no_python():
    assert not [p for p in (ROOT / "platform").rglob("*.py")]


def test_dockerfile_installs_the_pinned_set():
    text = (ROOT / "platform/Dockerfile").read_text()
    check_pins(text, "Dockerfile")
    assert "PIP_CONSTRAINT=/home/ray/mskfm/constraints.txt" in text
    assert f"torch=={constraints()['torch']}" in text and f"-t {IMAGE}" in text


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_launcher_yaml_commands_exist_and_pins_match(name):
    raw = yaml.safe_load((ROOT / f"configs/cluster/{name}.yaml").read_text())
    commands = [c for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
                for c in raw[key]]
    check_pins("\n".join(commands), f"{name}.yaml")
    assert any("-c constraints.txt -e ." in c for c in commands)
    for c in raw["head_start_ray_commands"]:
        assert "0.0.0.0" not in c  # the dashboard stays on the head's loopback
    assert "ray" in constraints()


def test_kuberay_cluster_matches_image_and_ray_version():
    cluster, policy = yaml_docs(ROOT / "platform/kuberay/raycluster.yaml")
    assert cluster["kind"] == "RayCluster" and policy["kind"] == "NetworkPolicy"
    assert cluster["spec"]["rayVersion"] == constraints()["ray"]
    assert cluster["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            assert container["image"] == IMAGE
            assert "env" not in container  # secrets only through the mskfm-secrets Secret


def _entrypoint_check(entrypoint: str) -> list[str]:
    argv = shlex.split(entrypoint)
    assert argv[0] in SCRIPTS, f"{argv[0]} is not a console script of pyproject.toml"
    help_ = subprocess.run([sys.executable, "-m", argv[0], argv[1], "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0, help_.stderr
    for flag in ("--config", "--space"):
        if flag in argv:
            assert (ROOT / argv[argv.index(flag) + 1]).is_file()
    return argv


def test_rayjob_pretrain_entrypoint_is_a_valid_pretrain_run():
    from pretrain.config import PretrainConfig
    from shards.config import load_config

    (job,) = yaml_docs(ROOT / "platform/kuberay/rayjob-pretrain.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["clusterSelector"]["ray.io/cluster"] == "mskfm"
    argv = _entrypoint_check(job["spec"]["entrypoint"])
    assert argv[:2] == ["pretrain", "run"]
    cfg = load_config(PretrainConfig, ROOT / argv[argv.index("--config") + 1],
                      [a for a in argv if "=" in a])  # every override names a real key
    assert cfg.launcher == "ray" and cfg.ray.use_gpu and cfg.storage_path.startswith("s3://")


def test_rayjob_sweep_entrypoint_is_a_valid_downstream_sweep():
    (job,) = yaml_docs(ROOT / "platform/kuberay/rayjob-sweep.yaml")
    if "downstream" not in SCRIPTS:
        pytest.skip("the downstream CLI is not in this checkout's pyproject.toml yet")
    argv = _entrypoint_check(job["spec"]["entrypoint"])
    assert argv[:2] == ["downstream", "sweep"]
    assert (ROOT / "configs/tasks" / f"{argv[argv.index('--task') + 1]}.yaml").is_file()


def test_compose_stack_binds_loopback_and_uses_the_image():
    (stack,) = yaml_docs(ROOT / "platform/compose.yaml")
    for name, service in stack["services"].items():
        assert service["image"] == IMAGE, name
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert stack["services"]["s3"]["command"][0] == "moto_server" and "moto" in constraints()
    env = stack["x-mskfm-env"]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY", "HF_TOKEN"):
        assert env[key].startswith("${"), f"{key} must come from the environment"
