"""The ``recon_seg`` training objective: reconstruction and segmentation of undersampled k-space slices.

As ATOMMIC's multitask (MTL) models: a VarNet reconstructs, a 2D segmentation network (MONAI
``BasicUNet``) segments the reconstruction, and both train together on
``ssim_weight * SSIM + l1_weight * L1`` (reconstruction vs the fully sampled target) ``+ seg_weight *
(Dice + CE)`` (MONAI ``DiceCELoss`` against the slice's label map). The same objective trains the
segmenter alone for the two-stage comparisons (``model.backbone: seg2d``), on the fully sampled target
(``seg_input: target``, the second stage of the sequential pipeline) or on the zero-filled image
(``seg_input: zero_filled``). Run config: ``configs/pretrain/recon-seg-tiny.yaml``; ``model`` = the
backbone's arguments plus ``backbone``, ``recon`` (:class:`~pretrain.recon.transforms.ReconTransformConfig`)
and ``multitask`` (:class:`MultitaskConfig`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from shards.config import ConfigError, lookup
from shards.dataset import dataset_of

from .objective import ReconObjective, crop_to, ssim_loss
from .transforms import describe

SEG_INPUTS = ("recon", "target", "zero_filled")


@dataclass
class MultitaskConfig:
    anatomy: str = "knee"       # slices of this anatomy only; its label-map structures are the classes
    seg_input: str = "recon"    # recon (varnet-seg, joint) | target | zero_filled (seg2d alone)
    ssim_weight: float = 1.0
    l1_weight: float = 0.0
    seg_weight: float = 1.0

    def validate(self, backbone: str) -> None:
        if self.seg_input not in SEG_INPUTS:
            raise ValueError(f"seg_input '{self.seg_input}' is not one of {', '.join(SEG_INPUTS)}")
        if (self.seg_input == "recon") != (backbone == "varnet-seg"):
            raise ValueError(f"seg_input '{self.seg_input}' does not fit backbone '{backbone}': varnet-seg segments "
                             "its own reconstruction (recon); seg2d segments the target or the zero-filled image")
        if min(self.ssim_weight, self.l1_weight, self.seg_weight) < 0 or self.seg_weight == 0:
            raise ValueError("loss weights must be >= 0 and seg_weight > 0")


def multitask_config(raw: dict | None, backbone: str) -> MultitaskConfig:
    try:
        cfg = MultitaskConfig(**dict(raw or {}))
        cfg.validate(backbone)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"key 'model.multitask': {exc}") from exc
    return cfg


def label_map_classes(manifest: dict, anatomy: str) -> list[str]:
    """Structure names by label-map value (background first) from the shards' dataset declaration; the
    values must be 0..K-1, since they are the segmenter's K output channels."""
    decl = dataset_of(manifest)
    if anatomy not in decl.anatomies:
        raise ConfigError(f"key 'model.multitask.anatomy': anatomy '{anatomy}' is not in the shards' dataset; "
                          f"declared: {', '.join(decl.anatomies)}")
    values = decl.structure_values(anatomy)
    if sorted(values.values()) != list(range(len(values))):
        raise ConfigError(f"key 'model.multitask.anatomy': the label-map values of '{anatomy}' are not 0..K-1 "
                          f"({sorted(values.values())}); recon_seg needs contiguous class values")
    if len(values) < 2:
        raise ConfigError(f"key 'model.multitask.anatomy': '{anatomy}' declares no label-map structures")
    return sorted(values, key=values.get)


class ReconSegObjective(ReconObjective):
    """Weighted reconstruction (SSIM/L1) + segmentation (Dice + CE) loss on recon slices with label maps."""

    default_backbone = "varnet-seg"

    def __init__(self, cfg, unit: str, manifest: dict):
        super().__init__(cfg, unit, manifest)
        self.structures = label_map_classes(manifest, self.multitask.anatomy)
        self.seg_loss = DiceCELoss(to_onehot_y=True, softmax=True)
        self.publish_name = ("recon-varnet-seg" if self.backbone == "varnet-seg"
                             else f"seg2d-{self.multitask.seg_input.replace('_', '-')}")

    def take_keys(self, kwargs: dict) -> dict:
        self.multitask = multitask_config(kwargs.pop("multitask", None), self.backbone)
        return kwargs

    def reader_kwargs(self) -> dict:
        return super().reader_kwargs() | {"joints": [self.multitask.anatomy], "require": ("kspace", "seg")}

    def prepare(self, sample: dict) -> dict:
        stored = (sample.get("meta") or {}).get("structures")
        if stored is not None and list(stored) != self.structures:
            raise ValueError(f"{describe(sample)}: label map structures {stored} differ from the "
                             f"{self.multitask.anatomy} structures {self.structures}")
        return super().prepare(sample)

    def collate(self, items: list[dict]) -> dict:
        batch = super().collate(items)
        if "seg" not in batch:
            raise ValueError(f"recon_seg needs a label map (seg) in every slice; batch {batch['keys']} lacks one")
        return batch

    def build_model(self) -> torch.nn.Module:
        from pretrain.models.recon_seg import RECON_SEG_BACKBONES

        cls = lookup(RECON_SEG_BACKBONES, self.backbone, "reconstruction+segmentation backbone")
        extra = {} if self.backbone == "varnet-seg" else {"seg_input": self.multitask.seg_input}
        try:
            return cls(**self.model_kwargs, **extra, structures=self.structures,
                       transform=asdict(self.transform.cfg))
        except TypeError as exc:
            raise ConfigError(f"key 'model': {exc}") from exc

    def terms(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """The unweighted loss terms: ``ssim`` and ``l1`` (joint model only) and ``seg`` (Dice + CE)."""
        target, seg = batch["target"], batch["seg"]
        if self.multitask.seg_input == "recon":
            recon, logits = model(batch["masked_kspace"], batch["mask"], batch["num_low_frequencies"])
            out = {"ssim": ssim_loss(self.loss_fn, recon, target),
                   "l1": F.l1_loss(crop_to(recon, target.shape[-2:]).float(), target.float())}
        else:
            logits, out = model(batch[self.multitask.seg_input]), {}
        logits = crop_to(logits, seg.shape[-2:])
        return out | {"seg": self.seg_loss(logits.float(), seg[:, None].long())}

    def loss(self, model, batch: dict, generator: torch.Generator) -> torch.Tensor:
        t, m = self.terms(model, batch), self.multitask
        return m.ssim_weight * t.get("ssim", 0.0) + m.l1_weight * t.get("l1", 0.0) + m.seg_weight * t["seg"]
