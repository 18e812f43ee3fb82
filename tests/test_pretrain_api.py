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
