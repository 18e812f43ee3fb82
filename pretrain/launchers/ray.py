"""``launcher=ray``: each plane is a Ray Train ``TorchTrainer`` run whose workers run the one loop.

The embedded default starts a local Ray in-process with the machine's CPUs; ``ray.address``
joins a running cluster. Checkpoints are reported with ``ray.train.report(checkpoint=...)`` into
``<storage_path>/<name>/<plane>/`` (Ray Train run ``name=<plane>``); re-running with the same
``name`` resumes from the newest one (Ray Train v2 restores a run from its storage folder), and
``FailureConfig(max_failures)`` restarts the worker group from it when a worker dies.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from shards.config import ConfigError

from ..config import PretrainConfig, storage_root

REPO_ROOT = Path(__file__).resolve().parents[2]


class RaySession:
    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

    @contextmanager
    def latest_checkpoint(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield folder

    def report(self, metrics: dict, staging: Path, step: int) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(staging)),
                         checkpoint_dir_name=f"checkpoint_{step:08d}")


def train_worker(config: dict) -> None:
    """Ray Train worker entry: rebuild the config, then run the one loop."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not config["use_gpu"] else "cuda")
    from shards.config import load_config

    from ..loop import train_unit

    cfg = load_config(PretrainConfig, None, base=config["cfg"])
    train_unit(cfg, config["unit"], RaySession())


def join(address: str, runtime_env: dict) -> None:
    """``ray.init`` on a running cluster, failing within seconds (Ray retries for minutes).

    A loopback head (``cluster up``'s default) listens on 127.0.0.1 only, but Ray redirects a
    driver to the machine's interface address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set
    before Ray is imported: set here for a loopback address.
    """
    import socket

    host, _, port = _bootstrap_address(address).rpartition(":")
    if host in ("127.0.0.1", "localhost", "::1"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    hint = ("start one with `cluster up` (it prints the address), or run the command on the cluster with "
            "`cluster submit -- <command>`")
    if host and port.isdigit():
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as exc:
            raise ConfigError(f"key 'ray.address': no Ray head answers at {host}:{port} ({exc}); {hint}") from None
    import ray

    try:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    except ConnectionError as exc:
        raise ConfigError(
            f"key 'ray.address': cannot join the Ray cluster at {address} ({exc}). A head started by "
            "`cluster up` needs its token: export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<the auth "
            f"file `cluster up` printed>; or {hint}") from None


def _bootstrap_address(address: str) -> str:
    """``host:port`` of ``address``; ``auto`` only where ``RAY_ADDRESS`` names the cluster (a job)."""
    if address != "auto":
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    raise ConfigError("key 'ray.address': 'auto' would join whichever Ray runs on this machine (other users' "
                      "and test clusters included); pass the address `cluster up` printed (host:port)")


def ensure_ray(cfg: PretrainConfig):
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return sys.modules["ray"]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    # Inside a Ray job (`cluster submit`, a KubeRay RayJob) RAY_ADDRESS names the job's cluster:
    # the same command then trains on that cluster instead of starting a private local Ray.
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        join(address, {"env_vars": env})
        return sys.modules["ray"]
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             runtime_env={"env_vars": env}, log_to_driver=True)
    return ray


def fit_unit(cfg: PretrainConfig, unit: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from shards.config import to_dict

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": to_dict(cfg), "unit": unit, "use_gpu": cfg.ray.use_gpu},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(name=unit, storage_path=storage_root(cfg),
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )
    result = trainer.fit()
    return {"steps": result.metrics.get("step"), "final_loss": result.metrics.get("loss"),
            "checkpoint": result.checkpoint.path if result.checkpoint else None}


def run_ray(cfg: PretrainConfig) -> dict:
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # rank-0 log lines once, not twice
    ensure_ray(cfg)
    if cfg.ray.concurrent_planes and len(cfg.planes) > 1:
        with ThreadPoolExecutor(len(cfg.planes)) as pool:
            futures = {unit: pool.submit(fit_unit, cfg, unit) for unit in cfg.planes}
            return {unit: f.result() for unit, f in futures.items()}
    return {unit: fit_unit(cfg, unit) for unit in cfg.planes}
