"""One CLI pattern for every package: overrides anywhere on the line, user errors on stderr with exit
status 2, one config loader (cluster too), one runs root, a ``ray.address`` key for sweeps and studies."""

from __future__ import annotations

import pytest

from cluster import cli as cluster_cli
from downstream import cli as downstream_cli
from pretrain import cli as pretrain_cli
from shards import cli as shards_cli
from shards.config import ConfigError, UserError, load_config


def test_overrides_on_both_sides_of_an_option():
    args = downstream_cli.build_parser().parse_args(
        ["finetune", "--task", "knee-dx", "train.epochs=3", "--run-dir", "X", "train.lr=0.01"])
    assert (args.task, args.run_dir, args.overrides) == ("knee-dx", "X", ["train.epochs=3", "train.lr=0.01"])
    args = pretrain_cli.build_parser().parse_args(["run", "launcher=local", "--config", "c.yaml", "seed=1"])
    assert (args.config, args.overrides) == ("c.yaml", ["launcher=local", "seed=1"])
    args = shards_cli.build_parser().parse_args(["ingest", "nifti", "src", "joint=knee", "--out", "o", "strict=true"])
    assert (args.source, args.out, args.overrides) == ("src", "o", ["joint=knee", "strict=true"])
    args = pretrain_cli.build_parser().parse_args(["recon-study", "--config", "c.yaml", "name=a", "seed=2"])
    assert args.overrides == ["name=a", "seed=2"]
    with pytest.raises(SystemExit):  # an unknown option is still refused
        downstream_cli.build_parser().parse_args(["finetune", "--task", "knee-dx", "--nope", "train.lr=1"])


def test_user_errors_go_to_stderr_with_status_2(capsys, tmp_path, monkeypatch):
    assert downstream_cli.main(["finetune", "--task", "no-such-task", "train.epochs=1"]) == 2
    out, err = capsys.readouterr()
    assert "downstream finetune: error:" in err and "no-such-task" in err and out == ""
    assert pretrain_cli.main(["run", "--config", "configs/pretrain/tiny.yaml", "model.x=1", "nope=1"]) == 2
    assert "pretrain run: error: command line: key 'nope'" in capsys.readouterr().err
    # ingest used to print its errors to stdout
    monkeypatch.delenv("MSKFM_DEID_SALT", raising=False)
    (tmp_path / "src").mkdir()
    assert shards_cli.main(["ingest", "dicom", str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "shards ingest: error: dicom:" in err and "salt" in err.lower()
    assert not (tmp_path / "o").exists()


def test_cluster_uses_the_one_config_loader(capsys):
    from cluster.config import ClusterError, LocalClusterConfig, load_local_config

    with pytest.raises(ConfigError, match="key 'nope'"):
        load_local_config(None, ["nope=1"])
    with pytest.raises(ClusterError, match="key 'host'") as err:
        load_config(LocalClusterConfig, None, ["host=not-an-ip"])
    assert isinstance(err.value, UserError)
    assert cluster_cli.main(["up", "port=99999"]) == 2
    assert "key 'port'" in capsys.readouterr().err


def test_one_runs_root(monkeypatch, tmp_path):
    from downstream.studies.config import StudyConfig
    from downstream.sweep import SweepConfig
    from downstream.tasks import TaskConfig
    from pretrain.config import PretrainConfig
    from pretrain.recon.evaluate import EvalReconConfig
    from pretrain.recon.study import ReconStudyConfig

    assert load_config(PretrainConfig).run_root == "runs/pretrain"
    monkeypatch.setenv("MSKFM_RUNS", str(tmp_path))
    pre = load_config(PretrainConfig)
    assert pre.run_root == pre.storage_path == str(tmp_path / "pretrain")
    assert StudyConfig().out == str(tmp_path / "study") and SweepConfig().out == str(tmp_path / "sweep")
    assert TaskConfig().out == str(tmp_path / "finetune")
    assert EvalReconConfig().run_root == str(tmp_path / "eval-recon")
    assert ReconStudyConfig().run_root == str(tmp_path / "recon-study")


def test_sweeps_and_studies_take_a_ray_address():
    from downstream.studies.config import load_study
    from downstream.sweep import load_sweep

    study = load_study("label-efficiency", None, ["ray.address=ray://head:10001"])
    assert study.ray.address == "ray://head:10001"
    sweep = load_sweep("configs/sweeps/knee-dx-head.yaml", "knee-dx", ["ray.address=auto", "train.epochs=2"])
    assert sweep.ray.address == "auto" and sweep.overrides[-1] == "train.epochs=2"
    assert not any(o.startswith("ray.") for o in sweep.overrides)
