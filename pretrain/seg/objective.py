"""The ``seg3d`` objective: full-resolution 3D segmentation trained by the one loop (DeepSpeed,
any launcher, resumable), nnU-Net-like.

Run config (``configs/pretrain/seg3d-tiny.yaml``): ``objective: seg3d``, ``planes`` = the planes to
train a model for (one model each, on that plane's native grid), ``joint``/``joints`` the anatomies
(one class vocabulary over all of them), ``data.max_studies`` a nested subset of labelled volumes
that keeps a study of every anatomy (at least one per anatomy, else refused),
and ``model`` = a :class:`~pretrain.seg.config.SegConfig`. Each volume is z-scored (nnU-Net's MRI
normalisation) and kept at full resolution; the loss draws ``patches_per_volume`` patches per volume
with foreground oversampling from the loop's generator, and sums Dice + CE over the deep-supervision
outputs with nnU-Net's weights (1, 1/2, 1/4, ... normalised).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch
from monai.transforms import NormalizeIntensity

from shards.config import ConfigError
from shards.labelmaps import structure_tables, to_classes, union_structures

from .config import SegConfig
from .loss import SparseDiceCELoss
from .network import SegNetwork, backbone_unet_kwargs, load_encoder
from .patches import sample_patches


def seg_config(model: dict) -> SegConfig:
    try:
        cfg = SegConfig(**dict(model))
        cfg.validate()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"key 'model': {exc}") from exc
    return cfg


class SegObjective:
    def __init__(self, cfg, unit: str, manifest: dict):
        from pretrain.config import mixture
        from pretrain.objectives import study_subset

        self.cfg, self.plane, self._manifest = cfg, unit, manifest
        self.seg = seg_config(cfg.model)
        self.mixture = mixture(cfg)
        try:
            self.tables = structure_tables(manifest, list(self.mixture))
        except ValueError as exc:
            raise ConfigError(f"key 'joints': {exc}") from exc
        self.classes = list(self.seg.structures) or union_structures(self.tables)
        unknown = [s for s in self.classes if not any(s in t for t in self.tables.values())]
        if unknown:
            raise ConfigError(f"key 'model.structures': {unknown} are structures of none of {list(self.mixture)}")
        self.unet = backbone_unet_kwargs(self.seg.init_from) if self.seg.init_from else None
        self.keys = study_subset(cfg, unit, self.mixture)
        self.loss_fn = SparseDiceCELoss(self.seg.ignore_index)
        self.publish_name = f"seg3d-{'+'.join(self.mixture)}-{unit}"

    def reader_kwargs(self) -> dict:
        fields = (self.plane, f"{self.plane}.seg", "meta")
        return {"fields": fields, "require": fields[:2], "joints": list(self.mixture), "keys": self.keys}

    def data_summary(self) -> dict:
        return {"joints": list(self.mixture), "classes": len(self.classes),
                **({"n_studies": len(self.keys)} if self.keys is not None else {})}

    def prepare(self, sample: dict) -> dict:
        key, meta = sample["__key__"], sample.get("meta") or {}
        declared = meta.get("structures") or self.tables[meta.get("joint")]
        image = torch.as_tensor(np.asarray(sample[self.plane], np.float32))[None]
        label = to_classes(np.asarray(sample[f"{self.plane}.seg"]), declared, self.classes, self.seg.ignore_index)
        return {"image": NormalizeIntensity()(image).as_subclass(torch.Tensor),
                "label": torch.from_numpy(label)[None], "key": key}

    def collate(self, items: list[dict]) -> dict:
        """Volumes of one batch padded to their largest shape (image 0, labels ``ignore_index``)."""
        shape = np.max([it["image"].shape[1:] for it in items], axis=0)

        def pad(t, value):
            extra = [int(s - n) for s, n in zip(shape, t.shape[1:])]
            return torch.nn.functional.pad(t, [p for e in reversed(extra) for p in (0, e)], value=value)

        return {"image": torch.stack([pad(it["image"], 0.0) for it in items]),
                "label": torch.stack([pad(it["label"], self.seg.ignore_index) for it in items]),
                "keys": [it["key"] for it in items]}

    def build_model(self) -> torch.nn.Module:
        s = self.seg
        model = SegNetwork(arch=s.arch, n_classes=len(self.classes) + 1, filters=list(s.filters), patch=list(s.patch),
                           deep_supervision=s.deep_supervision, unet=self.unet, structures=self.classes,
                           overlap=s.overlap, mirror_axes=list(s.mirror_axes), init_from=s.init_from,
                           pretrained=bool(s.init_from and s.load_weights), plane=self.plane)
        if s.init_from and s.load_weights and not next(model.parameters()).is_meta:  # the driver's check builds on 'meta'
            load_encoder(model, s.init_from)
        return model

    def loss(self, model, batch: dict, generator: torch.Generator) -> torch.Tensor:
        s = self.seg
        images, labels = [], []
        for image, label in zip(batch["image"], batch["label"]):
            seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
            x, y = sample_patches(image, label, s.patch, s.pos_fraction, s.patches_per_volume, seed, s.ignore_index)
            images.append(x)
            labels.append(y)
        x, y = torch.cat(images), torch.cat(labels)[:, 0]
        outputs = model(x)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        weights = [0.5 ** i for i in range(len(outputs))]
        return sum(w * self.loss_fn(o.float(), y) for w, o in zip(weights, outputs)) / sum(weights)

    def publish(self, model, out_url: str, train_config: dict, metrics: dict, overwrite: bool = False) -> str:
        from .publish import publish_seg_model

        return publish_seg_model(model, out_url, train_config, self._manifest, metrics,
                                 {"seg": asdict(self.seg), "tables": self.tables}, overwrite=overwrite)
