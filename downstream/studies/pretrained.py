"""Backbones a transfer or multi-anatomy grid references: names, paths, and making missing ones with
the pretraining engine (``pretrain.run.train``, then ``publish_unit`` to ``<hub>/<name>-<plane>``)."""

from __future__ import annotations

import logging
import posixpath
from pathlib import Path

import fsspec

from shards.config import load_config
from shards.manifest import load_manifest

from ..finetune import resolve_task
from .config import StudyBackboneSpec, StudyConfig

log = logging.getLogger(__name__)


def backbone_name(source: str, size: int) -> str:
    return source if size == 0 else f"{source}-n{size}"


def backbone_path(cfg: StudyConfig, name: str, plane: str) -> str:
    return f"{cfg.hub.rstrip('/')}/{name}-{plane}"


def backbone_overrides(cfg: StudyConfig, name: str, planes: list[str]) -> list[str]:
    return [f"backbones.{p}={backbone_path(cfg, name, p)}" for p in planes]


def needed(cfg: StudyConfig, tasks: list[str], sizes: list[int]) -> list[dict]:
    """One entry per (source, size, plane) the grid uses, with the shards to pretrain on."""
    resolved = [resolve_task(t, cfg.overrides) for t in tasks]
    planes = sorted({p for t in resolved for p in t.planes})
    return [{"name": backbone_name(src, size), "joints": joints, "size": size, "plane": p,
             "path": backbone_path(cfg, backbone_name(src, size), p), "shards": resolved[0].shards}
            for src, joints in cfg.sources.items() for size in sizes for p in planes]


def backbone_config(shards: str, joints: list[str], plane: str, size: int, name: str, spec: StudyBackboneSpec,
                    run_root: str | Path):
    """The pretraining config of one study backbone (``size`` 0 = every train study of ``joints``)."""
    from pretrain.config import PretrainConfig

    channels = list(spec.channels)
    shape = list(spec.shape) or load_manifest(shards)["stats"]["planes"][plane]["common_shape"]
    base = {"name": name, "objective": "diffusion", "joint": joints[0], "joints": {j: 1.0 for j in joints},
            "planes": [plane], "shape": shape,
            "model": {"backbone": "diffusion3d", "channels": channels, "attention_levels": [False] * len(channels),
                      "num_res_blocks": 1, "num_head_channels": channels[-1], "norm_num_groups": min(4, channels[0])},
            "schedule": {"num_train_timesteps": spec.num_train_timesteps},
            "optim": {"lr": spec.lr, "total_steps": spec.steps, "warmup_steps": 0},
            "data": {"source": shards, "num_workers": 0, "max_studies": size, "subset_seed": spec.seed},
            "batch_size": spec.batch_size, "checkpoint_every": spec.steps, "log_every": max(1, spec.steps // 10),
            "launcher": spec.launcher, "run_root": str(run_root), "storage_path": str(run_root), "seed": spec.seed}
    return load_config(PretrainConfig, None, spec.overrides, base=base)


def train_backbone(shards: str, joints: list[str], plane: str, size: int, path: str, spec: StudyBackboneSpec,
                   run_root: str | Path) -> str:
    """Pretrain one study backbone with the engine and publish it at ``path`` (``<hub>/<folder>``)."""
    from pretrain.run import publish_unit, train

    hub, folder = posixpath.split(path.rstrip("/"))
    cfg = backbone_config(shards, joints, plane, size, folder, spec, run_root)
    train(cfg)
    return publish_unit(cfg, plane, hub, overwrite=True, folder=folder)


def make_missing(entries: list[dict], cfg: StudyConfig, run_root: str | Path) -> list[str]:
    """Pretrain every listed backbone that is not published yet (runs under ``run_root``)."""
    made = []
    for e in entries:
        fs, path = fsspec.core.url_to_fs(e["path"])
        if fs.exists(posixpath.join(path, "config.json")):
            continue
        train_backbone(e["shards"], list(e["joints"]), e["plane"], e["size"], e["path"], cfg.make_backbones, run_root)
        log.info("published %s (%s, %s, %s studies)", e["path"], "+".join(e["joints"]), e["plane"], e["size"] or "all")
        made.append(e["path"])
    return made
