"""Learnability (issue 12): on a small synthetic knee set with a strong finding, the task's default head
on the features of a briefly pretrained backbone reads the finding (effusion AUROC > 0.9 on the test
split). It is measured again with the feature standardisation or the model selection removed: both are
what lets the head read the features, so both ablations score lower.

The strong finding is a test setting of the generator (``finding_strength=3``, no normal-variant mimics),
not a change of its defaults. Pretraining is ``pretrain run``'s library API with the local launcher.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """Shards (400 knee patients, sagittal 16x64x64, strong findings) and a published sagittal backbone
    pretrained 60 steps on their training split (labels unread)."""
    from pretrain.config import PretrainConfig
    from pretrain.run import publish_run, train
    from shards.build import BuildConfig, build_shards
    from shards.config import load_config

    tmp = tmp_path_factory.mktemp("learnable")
    shards = tmp / "shards"
    build_shards(load_config(BuildConfig, ROOT / "configs/shards/tiny.yaml", [
        f"out={shards}", "synth.n_patients=400", "synth.joints=[knee]", "synth.joint_weights=[1.0]",
        "synth.planes=[sag]", "synth.shape.sag=[16,64,64]", "synth.kspace.enabled=false",
        "synth.finding_strength=3", "synth.mimics=0", "shard_max_count=128"]))
    cfg = load_config(PretrainConfig, ROOT / "configs/pretrain/demo-knee.yaml", [
        "planes=[sag]", f"data.source={shards}", "data.split=train", "data.num_workers=0", "launcher=local",
        f"run_root={tmp}/runs", "optim.total_steps=60", "batch_size=4", "checkpoint_every=60", "log_every=30"])
    train(cfg)
    hub = publish_run(cfg, str(tmp / "hub"))
    return {"shards": shards, "backbone": hub["sag"], "cache": tmp / "cache", "runs": tmp / "finetune"}


def _effusion(learnable, name: str, *extra: str) -> dict:
    from downstream.finetune import run_finetune

    res = run_finetune(ROOT / "configs/tasks/knee-dx.yaml", [
        f"shards={learnable['shards']}", "planes=[sag]", f"backbones.sag={learnable['backbone']}",
        f"cache_dir={learnable['cache']}", "baselines.names=[]", "probe.enabled=false",
        *extra], run_dir=learnable["runs"] / name)
    return {"auroc": res["metrics"]["diffusion"]["per_label"]["effusion"]["auroc"], "n_eval": res["n_eval"]}


def test_default_head_reads_a_strong_finding_and_ablations_do_not(learnable, monkeypatch):
    """All 8 knee labels are trained together; effusion is the strong finding, the others stay subtle."""
    import downstream.train as train_mod

    full = _effusion(learnable, "default")
    assert full["n_eval"] >= 60
    assert full["auroc"] > 0.9, full
    no_selection = _effusion(learnable, "no-selection", 'train.select_split=""')
    with monkeypatch.context() as m:
        m.setattr(train_mod, "label_rows", lambda model: None)  # one epoch and weight decay for all labels
        joint_selection = _effusion(learnable, "joint-selection")

    def raw_features(model, *_a, **_k):
        """Ablation: every Standardize module stays the identity (raw backbone features)."""
        for mod in model.modules():
            if isinstance(mod, train_mod.Standardize):
                mod.fitted.fill_(True)
        return 0

    monkeypatch.setattr(train_mod, "fit_standardizers", raw_features)
    no_standardisation = _effusion(learnable, "no-standardisation")
    print({"default": full, "no_selection": no_selection, "joint_selection": joint_selection,
           "no_standardisation": no_standardisation})
    for ablation in (joint_selection, no_standardisation):
        assert ablation["auroc"] < full["auroc"] - 0.03, (full, ablation)
    assert np.isfinite(no_selection["auroc"])
