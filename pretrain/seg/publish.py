"""Publishing a trained 3D segmentation model: ``config.json`` + ``model.safetensors``, ``labels.json`` (classes and each anatomy's structure table), the resolved
training config, metrics and a short model card. :func:`load_seg_model` reads it back."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from ..hub import fetch_folder, put_folder
from ..publish import public_inputs
from .network import SegNetwork, load_seg, save_seg

CARD = """# 3D segmentation model ({arch})

- classes: {n} structures ({classes})
- anatomies: {joints}; plane: {plane}; native grid, per-volume z-score, sliding windows of {patch}
  (Gaussian blending, overlap {overlap}), test-time mirroring: {mirror}
- encoder: {init}
- training: {steps} steps, final loss {loss}; data: {studies}

Intended use: research on synthetic or de-identified MSK MRI; not a medical device.
"""


def publish_seg_model(model: SegNetwork, out_url: str, train_config: dict, manifest: dict, metrics: dict,
                      labels: dict, overwrite: bool = False) -> str:
    train_config, manifest, metrics = public_inputs(train_config, manifest, metrics)
    c = model.config
    with tempfile.TemporaryDirectory(prefix="mskfm-publish-") as tmp:
        folder = Path(tmp) / "seg"
        save_seg(model, folder)
        (folder / "labels.json").write_text(json.dumps(labels, indent=1, sort_keys=True))
        (folder / "training_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(train_config)))
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True, default=str))
        (folder / "README.md").write_text(CARD.format(
            arch=c.arch, n=len(c.structures), classes=", ".join(c.structures), joints=", ".join(labels["tables"]),
            plane=c.plane, patch=list(c.patch), overlap=c.overlap, mirror=list(c.mirror_axes) or "off",
            init=(f"encoder and bottleneck from {c.init_from}" if c.pretrained
                  else f"random, architecture of {c.init_from}" if c.init_from else "random (from scratch)"),
            steps=metrics.get("steps"), loss=metrics.get("final_loss"),
            studies=metrics.get("n_studies", "all train studies")))
        put_folder(folder, str(out_url), overwrite)
    return str(out_url)


def load_seg_model(url: str, device: str = "cpu") -> tuple[SegNetwork, dict]:
    """``(model in eval mode, labels.json)`` of a published segmentation model."""
    folder = fetch_folder(str(url))
    labels = json.loads((Path(folder) / "labels.json").read_text())
    return load_seg(folder).to(device).eval(), labels
