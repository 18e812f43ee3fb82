"""``launcher=ray``: each plane is a Ray Train ``TorchTrainer`` run whose workers run the one loop.

The embedded default starts a local Ray in-process with the machine's CPUs; ``ray.address``
joins a running cluster. Checkpoints are reported with ``ray.train.report(checkpoint=...)`` into
``<storage_path>/<name>/<plane>/`` (Ray Train run ``name=<plane>``); re-running with the same
``name`` resumes from the newest one (Ray Train v2 restores a run from its storage folder), and
``FailureConfig(max_failures)`` restarts the worker group from it when a worker dies.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

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


def connect_ray(address: str | None = None, log_to_driver: bool = True):
    """The one way mskfm reaches Ray (pretraining, sweeps, studies): the Ray already initialised in
    this process; else the cluster at ``address`` (a ``ray.address`` config key) or ``$RAY_ADDRESS``;
    else a private local Ray on loopback with this machine's CPUs. Workers import this checkout."""
    import ray

    if ray.is_initialized():
        return ray
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    # Inside a Ray job (`cluster submit`, a KubeRay RayJob) RAY_ADDRESS names the job's cluster:
    # the same command then runs on that cluster instead of starting a private local Ray.
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=log_to_driver)
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 runtime_env={"env_vars": env}, log_to_driver=log_to_driver)
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
    connect_ray(cfg.ray.address)
    if cfg.ray.concurrent_planes and len(cfg.planes) > 1:
        with ThreadPoolExecutor(len(cfg.planes)) as pool:
            futures = {unit: pool.submit(fit_unit, cfg, unit) for unit in cfg.planes}
            return {unit: f.result() for unit, f in futures.items()}
    return {unit: fit_unit(cfg, unit) for unit in cfg.planes}
