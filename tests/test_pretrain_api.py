"""``pretrain.run``: the library API checks a config on the driver before any launcher or Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import PretrainConfig
from pretrain.run import train
from shards.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pretrain" / "tiny.yaml"


def _cfg(shards: Path, tmp: Path, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, TINY, [f"data.source={shards}", f"run_root={tmp}/runs",
                                              f"storage_path={tmp}/ckpt", *extra])


@pytest.mark.parametrize("typo, key", [("model.chanels=[4,8]", "key 'model'"),
                                       ("schedule.num_train_timestep=10", "key 'schedule'"),
                                       ("model.backbone=difusion3d", "unknown backbone 'difusion3d'")])
def test_model_or_schedule_typo_fails_before_launch(tiny_shards, tmp_path, typo, key):
    """Ray launcher, but the typo surfaces as a ConfigError on the driver: no run folder, no Ray."""
    cfg = _cfg(tiny_shards, tmp_path, "launcher=ray", typo)
    with pytest.raises(ConfigError, match=key) as err:
        train(cfg)
    assert typo.split("=")[0].split(".")[-1] in str(err.value)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ckpt").exists()


def test_unreadable_shards_name_the_key(tmp_path):
    cfg = load_config(PretrainConfig, TINY, [f"data.source={tmp_path}/none", f"run_root={tmp_path}/runs"])
    with pytest.raises(ConfigError, match="key 'data.source'"):
        train(cfg)


def test_mixed_reader_draws_joints_by_weight(tiny_shards):
    from shards.reader import MixedReader, ShardReader

    def reader(joint):
        return ShardReader(str(tiny_shards), "train", ("meta",), require=(), joints=[joint], rank=0, world_size=1,
                           shuffle=True, resample=True)

    for weights in ([1.0, 1.0], [3.0, 1.0]):
        mix = MixedReader([reader("knee"), reader("shoulder")], weights, seed=0)
        joints = [s["meta"]["joint"] for s, _ in zip(mix, range(400))]
        share = joints.count("knee") / len(joints)
        assert abs(share - weights[0] / sum(weights)) < 0.07, (weights, share)
    first = [s["__key__"] for s, _ in zip(MixedReader([reader("knee"), reader("ankle")], [1, 1], seed=3), range(20))]
    again = [s["__key__"] for s, _ in zip(MixedReader([reader("knee"), reader("ankle")], [1, 1], seed=3), range(20))]
    assert first == again


def test_capped_subsets_are_nested_and_feed_the_loader(tiny_shards, tmp_path):
    from pretrain.loop import build_loader
    from pretrain.objectives import build_objective, study_subset
    from pretrain.run import check_manifest
    from shards.reader import study_index

    mix = ["joints={knee: 1, ankle: 1}", "data.subset_seed=5"]
    index = study_index(str(tiny_shards), "train", "sag")
    small = study_subset(_cfg(tiny_shards, tmp_path, *mix, "data.max_studies=4"), "sag", {"knee": 1, "ankle": 1})
    large = study_subset(_cfg(tiny_shards, tmp_path, *mix, "data.max_studies=8"), "sag", {"knee": 1, "ankle": 1})
    assert len(small) == 4 and len(large) == 8 and set(small) <= set(large)
    assert {index[k] for k in large} == {"knee", "ankle"}

    cfg = _cfg(tiny_shards, tmp_path, *mix, "data.max_studies=8", "launcher=local")
    objective = build_objective(cfg, "sag", check_manifest(cfg))
    assert objective.publish_name == "knee+ankle-sag" and objective.data_summary()["n_studies"] == 8
    seen = [k for batch, _ in zip(build_loader(cfg, objective, 0, 1, 0), range(20)) for k in batch["keys"]]
    assert set(seen) <= set(large) and {index[k] for k in seen} == {"knee", "ankle"}

    available = sum(1 for j in index.values() if j in ("knee", "ankle"))
    with pytest.raises(ConfigError, match=f"key 'data.max_studies': {available + 1} exceeds the {available}"):
        train(_cfg(tiny_shards, tmp_path, *mix, f"data.max_studies={available + 1}", "launcher=local"))
    # any anatomy name is a valid config; the shards say which exist, before anything is written
    with pytest.raises(ConfigError, match=r"key 'joints': anatomy \['elbow'\] has no studies .*anatomies there: "
                                          "ankle, knee, shoulder"):
        train(_cfg(tiny_shards, tmp_path, "joints={elbow: 1, knee: 1}", "launcher=local"))
    assert not (tmp_path / "runs").exists()


@pytest.mark.integration
def test_two_joint_capped_run_publishes_what_it_saw(tiny_shards, tmp_path):
    """The engine (local launcher, DeepSpeed) trains on a capped two-joint mix; the card says so."""
    import json

    from pretrain.run import publish_run

    cfg = _cfg(tiny_shards, tmp_path, "joints={knee: 1, shoulder: 1}", "data.max_studies=6", "launcher=local",
               "optim.total_steps=2", "checkpoint_every=2", "log_every=1", "name=mix", "wandb.project=mskfm-test")
    assert train(cfg)["sag"]["steps"] == 2
    # rank 0 tracked the run with W&B, offline (tests set WANDB_MODE=offline), inside the plane's folder
    assert len(list((tmp_path / "runs" / "mix" / "sag" / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    url = publish_run(cfg, str(tmp_path / "hub"))["sag"]
    metrics = json.loads((Path(url) / "metrics.json").read_text())
    assert metrics["joints"] == ["knee", "shoulder"] and metrics["n_studies"] == 6 and metrics["steps"] == 2
    assert Path(url).name == "knee+shoulder-sag"


def test_recon_backbone_carries_its_transform_settings(tmp_path):
    """The typed transform settings (coil handling incl. ESPIRiT/SENSE) travel in the published config.json,
    come back typed, and evaluation inherits them."""
    import json
    from dataclasses import asdict

    from pretrain.models.recon import VarNetBackbone
    from pretrain.recon.evaluate import EvalReconConfig, resolve_coil_settings, trained_recon_settings, trained_transform
    from pretrain.recon.publish import load_recon_backbone, publish_recon_backbone
    from pretrain.recon.transforms import ReconTransformConfig

    settings = ReconTransformConfig(virtual_coils=4, prewhiten=True, grid=[32, 32], combine="sense",
                                    espirit={"calib_width": 12})
    model = VarNetBackbone(num_cascades=1, sens_chans=2, sens_pools=1, chans=2, pools=1, transform=asdict(settings))
    url = publish_recon_backbone(model, str(tmp_path / "v"), {}, {"kind": "recon"}, {"steps": 0})
    assert trained_transform(url) == settings
    assert trained_recon_settings(url) == {"virtual_coils": 4, "coil_compression": "svd", "normalisation": "max",
                                           "prewhiten": True, "combine": "sense", "espirit": {"calib_width": 12}}
    inherited = resolve_coil_settings(EvalReconConfig(backbone=url))
    assert (inherited.combine, inherited.espirit, inherited.virtual_coils) == ("sense", {"calib_width": 12}, 4)
    assert load_recon_backbone(url).config["transform"]["grid"] == [32, 32]
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    config["transform"]["virtual_coil"] = 3
    (tmp_path / "v" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="virtual_coil"):
        trained_transform(url)
