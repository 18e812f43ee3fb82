"""The ``recon`` training objective: a reconstruction backbone on undersampled multi-coil k-space.

Run config (``configs/pretrain/recon-tiny.yaml``): ``objective: recon``, ``data.source`` = recon
shards (kind ``recon``), ``planes: [recon]`` (one unit of work; the name is only a folder name),
and ``model`` = the backbone's constructor arguments plus

- ``backbone``: ``varnet`` (default) or ``unet-recon``;
- ``recon``: a :class:`~pretrain.recon.transforms.ReconTransformConfig` (masks, grid, virtual_coils,
  prewhiten, normalisation, seed); ``grid`` and ``virtual_coils`` make mixed anatomies batchable.

The loss is fastMRI's ``SSIMLoss`` on the reconstruction centre-cropped to the target, with the data
range set to each target's maximum (as in fastMRI's VarNet training).
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from fastmri.losses import SSIMLoss

from shards.config import ConfigError, lookup
from shards.schema import RECON_FIELDS

from .transforms import ReconTransform, ReconTransformConfig, collate_recon


def crop_to(image: torch.Tensor, shape) -> torch.Tensor:
    rows, cols = image.shape[-2:]
    r0, c0 = (rows - shape[0]) // 2, (cols - shape[1]) // 2
    return image[..., r0:r0 + shape[0], c0:c0 + shape[1]]


def ssim_loss(loss_fn: SSIMLoss, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    recon = crop_to(recon, target.shape[-2:])
    data_range = target.flatten(1).amax(dim=1)
    return loss_fn.to(recon.device)(recon[:, None].float(), target[:, None].float(), data_range.float())


def transform_config(recon: dict | None) -> ReconTransformConfig:
    try:
        cfg = ReconTransformConfig(**dict(recon or {}))
        ReconTransform(cfg)  # validates the mask specs
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"key 'model.recon': {exc}") from exc
    return cfg


class ReconObjective:
    """SSIM regression of the fully sampled RSS image from undersampled k-space."""

    default_backbone = "varnet"

    def __init__(self, cfg, unit: str, manifest: dict):
        if manifest.get("kind") != "recon":
            raise ConfigError(f"key 'data.source': {cfg.data.source} holds '{manifest.get('kind')}' shards; "
                              "the recon objective needs reconstruction shards (kind 'recon')")
        self.cfg, self.unit, self._manifest = cfg, unit, manifest
        kwargs = dict(cfg.model)
        self.backbone = kwargs.pop("backbone", self.default_backbone)
        self.transform = ReconTransform(transform_config(kwargs.pop("recon", None)))
        self.model_kwargs = self.take_keys(kwargs)
        self.loss_fn = SSIMLoss()
        self.publish_name = f"recon-{self.backbone}"

    def take_keys(self, kwargs: dict) -> dict:
        """Remove and apply this objective's own ``model`` keys; the rest are the backbone's arguments."""
        return kwargs

    def reader_kwargs(self) -> dict:
        return {"fields": RECON_FIELDS, "require": ("kspace",)}

    def prepare(self, sample: dict) -> dict:
        return self.transform(sample)

    def collate(self, items: list[dict]) -> dict:
        batch = collate_recon(items)
        batch.pop("meta")
        return batch

    def build_model(self) -> torch.nn.Module:
        from pretrain.models.recon import RECON_BACKBONES

        cls = lookup(RECON_BACKBONES, self.backbone, "reconstruction backbone")
        try:
            return cls(**self.model_kwargs, transform=asdict(self.transform.cfg))
        except TypeError as exc:
            raise ConfigError(f"key 'model': {exc}") from exc

    def loss(self, model, batch: dict, generator: torch.Generator) -> torch.Tensor:
        recon = model(batch["masked_kspace"], batch["mask"], batch["num_low_frequencies"])
        return ssim_loss(self.loss_fn, recon, batch["target"])

    def publish(self, model, out_url: str, train_config: dict, metrics: dict, overwrite: bool = False) -> str:
        from .publish import publish_recon_backbone

        return publish_recon_backbone(model, out_url, train_config, self._manifest, metrics, overwrite=overwrite)
