"""Backbones a transfer or multi-anatomy grid references: names, paths, and making missing ones."""

from __future__ import annotations

import logging
import posixpath

import fsspec

from ..finetune import resolve_task
from .backbones import pretrain_study_backbone
from .config import StudyConfig

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


def make_missing(entries: list[dict], cfg: StudyConfig) -> list[str]:
    """Pretrain (small, see :mod:`.backbones`) every listed backbone that is not published yet."""
    made = []
    for e in entries:
        fs, path = fsspec.core.url_to_fs(e["path"])
        if fs.exists(posixpath.join(path, "config.json")):
            continue
        pretrain_study_backbone(e["shards"], list(e["joints"]), e["plane"], e["size"], e["path"], cfg.make_backbones)
        made.append(e["path"])
    return made
