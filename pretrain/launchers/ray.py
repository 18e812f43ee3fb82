"""``launcher=ray``: each plane is a Ray Train ``TorchTrainer`` run whose workers run the one loop.

The embedded default starts a local Ray in-process with the machine's CPUs; ``ray.address``
joins a running cluster. Checkpoints are reported with ``ray.train.report(checkpoint=...)`` into
``<storage_path>/<name>/<plane>/`` (Ray Train run ``name=<plane>``); re-running with the same
``name`` resumes from the newest one (Ray Train v2 restores a run from its storage folder). When a
worker dies, the run is started again from that checkpoint, up to ``ray.max_failures`` times; a
failure that would recur on every retry (a non-finite loss, a corrupt checkpoint or shard, a
configuration error) stops the run at once and is raised as it is, as under the local launcher.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from shards.config import ConfigError

from ..config import PretrainConfig, storage_root

REPO_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger(__name__)


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


def join(address: str, runtime_env: dict, log_to_driver: bool = True) -> None:
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
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
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


def connect_ray(address: str | None = None, log_to_driver: bool = True):
    """The one way mskfm reaches Ray (pretraining, sweeps, studies, predict): the Ray already
    initialised in this process; else the cluster at ``address`` (a ``ray.address`` config key) or
    ``$RAY_ADDRESS`` (joined with :func:`join`, failing within seconds); else a private local Ray on
    loopback with this machine's CPUs. Workers import this checkout."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return sys.modules["ray"]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    # Inside a Ray job (`cluster submit`, a KubeRay RayJob) RAY_ADDRESS names the job's cluster:
    # the same command then runs on that cluster instead of starting a private local Ray.
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        join(address, {"env_vars": env}, log_to_driver)
        return sys.modules["ray"]
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             runtime_env={"env_vars": env}, log_to_driver=log_to_driver)
    return ray


def _trainer(cfg: PretrainConfig, unit: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from shards.config import to_dict

    return TorchTrainer(
        train_worker,
        train_loop_config={"cfg": to_dict(cfg), "unit": unit, "use_gpu": cfg.ray.use_gpu},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(name=unit, storage_path=storage_root(cfg),
                             failure_config=FailureConfig(max_failures=0),  # retried in fit_unit
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )


def deterministic_failure(error: BaseException) -> BaseException | None:
    """The worker error inside a Ray Train failure that a retry would meet again, if there is one."""
    from shards.config import ConfigError
    from shards.reader import ShardError

    from ..checkpoint import CheckpointError
    from ..loop import NonFiniteLossError

    kinds = (NonFiniteLossError, CheckpointError, ShardError, ConfigError)
    todo, seen = [error], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kinds):
            return e
        # WorkerGroupError.worker_failures -> Ray's wrapper of the user exception (_base_exc) or a
        # RayTaskError (cause)
        todo += [*getattr(e, "worker_failures", {}).values(), getattr(e, "_base_exc", None),
                 getattr(e, "cause", None), e.__cause__]
    return None


def fit_unit(cfg: PretrainConfig, unit: str):
    from ray.train import TrainingFailedError

    retries = itertools.count() if cfg.ray.max_failures < 0 else range(cfg.ray.max_failures + 1)
    for attempt in retries:
        try:
            result = _trainer(cfg, unit).fit()
            break
        except TrainingFailedError as exc:
            fatal = deterministic_failure(exc)
            if fatal is not None:
                raise fatal from None
            if attempt == cfg.ray.max_failures:
                raise
            log.warning("%s: training failed (%s); starting again from the last checkpoint (retry %d)",
                        unit, str(exc).splitlines()[0], attempt + 1)
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
