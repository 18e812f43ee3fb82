"""Training objectives: what the one loop (:mod:`pretrain.loop`) trains, on which shard fields.

An objective is a small class registered in :data:`OBJECTIVES` (``objective: <name>`` in the run
config). The loop builds it once per training worker and per unit of work (``unit``: a plane name
for the diffusion backbones; objectives that do not train per plane set ``planes: [<any name>]``
and ignore it). The interface, all that the loop and ``pretrain publish`` call:

- ``__init__(cfg, unit, manifest)``: ``cfg`` is the :class:`~pretrain.config.PretrainConfig`,
  ``manifest`` the loaded shard manifest of ``cfg.data.source`` (statistics, for preprocessing).
- ``reader_kwargs() -> dict``: keyword arguments for :class:`shards.reader.ShardReader` besides
  the split/rank/shuffle/resampling ones the loop sets (``fields``, ``joints``, ``require``, and
  ``source`` if it differs from ``cfg.data.source``).
- ``prepare(sample) -> dict``: one decoded sample -> tensors; runs in DataLoader workers, so it
  must be a pure function of the sample (the objective is pickled into the workers).
- ``collate(items) -> dict``: a batch dict of tensors plus ``"keys"`` (sample keys, for errors).
- ``build_model() -> nn.Module``: a plain single-device model (no Ray, no DeepSpeed).
- ``loss(model, batch, generator) -> scalar tensor``: ``model`` is the DeepSpeed engine (call it
  like the module); draw all randomness from ``generator`` so a resumed run is reproducible.
  Floating tensors of ``batch`` arrive on the engine's device and in its compute dtype.
- ``publish(model, out_url, train_config, metrics, overwrite) -> str``: write the trained
  ``model`` (full, EMA weights loaded) to ``out_url``; returns where it went.
- ``publish_name`` (attribute): default folder name under the hub, e.g. ``knee-sag``.
- optional ``mixture`` (attribute, ``{joint: weight}``): with several joints the loop draws from one
  reader per joint with these weights; optional ``data_summary() -> dict``: what the model saw, added
  to the published metrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shards.config import ConfigError, lookup

from .recon.multitask import ReconSegObjective
from .recon.objective import ReconObjective
from .seg.objective import SegObjective


def study_subset(cfg, plane: str, joints: dict[str, float]) -> list[str] | None:
    """``data.max_studies`` train studies of ``joints`` with ``plane``, region-stratified and nested:
    a permutation (seed ``data.subset_seed``) of their sorted keys, reordered so that it opens with
    each joint's first study there (in ``joints`` order); the first N of that order are the subset.
    So every cap of at least one study per joint covers every joint (each sampling stream, each
    region of a segmentation model, keeps a study) and smaller caps are nested in larger ones; with
    one joint this is the plain permutation. None when uncapped."""
    import numpy as np

    from shards.reader import study_index

    n = cfg.data.max_studies
    if not n:
        return None
    index = {k: j for k, j in study_index(cfg.data.source, cfg.data.split, plane).items() if j in joints}
    keys = sorted(index)
    if n > len(keys):
        raise ConfigError(f"key 'data.max_studies': {n} exceeds the {len(keys)} {cfg.data.split}-split {plane} "
                          f"studies of joints {list(joints)} in {cfg.data.source}")
    if n < len(joints):
        raise ConfigError(f"key 'data.max_studies': {n} studies cannot cover the {len(joints)} joints "
                          f"{list(joints)} (one study each at least); raise the cap or drop joints")
    order = [keys[i] for i in np.random.default_rng(cfg.data.subset_seed).permutation(len(keys))]
    if empty := [j for j in joints if j not in index.values()]:
        raise ConfigError(f"key 'joints': {empty} have no {cfg.data.split}-split {plane} study in {cfg.data.source}")
    firsts = [next(k for k in order if index[k] == j) for j in joints]
    return (firsts + [k for k in order if k not in set(firsts)])[:n]


class DiffusionObjective:
    """DDPM noise (or velocity) regression on one plane's volumes with a 3D diffusion U-Net.

    ``cfg.model`` holds the backbone's constructor arguments plus ``backbone`` (a
    :data:`pretrain.models.BACKBONES` name, default ``diffusion3d``); ``cfg.schedule`` the
    :class:`pretrain.schedule.ScheduleConfig` fields; ``cfg.shape`` the network input grid.
    """

    def __init__(self, cfg, unit: str, manifest: dict):
        from pretrain.config import mixture
        from pretrain.preprocess import spec_from_manifest
        from pretrain.schedule import build_scheduler

        self.cfg, self.plane = cfg, unit
        try:
            self.spec = spec_from_manifest(manifest, unit, list(cfg.shape), intensity=cfg.intensity,
                                           spatial=cfg.spatial)
        except ValueError as exc:
            raise ConfigError(f"plane '{unit}' of {cfg.data.source}: {exc}") from exc
        try:
            self.scheduler = build_scheduler(dict(cfg.schedule))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"key 'schedule': {exc}") from exc
        self.mixture = mixture(cfg)
        self.keys = study_subset(cfg, unit, self.mixture)
        self.publish_name = f"{'+'.join(self.mixture)}-{unit}"
        self._manifest = manifest

    def reader_kwargs(self) -> dict:
        return {"fields": (self.plane,), "joints": list(self.mixture), "keys": self.keys}

    def data_summary(self) -> dict:
        """What the backbone saw, for its published metrics and model card."""
        return {"joints": list(self.mixture), **({"n_studies": len(self.keys)} if self.keys is not None else {})}

    def prepare(self, sample: dict) -> dict:
        from pretrain.preprocess import preprocess_volume

        try:
            x = preprocess_volume(sample[self.plane], self.spec)
        except ValueError as exc:
            raise ValueError(f"sample '{sample['__key__']}' plane '{self.plane}': {exc}") from exc
        return {"x": x, "key": sample["__key__"]}

    def collate(self, items: list[dict]) -> dict:
        return {"x": torch.stack([it["x"] for it in items]), "keys": [it["key"] for it in items]}

    def build_model(self) -> torch.nn.Module:
        from pretrain.models import BACKBONES

        kwargs = dict(self.cfg.model)
        cls = lookup(BACKBONES, kwargs.pop("backbone", "diffusion3d"), "backbone")
        try:
            return cls(**kwargs, plane=self.plane, preprocessing=self.spec.to_dict(),
                       schedule=dict(self.cfg.schedule))
        except TypeError as exc:
            raise ConfigError(f"key 'model': {exc}") from exc

    def loss(self, model, batch: dict, generator: torch.Generator) -> torch.Tensor:
        from pretrain.schedule import sample_timesteps, training_target

        x0 = batch["x"]
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        t = sample_timesteps(self.scheduler, x0.shape[0], generator, x0.device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        pred = model(noisy, t)
        return F.mse_loss(pred.float(), training_target(self.scheduler, x0, noise, t).float())

    def publish(self, model, out_url: str, train_config: dict, metrics: dict,
                overwrite: bool = False) -> str:
        from pretrain.publish import publish_backbone

        return publish_backbone(model, self.scheduler, out_url, train_config, self._manifest,
                                metrics, overwrite=overwrite)


OBJECTIVES = {"diffusion": DiffusionObjective, "recon": ReconObjective, "recon_seg": ReconSegObjective,
              "seg3d": SegObjective}


def build_objective(cfg, unit: str, manifest: dict):
    """The objective named by ``cfg.objective`` for ``unit`` (a plane)."""
    return lookup(OBJECTIVES, cfg.objective, "objective")(cfg, unit, manifest)
