"""Pretraining as a library: :func:`train` a config, :func:`publish_run` its backbones.

``pretrain run`` and ``pretrain publish`` are thin wrappers around these two; studies and scripts
call them directly. :func:`train` checks everything it can on the driver before any launcher (or
Ray) starts: the paths, the shard manifest, and each unit's objective and model, built once
(on the ``meta`` device, no memory) so a typo in ``model:`` or ``schedule:`` fails naming the key.
"""

from __future__ import annotations

import os
from pathlib import Path

from shards.config import ConfigError, load_config, save_config, to_dict
from shards.resume import check_resume, saved_yaml
from shards.runs import runs_root, write_metrics

from .config import PretrainConfig, run_dir

# keys a resumed run may change: more steps, logging, checkpoint cadence, workers and retries
RESUME_IGNORE = ("optim.total_steps", "log_every", "checkpoint_every", "keep_checkpoints",
                 "data.num_workers", "data.prefetch", "ray.address", "ray.max_failures",
                 "ray.concurrent_planes", "wandb")


def resolve_paths(cfg: PretrainConfig) -> PretrainConfig:
    """Absolute local paths, so Ray workers (other working directories) see the same folders."""
    cfg.run_root = str(Path(cfg.run_root).resolve())
    if "://" not in cfg.data.source:
        cfg.data.source = str(Path(cfg.data.source).resolve())
    if "://" not in cfg.storage_path:
        cfg.storage_path = str(Path(cfg.storage_path).resolve())
    return cfg


def check_manifest(cfg: PretrainConfig) -> dict:
    """The shard manifest of ``data.source``; an unreadable one, or an anatomy (``joint``/``joints``) the
    shards do not hold, is a ConfigError naming the key and the anatomies there are."""
    from shards.manifest import load_manifest

    from .config import mixture

    try:
        manifest = load_manifest(cfg.data.source)
    except Exception as exc:
        raise ConfigError(f"key 'data.source': cannot read shards at {cfg.data.source}: {exc}") from exc
    present = sorted(manifest.get("stats", {}).get("joint", {}))
    if cfg.objective == "diffusion" and manifest.get("kind") == "study" and (
            absent := [j for j in mixture(cfg) if j not in present]):
        key = "joints" if cfg.joints else "joint"
        raise ConfigError(f"key '{key}': anatomy {absent} has no studies in {cfg.data.source}; "
                          f"anatomies there: {', '.join(present) or 'none'}")
    return manifest


def check_models(cfg: PretrainConfig, manifest: dict) -> None:
    """Build every unit's objective and model once on the driver (``meta`` device: shapes only)."""
    import torch

    from .objectives import build_objective

    for unit in cfg.planes:
        objective = build_objective(cfg, unit, manifest)
        with torch.device("meta"):
            objective.build_model()


def is_rank0(cfg: PretrainConfig) -> bool:
    """False on the other ranks of a ``torchrun`` launch (only rank 0 writes the run folder)."""
    return int(os.environ.get("RANK", "0")) == 0 or cfg.launcher != "torchrun"


def train(cfg: PretrainConfig) -> dict:
    """Train every unit (plane) of ``cfg`` with its launcher; writes ``<run_root>/<name>/``
    (``config.yaml``, ``metrics.json``) and returns ``{unit: final metrics}``. Resumes a run of
    the same name from its newest checkpoint."""
    import torch

    from .launchers import launch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    cfg = resolve_paths(cfg)
    check_models(cfg, check_manifest(cfg))
    if is_rank0(cfg):  # under torchrun the other ranks stop with rank 0
        check_resume(saved_yaml(run_dir(cfg) / "config.yaml"), to_dict(cfg), run_dir(cfg), "pretraining run",
                     ignore=RESUME_IGNORE)
        save_config(cfg, run_dir(cfg) / "config.yaml")
    results = launch(cfg)
    if is_rank0(cfg):
        write_metrics(run_dir(cfg), results, default=str, sort_keys=True)
    return results


def load_run_config(run: str | Path, run_root: str | Path | None = None) -> PretrainConfig:
    """The config of a finished run, given its name under ``run_root`` (default
    ``<runs root>/pretrain``) or its folder."""
    run_root = run_root or runs_root() / "pretrain"
    folder = Path(run) if Path(run).is_dir() else Path(run_root) / run
    path = folder / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"no pretraining run at {folder} (config.yaml missing); "
                          f"give a run name under {run_root} or a run folder")
    return load_config(PretrainConfig, path)


def publish_unit(cfg: PretrainConfig, unit: str, hub: str, overwrite: bool = False, folder: str | None = None) -> str:
    """Consolidate ``unit``'s newest checkpoint and publish it at ``<hub>/<folder>`` (default folder:
    the objective's ``publish_name``, e.g. ``knee-sag``)."""
    from .checkpoint import apply_weights, consolidated_state_dict
    from .launchers.local import FileSession
    from .objectives import build_objective

    session = FileSession(cfg, unit, 0, 1)
    with session.latest_checkpoint() as ckpt:
        if ckpt is None:
            raise FileNotFoundError(f"run '{cfg.name}' has no checkpoint for '{unit}' under {session.root}")
        weights, source, state = consolidated_state_dict(ckpt)
    objective = build_objective(cfg, unit, check_manifest(cfg))
    model = apply_weights(objective.build_model(), weights).eval()
    history = state.get("history", [])
    metrics = {"steps": state["step"], "final_loss": history[-1]["loss"] if history else None,
               "weights": source, "run": cfg.name}
    if hasattr(objective, "data_summary"):
        metrics.update(objective.data_summary())
    url = f"{hub.rstrip('/')}/{folder or objective.publish_name}"
    return objective.publish(model, url, to_dict(cfg), metrics, overwrite=overwrite)


def publish_run(run: str | Path | PretrainConfig, hub: str, planes: list[str] | None = None,
                overwrite: bool = False, run_root: str | Path | None = None) -> dict[str, str]:
    """Publish the newest checkpoint of each of ``planes`` (default: all) of a run; ``{unit: url}``.

    ``run`` is a run name (under ``run_root``), a run folder, or the run's config."""
    cfg = run if isinstance(run, PretrainConfig) else load_run_config(run, run_root)
    units = list(planes or cfg.planes)
    unknown = [u for u in units if u not in cfg.planes]
    if unknown:
        raise ConfigError(f"run '{cfg.name}' has no plane(s) {unknown}; it trained {cfg.planes}")
    return {unit: publish_unit(cfg, unit, hub, overwrite) for unit in units}
