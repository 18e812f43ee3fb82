"""Reconstruction meets analysis: label maps on the synthetic k-space slices; the ``recon_seg`` objective
(VarNet -> MONAI BasicUNet, joint SSIM + Dice/CE) reducing both losses on the one engine; the three-way
study (multitask vs sequential vs zero-filled) end to end. One tiny study run feeds the tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pretrain.config import PretrainConfig
from shards.config import ConfigError, load_config
from shards.reader import iter_samples
from shards.schema import RECON_FIELDS
from shards.synth.vocab import STRUCTURES

CONFIG = "configs/pretrain/recon-seg-tiny.yaml"


@pytest.fixture(scope="module")
def recon_seg_study(tiny_recon_shards, tmp_path_factory):
    """``downstream recon-seg-study`` on the tiny knee slices: four runs of 24 steps, 4x and 8x."""
    from downstream.cli import main

    out = tmp_path_factory.mktemp("recon_seg_study")
    assert main(["recon-seg-study", "--config", "configs/sweeps/recon-seg.yaml", f"source={tiny_recon_shards}",
                 "overrides=[optim.total_steps=24,ema_decay=0,checkpoint_every=24]", "accelerations=[4,8]",
                 "max_eval_slices=6", "n_boot=50", f"out={out}", "name=s"]) == 0
    return out / "s"


def test_synthetic_recon_slices_carry_label_maps(tiny_recon_shards):
    slices = list(iter_samples(str(tiny_recon_shards), "train", RECON_FIELDS))
    assert slices and all(s["seg"].shape == s["target"].shape for s in slices)
    for s in slices:
        assert s["meta"]["structures"] == list(STRUCTURES[s["meta"]["joint"]])
        assert s["seg"].max() < len(s["meta"]["structures"])
    assert np.mean([len(np.unique(s["seg"])) > 2 for s in slices]) > 0.5  # anatomy, not just background


@pytest.mark.integration
def test_multitask_objective_reduces_both_losses(recon_seg_study):
    """The published joint model against its own initialisation, on a fixed batch of its training slices."""
    from pretrain.objectives import build_objective
    from pretrain.recon.publish import load_recon_backbone
    from pretrain.run import load_run_config
    from shards.manifest import load_manifest

    cfg = load_run_config("multitask", recon_seg_study / "runs")
    objective = build_objective(cfg, "recon", load_manifest(cfg.data.source))
    items = [objective.prepare(s) for s in iter_samples(cfg.data.source, "train", RECON_FIELDS, joints=["knee"])]
    batch = objective.collate(items[:8])  # validation-style masks (seeded by key, no epoch)
    torch.manual_seed(cfg.seed)  # the loop's initialisation
    initial = objective.build_model().eval()
    trained = load_recon_backbone(recon_seg_study / "hub" / "multitask")
    with torch.no_grad():
        before, after = objective.terms(initial, batch), objective.terms(trained, batch)
    assert after["ssim"] < 0.95 * before["ssim"], (before, after)  # measured: 0.539 -> 0.481
    assert after["seg"] < 0.95 * before["seg"], (before, after)    # measured: 3.80 -> 3.42
    assert trained.config.structures == list(STRUCTURES["knee"])
    assert "Structures: background, femur" in (recon_seg_study / "hub" / "multitask" / "README.md").read_text()


@pytest.mark.integration
def test_three_way_study_end_to_end(recon_seg_study):
    """Metrics with intervals per method and acceleration; the downstream studies' report with plots."""
    metrics = json.loads((recon_seg_study / "metrics.json").read_text())
    cells = {(r["acceleration"], r["method"]) for r in metrics["summary"]}
    assert cells == {(a, m) for a in (4.0, 8.0) for m in ("multitask", "sequential", "zero-filled", "fully sampled")}
    for r in metrics["summary"]:
        assert 0 <= r["dice"]["mean"] <= 1 and r["dice"]["ci"][0] <= r["dice"]["mean"] <= r["dice"]["ci"][1]
        assert r["method"] == "fully sampled" or 0 < r["ssim"]["mean"] <= 1
    zf = {r["acceleration"]: r["ssim"]["mean"] for r in metrics["summary"] if r["method"] == "zero-filled"}
    assert zf[4.0] > zf[8.0]
    report = (recon_seg_study / "report.md").read_text()
    assert "| acceleration | method | volumes | SSIM | PSNR | NMSE | Dice |" in report and "| 8x | sequential |" in report
    assert (recon_seg_study / "dice.png").stat().st_size > 1000 and (recon_seg_study / "ssim.png").is_file()
    assert "base64" in (recon_seg_study / "report.html").read_text()


def _cfg(shards, tmp_path, *more) -> PretrainConfig:
    return load_config(PretrainConfig, CONFIG, [f"data.source={shards}", f"run_root={tmp_path}/runs",
                                                f"storage_path={tmp_path}/ckpt", *more])


