"""Session-scoped fixtures: tiny synthetic shards built once, one real local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Ray workers and subprocesses must import this checkout, and DeepSpeed must pick the CPU
# accelerator before it is imported anywhere.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# One intra-op thread per process: tests run Ray workers and DataLoader workers side by side on
# few cores, where torch's default thread pools oversubscribe the CPU by an order of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_SHARDS_CONFIG = ROOT / "configs" / "shards" / "tiny.yaml"
# Modules whose tests start Ray (a local cluster, Ray Train, Ray Tune or `cluster up`): under
# pytest-xdist (`make test` runs two workers) they share one worker, so two Ray clusters never start
# side by side on the same ports and cores.
RAY_MODULES = {"test_bench_label_efficiency", "test_cli", "test_cluster", "test_integrity", "test_pretrain",
               "test_recon_e2e", "test_studies", "test_sweeps", "test_readme"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in RAY_MODULES or "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module's in-process training (modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): on the shared CI cores it is 4-20x
    faster than torch's default pool."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Study shards (knee, ankle, shoulder; 8x32x32 planes) plus recon shards under ``recon/``."""
    from shards.build import BuildConfig, build_shards
    from shards.config import load_config

    out = tmp_path_factory.mktemp("tiny_shards")
    cfg = load_config(BuildConfig, TINY_SHARDS_CONFIG, [f"out={out}"])
    build_shards(cfg)
    return out


@pytest.fixture(scope="session")
def tiny_recon_shards(tiny_shards) -> Path:
    return tiny_shards / "recon"


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole session (loopback, the machine's CPUs)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint (moto's server) on 127.0.0.1 with bucket ``mskfm-test``.

    Sets AWS_ENDPOINT_URL and dummy credentials in the environment, which botocore, s3fs and
    therefore fsspec ``s3://`` URLs (and Ray workers started afterwards) all honour.
    """
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket="mskfm-test")
    yield url
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def study_shards(tmp_path_factory) -> Path:
    """Sweep/study tests: knee + ankle studies, sagittal 8x32x32 only (enough patients per split,
    site and field strength for nested subsets and domain splits)."""
    from shards.build import BuildConfig, build_shards
    from shards.config import load_config

    out = tmp_path_factory.mktemp("study_shards")
    build_shards(load_config(BuildConfig, TINY_SHARDS_CONFIG, [
        f"out={out}", "synth.n_patients=80", "synth.joints=[knee,ankle]", "synth.joint_weights=[0.6,0.4]",
        "synth.planes=[sag]", "synth.kspace.enabled=false",
        "splits.train=0.5", "splits.val=0.2", "splits.test=0.3", "shard_max_count=32"]))
    return out


@pytest.fixture(scope="session")
def tiny_hub(tiny_shards, tmp_path_factory) -> Path:
    """Tiny published backbones (channels 4, 8) for the three knee planes, published with pretrain's API."""
    import torch

    from pretrain.models.diffusion import DiffusionBackbone
    from pretrain.preprocess import spec_from_manifest
    from pretrain.publish import publish_backbone
    from shards.manifest import load_manifest

    hub = tmp_path_factory.mktemp("hub")
    manifest = load_manifest(str(tiny_shards))
    for i, plane in enumerate(("sag", "cor", "ax")):
        torch.manual_seed(1000 + i)  # not the random_backbone baseline's seed
        model = DiffusionBackbone(channels=(4, 8), attention_levels=(False, False), num_res_blocks=1,
                                  num_head_channels=8, norm_num_groups=4, plane=plane,
                                  preprocessing=spec_from_manifest(manifest, plane).to_dict(),
                                  schedule={"num_train_timesteps": 100})
        publish_backbone(model, model.make_scheduler(), str(hub / f"knee-{plane}"), {}, manifest, {"steps": 0})
    return hub
