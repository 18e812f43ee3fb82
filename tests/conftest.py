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
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_SHARDS_CONFIG = ROOT / "configs" / "shards" / "tiny.yaml"


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


S3_TEST_BUCKET = "mskfm-test"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto server) on 127.0.0.1 for the session, with bucket ``mskfm-test``.

    Yields the endpoint URL and sets ``AWS_ENDPOINT_URL`` plus dummy credentials in the environment,
    which botocore (hence s3fs/fsspec ``s3://`` URLs, boto3, and subprocesses) honour.
    """
    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(S3_TEST_BUCKET)
    yield url
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
