"""Reconstruction meets segmentation: label maps on the synthetic k-space slices, and the ``recon_seg``
objective (VarNet -> MONAI BasicUNet, joint SSIM + Dice/CE) reducing both losses on the one engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.config import PretrainConfig
from shards.config import ConfigError, load_config
from shards.reader import iter_samples
from shards.schema import RECON_FIELDS, STRUCTURES

CONFIG = "configs/pretrain/recon-seg-tiny.yaml"


def test_synthetic_recon_slices_carry_label_maps(tiny_recon_shards):
    slices = list(iter_samples(str(tiny_recon_shards), "train", RECON_FIELDS))
    assert slices and all(s["seg"].shape == s["target"].shape for s in slices)
    for s in slices:
        assert s["meta"]["structures"] == list(STRUCTURES[s["meta"]["joint"]])
        assert s["seg"].max() < len(s["meta"]["structures"])
    assert np.mean([len(np.unique(s["seg"])) > 2 for s in slices]) > 0.5  # anatomy, not just background


def _cfg(shards, tmp_path, *more) -> PretrainConfig:
    return load_config(PretrainConfig, CONFIG, [f"data.source={shards}", f"run_root={tmp_path}/runs",
                                                f"storage_path={tmp_path}/ckpt", *more])


def _fixed_batch(objective, shards) -> dict:
    """The knee train slices, each with its validation-style mask (seeded by key, no epoch)."""
    items = [objective.prepare(s) for s in iter_samples(str(shards), "train", RECON_FIELDS, joints=["knee"])]
    return objective.collate(items[:8])


@pytest.mark.integration
def test_multitask_objective_reduces_both_losses(tiny_recon_shards, tmp_path):
    from pretrain.objectives import build_objective
    from pretrain.recon.publish import load_recon_backbone
    from pretrain.run import publish_run, train
    from shards.manifest import load_manifest

    cfg = _cfg(tiny_recon_shards, tmp_path, "optim.total_steps=24", "optim.lr=0.005", "ema_decay=0", "checkpoint_every=24")
    objective = build_objective(cfg, "recon", load_manifest(str(tiny_recon_shards)))
    batch = _fixed_batch(objective, tiny_recon_shards)
    torch.manual_seed(cfg.seed)  # the loop's initialisation
    initial = objective.build_model().eval()
    train(cfg)
    url = publish_run(cfg, str(tmp_path / "hub"))["recon"]
    trained = load_recon_backbone(url)
    with torch.no_grad():
        before, after = objective.terms(initial, batch), objective.terms(trained, batch)
    assert after["ssim"] < 0.95 * before["ssim"], (before, after)  # measured: 0.539 -> 0.481
    assert after["seg"] < 0.95 * before["seg"], (before, after)    # measured: 3.80 -> 3.42
    assert trained.config.structures == list(STRUCTURES["knee"]) and url.endswith("recon-varnet-seg")
    assert "Structures: background, femur" in (tmp_path / "hub" / "recon-varnet-seg" / "README.md").read_text()


def test_multitask_config_errors_name_the_key(tiny_recon_shards, tmp_path):
    from pretrain.objectives import build_objective
    from shards.manifest import load_manifest

    manifest = load_manifest(str(tiny_recon_shards))
    for override, match in [("model.multitask.seg_input=target", "seg_input 'target' does not fit backbone 'varnet-seg'"),
                            ("model.multitask.anatomy=hip", "anatomy 'hip'"),
                            ("model.multitask.dice=1", "model.multitask.*dice")]:
        with pytest.raises(ConfigError, match=match):
            build_objective(_cfg(tiny_recon_shards, tmp_path, override), "recon", manifest)
