"""Weights & Biases tracking: off without a project, offline unless the user logged in."""

from __future__ import annotations

import pytest

from shards.config import ConfigError, load_config
from shards.tracking import WandbConfig, resolve_mode, start_tracking


def test_mode_offline_unless_logged_in(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))          # no ~/.netrc from `wandb login`
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert resolve_mode(WandbConfig(project="p")) == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert resolve_mode(WandbConfig(project="p")) == "online"
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "y" * 40)
    assert resolve_mode(WandbConfig(project="p")) == "online"
    assert resolve_mode(WandbConfig(project="p", mode="offline")) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")        # the environment wins
    assert resolve_mode(WandbConfig(project="p")) == "disabled"
    with pytest.raises(ConfigError, match="key 'wandb.mode'"):
        load_config(WandbConfig, None, ["mode=sometimes"])


def test_no_project_no_tracking(tmp_path):
    with start_tracking(WandbConfig(), tmp_path / "run", "x", {"a": 1}) as tracker:
        tracker.log({"loss": 1.0}, step=1)
        assert not tracker.enabled
    assert not (tmp_path / "run").exists()


def test_offline_run_writes_its_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with start_tracking(WandbConfig(project="mskfm-test"), tmp_path, "x", {"a": 1}, job_type="test") as tracker:
        assert tracker.enabled
        tracker.log({"loss": 0.5, "note": "skipped"}, step=1)
        tracker.summary({"auroc": 0.7})
    records = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1
    data = records[0].read_bytes()  # the run's record, uploaded later by `wandb sync`
    assert b"auroc" in data and b"loss" in data and b"mskfm-test" in data
