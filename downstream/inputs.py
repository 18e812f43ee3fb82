"""Per-plane inputs of a task: the published backbone, preprocessed volumes and cached features.

Volumes are preprocessed with the spec stored in the backbone's config (exactly what it was trained
on) and cached; features are cached per (backbone, preprocessing, feature spec, manifest, joint,
plane). The ``random_backbone`` baseline gets the features of a seeded random initialisation of the
same architecture, cached the same way.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from pretrain.preprocess import spec_from_manifest
from pretrain.publish import load_backbone
from shards.config import ConfigError

from .features import (FeatureCache, backbone_identity, cached_features, cached_volumes, digest, manifest_identity,
                       stored_parts, volume_parts)
from .tasks import TaskConfig

log = logging.getLogger(__name__)


@dataclass
class PlaneData:
    plane: str
    backbone_url: str
    model: torch.nn.Module
    spec: dict
    volumes: np.ndarray                       # (N, 1, S, R, C) preprocessed, memory-mapped
    features: dict[str, np.ndarray]           # {"t50/mid": (N, C, d, h, w)}
    seg: np.ndarray | None = None             # (N, 1, S, R, C) label map on the preprocessed grid
    random_features: dict[str, np.ndarray] | None = None
    cache: dict = field(default_factory=dict)

    def channels(self, random: bool = False) -> list[int]:
        feats = self.random_features if random else self.features
        return [int(a.shape[1]) for a in feats.values()]


def random_copy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The same architecture and config, freshly initialised with ``seed``."""
    torch.manual_seed(seed)
    return type(model).from_config(model.config).eval()


def check_feature_spec(model, url: str, feat) -> None:
    """Blocks and timesteps must exist in this backbone (before any compute)."""
    valid = model.block_names()
    unknown = [b for b in feat.blocks if b not in valid]
    if unknown:
        raise ConfigError(f"features.blocks {unknown} do not exist in backbone {url}; valid: {', '.join(valid)}")
    if not hasattr(model, "make_scheduler"):  # a reconstruction backbone: no noise schedule, no timesteps
        return
    n = model.make_scheduler().config.num_train_timesteps
    bad = [t for t in feat.timesteps if not 0 <= int(t) < n]
    if bad:
        raise ConfigError(f"features.timesteps {bad} are outside [0, {n}) of backbone {url}'s noise schedule")


def load_backbones(task: TaskConfig) -> dict[str, tuple]:
    out = {}
    for plane in task.planes:
        model, _, pre = load_backbone(task.backbones[plane])
        check_feature_spec(model, task.backbones[plane], task.features.for_plane(plane))
        out[plane] = (model, pre)
    return out


def prepare_planes(task: TaskConfig, keys: list[str], manifest: dict, cache: FeatureCache,
                   pool=None) -> dict[str, PlaneData]:
    """Each plane's backbone, volumes and features; missing cache entries are computed in this process,
    or with ``features.workers`` > 0 on Ray workers (``pool``, a :class:`downstream.extract.RayExtraction`
    of ``cache``, or one made here)."""
    from .extract import RayExtraction

    manifest_id = manifest_identity(manifest)
    need_random = "random_backbone" in task.baselines.names
    backbones = load_backbones(task)
    out = {}
    with pool or RayExtraction(cache, task.features) as pool:
        workers = pool if task.features.workers else None
        for plane in task.planes:
            url = task.backbones[plane]
            model, pre = backbones[plane]
            spec = (pre.to_dict() if pre is not None else spec_from_manifest(manifest, plane).to_dict())
            hits = cache.hits
            feat = task.features.for_plane(plane)
            vargs = (task.shards, manifest_id, task.joint, plane, spec, keys, task.kind == "segmentation",
                     feat.volume_dtype)
            vols = cached_volumes(cache, *vargs, workers=workers)
            source = {"url": url, "random_seed": None, "volumes": volumes_url(cache, vargs)}
            feats = cached_features(cache, model, backbone_identity(model), vols["image"], spec, feat,
                                    manifest_id, task.joint, plane, keys, task.device, workers, source)
            data = PlaneData(plane, url, model, spec, vols["image"], feats, vols.get("seg"))
            if need_random:
                rnd = random_copy(model, task.train.seed)
                data.random_features = cached_features(
                    cache, rnd, backbone_identity(rnd), vols["image"], spec, feat, manifest_id, task.joint, plane,
                    keys, task.device, workers, source | {"random_seed": task.train.seed})
            data.cache = {"lookups": 2 + need_random, "hits": cache.hits - hits}
            log.info("plane %s: backbone %s, features %s (cache hits %d/%d)", plane, url,
                     {k: tuple(v.shape[1:]) for k, v in feats.items()}, data.cache["hits"], data.cache["lookups"])
            out[plane] = data
    return out


def volumes_url(cache: FeatureCache, vargs: tuple) -> str:
    """URL of the ``image`` array of the volumes entry ``cached_volumes(cache, *vargs)`` made."""
    shards, manifest_id, joint, plane, spec, keys, with_seg, dtype = vargs
    parts = stored_parts(volume_parts(manifest_id, joint, plane, spec, with_seg), dtype)
    local = cache.path(parts | {"studies": digest(list(keys))})
    names = json.loads((local / "names.json").read_text())
    return f"{cache.entry_url(parts, keys)}/{names.index('image')}.npy"
