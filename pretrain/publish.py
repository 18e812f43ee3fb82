"""Publishing a trained backbone to a hub, and loading it back with only torch + diffusers + MONAI.

A hub is a local folder (default), an ``s3://`` (or other fsspec) URL, or ``hf://<owner>/<repo>``
(see :mod:`pretrain.hub`). A published folder holds::

    config.json                          backbone config (architecture, plane, preprocessing, schedule)
    diffusion_pytorch_model.safetensors  weights (diffusers save_pretrained)
    scheduler/scheduler_config.json      the diffusers noise scheduler
    training_config.yaml                 the resolved training config (local paths and user names removed)
    metrics.json                         final training metrics
    README.md                            model card

This module imports neither DeepSpeed nor Ray.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from diffusers import DDPMScheduler
from omegaconf import OmegaConf

from .hub import fetch_folder, put_folder
from .model_card import render_model_card
from .models import BACKBONES
from .models.recon import RECON_BACKBONES
from .redact import public

SCHEDULER_DIR = "scheduler"


def public_inputs(train_config: dict, manifest: dict, metrics: dict) -> tuple[dict, dict, dict]:
    """Training config, manifest summary and metrics as a published folder may show them: no local
    paths (the manifest's own location is dropped), no user names (:mod:`pretrain.redact`)."""
    manifest = {k: v for k, v in (manifest or {}).items() if not k.startswith("_")}
    return public(train_config or {}), public(manifest), public(metrics or {})


def stage_backbone(model, scheduler, folder: Path, train_config: dict, manifest: dict, metrics: dict) -> None:
    """Write every file of a published backbone into the local ``folder``."""
    train_config, manifest, metrics = public_inputs(train_config, manifest, metrics)
    model.save_pretrained(folder, safe_serialization=True)
    scheduler.save_pretrained(folder / SCHEDULER_DIR)
    (folder / "training_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(train_config or {})))
    (folder / "metrics.json").write_text(json.dumps(metrics or {}, indent=1, sort_keys=True))
    (folder / "README.md").write_text(render_model_card(model, scheduler, manifest, metrics, train_config))


def publish_backbone(model, scheduler, out_url: str, train_config: dict, manifest: dict, metrics: dict,
                     overwrite: bool = False, storage_options: dict | None = None) -> str:
    """Write a published backbone folder at ``out_url`` and return that URL.

    model: a ``DiffusionBackbone`` with the final (preferably EMA) full weights, on any device.
    scheduler: the diffusers scheduler it was trained with. train_config: the resolved training config
    as a plain dict. manifest: the shard manifest the model was trained on (data summary for the card).
    metrics: final metrics; ``steps`` and ``final_loss`` are shown in the card, all keys are kept.
    out_url: a local folder, ``s3://bucket/prefix/<name>`` or ``hf://<owner>/<repo>``. An existing
    non-empty destination is refused (``FileExistsError`` naming it) unless ``overwrite=True``.
    storage_options: extra fsspec options for remote URLs.
    """
    out_url = str(out_url)
    with tempfile.TemporaryDirectory(prefix="mskfm-publish-") as tmp:
        staged = Path(tmp) / "backbone"
        stage_backbone(model, scheduler, staged, train_config, manifest, metrics)
        put_folder(staged, out_url, overwrite, storage_options)
    return out_url


def load_backbone(url: str, cache_dir: str | Path | None = None, storage_options: dict | None = None,
                  device: str = "cpu"):
    """Load a published backbone: returns ``(model, scheduler, preprocessing)``, model in eval mode.

    A reconstruction backbone (VarNet, U-Net) comes back as a
    :class:`~pretrain.recon.volume.ReconVolumeFeatures` (features of image volumes, slice by slice) with
    no scheduler and no preprocessing (the downstream side derives it from the shards).

    ``preprocessing`` is the stored :class:`~pretrain.preprocess.PlanePreprocessing` (or None).
    Remote folders are downloaded into ``cache_dir`` (default ``~/.cache/mskfm/backbones``).
    """
    folder = fetch_folder(str(url), cache_dir, storage_options)
    with open(folder / "config.json") as f:
        class_name = json.load(f).get("_class_name")
    if class_name in {cls.__name__ for cls in RECON_BACKBONES.values()}:  # features of image volumes, no schedule
        from .recon.publish import load_recon_backbone
        from .recon.volume import ReconVolumeFeatures

        return ReconVolumeFeatures(load_recon_backbone(str(folder), device=device)).eval(), None, None
    classes = {cls.__name__: cls for cls in BACKBONES.values()}
    if class_name not in classes:
        raise ValueError(f"{url}: backbone class '{class_name}' is unknown; known: {', '.join(sorted(classes))}")
    model = classes[class_name].from_pretrained(folder).to(device).eval()
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder=SCHEDULER_DIR)
    return model, scheduler, getattr(model, "preprocessing", None)
