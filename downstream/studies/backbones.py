"""Small study backbones: a short plain-torch DDPM pretraining on chosen joints and data sizes.

Transfer and multi-anatomy studies compare backbones pretrained on one joint, on all joints, and
on nested subsets of the pretraining data. ``pretrain run`` (DeepSpeed on Ray Train) is the
engine for real backbones but takes one joint per run; this module trains the small backbones a
``--quick`` grid or a test needs in seconds, with the backbone's own training forward and
``pretrain.schedule.training_target``, and publishes them with ``pretrain.publish``. Each model
card records the joints, the number of studies and the steps, so a report can say what a
backbone saw.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
import torch
from tqdm import tqdm

from pretrain.models.diffusion import DiffusionBackbone
from pretrain.preprocess import preprocess_volume, spec_from_manifest
from pretrain.publish import publish_backbone
from pretrain.schedule import sample_timesteps, training_target
from shards.config import ConfigError
from shards.manifest import load_manifest
from shards.reader import ShardReader

log = logging.getLogger(__name__)


@dataclass
class StudyBackboneSpec:
    """How the study's small backbones are trained when ``--make-backbones`` is given."""

    channels: list[int] = field(default_factory=lambda: [4, 8])
    shape: list[int] = field(default_factory=list)    # [] = the shards' common shape of the plane
    num_train_timesteps: int = 100
    steps: int = 30
    batch_size: int = 4
    lr: float = 2e-3
    seed: int = 0


@lru_cache(maxsize=4)
def _train_split(shards: str, joints: tuple[str, ...], plane: str, spec_json: str) -> tuple[list[str], torch.Tensor]:
    """Sorted keys and preprocessed volumes of the train split (read once per process: a grid's
    backbones of several sizes share it)."""
    reader = ShardReader(shards, split="train", fields=(plane,), require=(plane,), joints=list(joints),
                         rank=0, world_size=1)
    samples = {s["__key__"]: s[plane] for s in reader}
    if not samples:
        raise ConfigError(f"no train-split {plane} studies of joints {list(joints)} in {shards}")
    keys = sorted(samples)
    spec = json.loads(spec_json)
    return keys, torch.stack([preprocess_volume(samples[k], spec) for k in keys])


def pretraining_volumes(shards: str, joints: list[str], plane: str, n_studies: int, seed: int,
                        spec: dict) -> torch.Tensor:
    """Preprocessed train-split volumes of ``joints``; the first ``n_studies`` (0 = all) of a seeded
    permutation of the study keys, so that smaller pretraining sets are contained in larger ones."""
    keys, volumes = _train_split(shards, tuple(joints), plane, json.dumps(spec, sort_keys=True))
    order = np.random.default_rng(seed).permutation(len(keys))
    if n_studies:
        if n_studies > len(keys):
            raise ConfigError(f"pretraining size {n_studies} exceeds the {len(keys)} train-split {plane} "
                              f"studies of joints {joints} in {shards}")
        order = order[:n_studies]
    return volumes[torch.as_tensor(order)]


def pretrain_study_backbone(shards: str, joints: list[str], plane: str, n_studies: int, out: str,
                            spec: StudyBackboneSpec) -> dict:
    """Train a small diffusion backbone for ``spec.steps`` DDPM steps and publish it at ``out``."""
    manifest = load_manifest(shards)
    pre = spec_from_manifest(manifest, plane, shape=tuple(spec.shape) or None).to_dict()
    volumes = pretraining_volumes(shards, joints, plane, n_studies, spec.seed, pre)
    torch.manual_seed(spec.seed)
    channels = tuple(spec.channels)
    model = DiffusionBackbone(channels=channels, attention_levels=(False,) * len(channels), num_res_blocks=1,
                              num_head_channels=channels[-1], norm_num_groups=min(4, channels[0]), plane=plane,
                              preprocessing=pre, schedule={"num_train_timesteps": spec.num_train_timesteps})
    scheduler = model.make_scheduler()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    gen = torch.Generator().manual_seed(spec.seed)
    losses = []
    model.train()
    for _ in tqdm(range(spec.steps), desc=f"pretrain {'+'.join(joints)} {plane} n={len(volumes)}", leave=False):
        idx = torch.randint(0, len(volumes), (min(spec.batch_size, len(volumes)),), generator=gen)
        x0 = volumes[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = sample_timesteps(scheduler, len(idx), gen)
        loss = torch.nn.functional.mse_loss(model(scheduler.add_noise(x0, noise, t), t),
                                            training_target(scheduler, x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    train_config = {"trainer": "downstream.studies.backbones (plain torch DDPM, single process)",
                    "joints": list(joints), "plane": plane, "n_studies": int(len(volumes)), **asdict(spec)}
    metrics = {"steps": spec.steps, "final_loss": float(np.mean(losses[-5:])), "n_studies": int(len(volumes)),
               "joints": list(joints)}
    publish_backbone(model, scheduler, out, train_config, manifest, metrics, overwrite=True)
    log.info("published %s (%s, %s, %d studies, %d steps, loss %.4f)", out, "+".join(joints), plane,
             len(volumes), spec.steps, metrics["final_loss"])
    return metrics