def test_multitask_config_errors_name_the_key(tiny_recon_shards, tmp_path):
    from downstream.recon.multitask_study import ReconSegStudyConfig, run_configs
    from pretrain.objectives import build_objective
    from shards.manifest import load_manifest

    manifest = load_manifest(str(tiny_recon_shards))
    for override, match in [("model.multitask.seg_input=target", "seg_input 'target' does not fit backbone 'varnet-seg'"),
                            ("model.multitask.anatomy=hip", "anatomy 'hip'"),
                            ("model.multitask.dice=1", "model.multitask.*dice")]:
        with pytest.raises(ConfigError, match=match):
            build_objective(_cfg(tiny_recon_shards, tmp_path, override), "recon", manifest)
    study = ReconSegStudyConfig(overrides=["model.chans=8"], recon_config="configs/pretrain/recon-tiny.yaml")
    with pytest.raises(ConfigError, match="recon_config.*model keys"):  # the two VarNets must match
        run_configs(ReconSegStudyConfig(recon_config=CONFIG), tmp_path)
    assert set(run_configs(study, tmp_path)) == {"multitask", "varnet", "seg-target", "seg-zero-filled"}


# ----- recon backbones downstream, and the acceleration study --------------------------------------------
FAST = ["train.epochs=3", "metrics.bootstrap=20", "baselines.names=[]", "probe.enabled=false", "threads=1"]


@pytest.fixture(scope="module")
def task_models(tiny_shards, tiny_hub, recon_seg_study, tmp_path_factory) -> dict:
    """A knee diagnosis head on the study's VarNet features and a knee segmentation head on a diffusion
    backbone, both backbones in one hub folder (``hub``, the task models' ``backbone_dir``)."""
    import shutil

    from downstream.finetune import run_finetune

    tmp = tmp_path_factory.mktemp("recon_tasks")
    varnet = tmp / "hub" / "varnet"
    shutil.copytree(json.loads((recon_seg_study / "metrics.json").read_text())["models"]["varnet"], varnet)
    shutil.copytree(tiny_hub / "knee-sag", tmp / "hub" / "knee-sag")
    common = [f"shards={tiny_shards}", f"cache_dir={tmp / 'cache'}", f"out={tmp / 'runs'}", "planes=[sag]", *FAST]
    run_finetune("knee-dx", [*common, f"backbones.sag={varnet}", "features.blocks=[cascade1/mid,cascade1/up.1]"],
                 run_dir=tmp / "dx")
    run_finetune("knee-seg", [*common, f"backbones.sag={tmp / 'hub' / 'knee-sag'}", "features.timesteps=[10]",
                              "features.blocks=[mid,up.1]", "structures=[femur,tibia,patella]"], run_dir=tmp / "seg")
    return {"dx": tmp / "dx", "seg": tmp / "seg", "varnet": varnet, "hub": tmp / "hub"}


@pytest.mark.integration
def test_recon_backbone_features_feed_a_diagnosis_head(task_models, tiny_shards):
    """A published VarNet as a downstream backbone: cached slice-wise features -> the diagnosis head; the
    exported task model reloads it (sha256-checked) and predicts new studies."""
    from downstream.predict_inputs import shard_studies
    from downstream.predictor import Predictor
    from downstream.task_model import load_task_model

    model = load_task_model(str(task_models["dx"]), backbone_dir=str(task_models["hub"]))
    assert model.meta["channels"]["sag"] == [16, 4]  # cascade1/mid (4 * 2^2 channels), cascade1/up.1 (4)
    assert type(model.backbones["sag"]).__name__ == "ReconVolumeFeatures"
    studies = list(shard_studies(model, str(tiny_shards), "test", 0, 1, with_truth=True))
    rows = Predictor(model).predict(studies)
    assert rows and all(r["status"] == "ok" for r in rows)
    probs = np.array([[r["probs"][n] for n in model.labels] for r in rows])
    assert np.isfinite(probs).all() and ((probs > 0) & (probs < 1)).all() and probs.std() > 0


@pytest.mark.integration
def test_acceleration_study_table_and_plot(task_models, tiny_shards, tmp_path, capsys):
    from downstream.cli import main

    assert main(["acceleration-study", "--config", "configs/sweeps/acceleration.yaml", f"shards={tiny_shards}",
                 f"task_models=[{task_models['dx']},{task_models['seg']}]", f"varnet={task_models['varnet']}",
                 f"backbone_dir={task_models['hub']}", "coils={knee: 4, ankle: 3, shoulder: 5}", f"out={tmp_path}", "name=a"]) == 0
    assert "| knee-dx | macro AUROC | 12x | varnet |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "a" / "metrics.json").read_text())["rows"]
    for task in ("knee-dx", "knee-seg"):
        cells = [(r["acceleration"], r["method"]) for r in rows if r["task"] == task]
        assert len(cells) == 9 and {m for _, m in cells} == {"original", "zero-filled", "varnet"}
    dice = {(r["acceleration"], r["method"]): r["mean"] for r in rows if r["task"] == "knee-seg"}
    assert all(0 <= v <= 1 for v in dice.values())
    original = next(v for (a, m), v in dice.items() if m == "original")
    assert abs(dice[(1.0, "zero-filled")] - original) < 0.05  # 1x: the simulated scan gives back the image
    assert (tmp_path / "a" / "knee-seg.png").stat().st_size > 1000 and (tmp_path / "a" / "knee-dx.png").is_file()
    assert "| 12x |" in (tmp_path / "a" / "report.md").read_text()
