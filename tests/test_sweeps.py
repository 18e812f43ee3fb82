"""Sweeps: bad spaces fail before Ray; a tiny ASHA sweep on cached features, its best head re-run
with ``finetune --from-sweep``; an interrupted sweep (SIGINT) resumes when run again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from downstream import cli
from downstream.studies.config import StudyBackboneSpec
from downstream.studies.pretrained import train_backbone
from downstream.sweep import load_sweep
from shards.config import ConfigError
from tests.test_downstream import task_args
from tests.test_studies import FAST, write_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep_env(study_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_env")
    train_backbone(str(study_shards), ["knee"], "sag", 0, str(root / "hub" / "knee-sag"), StudyBackboneSpec(steps=3),
                   root / "pretrain")
    task = write_task(root, "knee-t", "knee", ["acl", "effusion", "medial_meniscus"], study_shards, root / "hub")
    space = root / "space.yaml"
    space.write_text(json.dumps({
        "space": {"train.lr": {"loguniform": [1e-3, 3e-2]}, "features.pooling": {"choice": ["avg", "attention"]},
                  "features.timesteps": {"grid": [[10], [60]]}},
        "num_samples": 2, "scheduler": {"grace_period": 2, "reduction_factor": 2, "report_every": 2},
        "max_concurrent_trials": 2,
        "overrides": [*[o for o in FAST if not o.startswith("features.pooling")], "train.weight_decay_grid=[0.001]"]}))
    return {"root": root, "task": task, "space": space}


def test_bad_space_is_refused():
    with pytest.raises(ConfigError, match="space is empty"):
        load_sweep(None, "knee-dx")
    with pytest.raises(ConfigError, match=r"space.train.lr must be one of"):
        load_sweep(None, "knee-dx", ["space={train.lr: {normal: [0, 1]}}"])
    with pytest.raises(ConfigError, match="changes the cached features"):
        load_sweep(None, "knee-dx", ["space={features.timesteps: {randint: [1, 99]}}"])
    cfg = load_sweep(None, "knee-dx", ["space={train.lr: {grid: [0.1]}}", "num_samples=3", "train.epochs=2"])
    assert cfg.num_samples == 3 and cfg.overrides == ["train.epochs=2"]


def test_scheduler_is_checked_against_the_task_before_ray(tmp_path):
    from downstream.sweep import run_sweep

    cfg = load_sweep(ROOT / "configs/sweeps/knee-dx-head.yaml", "knee-dx", ["scheduler.grace_period=20"])
    with pytest.raises(ConfigError, match=r"'scheduler.grace_period' \(20 reports\) must lie in \[1, 16\]: "
                                          r"'train.epochs' 80 epochs / 'scheduler.report_every' 5"):
        run_sweep(cfg, tmp_path / "run")  # the demo shards and backbones need not exist: refused first
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="'scheduler.max_t' 4 epochs"):
        load_sweep(None, "knee-dx", ["space={train.lr: {grid: [0.1]}}", "scheduler.max_t=4",
                                     "scheduler.report_every=5"]).scheduler.rungs(40)


def test_shipped_sweeps_fit_their_tasks():
    """Every shipped sweep config (a `space`) passes the checks made before Ray for the task its header
    names: scheduler, metric and model, every discrete combination of its space."""
    import re

    from downstream.finetune import resolve_task
    from downstream.sweep import check_combinations, selection_target

    shipped = [p for p in sorted((ROOT / "configs/sweeps").glob("*.yaml")) if "\nspace:" in p.read_text()]
    assert shipped
    for path in shipped:
        task = re.search(r"--task (\S+)", path.read_text()).group(1)
        cfg = load_sweep(path, task)
        assert cfg.scheduler.rungs(resolve_task(task, cfg.overrides).train.epochs) >= cfg.scheduler.grace_period
        selection_target(cfg, resolve_task(task, cfg.overrides))
        check_combinations(cfg)
    assert {"knee-dx-head.yaml", "knee-dx-ehr-head.yaml", "knee-seg-head.yaml"} <= {p.name for p in shipped}


def test_label_level_fusion_weighs_each_plane_per_label():
    """Two planes, three labels (the transposed weights once broadcast only when planes == labels)."""
    import torch

    import numpy as np

    from downstream.heads.fusion import LabelLevelFusion
    from downstream.train import fit_standardizers

    torch.manual_seed(0)
    model = LabelLevelFusion({"sag": [4], "cor": [4]}, 3)
    with torch.no_grad():
        model.mix.copy_(torch.randn(2, 3))
    inputs = {p: [torch.randn(5, 4, 2, 3, 3)] for p in ("sag", "cor")}
    fit_standardizers(model, lambda idx: ({p: [a[0][idx]] for p, a in inputs.items()}, None), np.arange(5))
    w = model.fusion_weights()
    expected = w[0] * model.experts["sag"](inputs) + w[1] * model.experts["cor"](inputs)
    assert torch.allclose(model(inputs), expected)


def test_every_shipped_sweeps_config_loads():
    """configs/sweeps/ holds sweeps (a `space`), studies (named by their kind) and recon studies: each loads
    with its own schema (quick block included), so none drifts from the code."""
    from downstream.studies.config import KINDS, load_study
    from pretrain.recon.study import ReconStudyConfig
    from shards.config import load_config

    for path in sorted((ROOT / "configs/sweeps").glob("*.yaml")):
        if "\nspace:" in path.read_text():
            continue  # test_shipped_sweeps_fit_their_tasks
        kind = next((k for k in KINDS if path.stem.startswith(k)), None)  # e.g. transfer-bench.yaml
        if kind is not None:
            load_study(kind, path)
            if "\nquick:" in path.read_text():
                load_study(kind, path, quick=True)
        else:
            assert path.stem.startswith("recon-"), f"{path.name}: neither a sweep, a study nor a recon study"
            load_config(ReconStudyConfig, path)


def test_selection_target_fits_the_task():
    from downstream.finetune import resolve_task
    from downstream.sweep import selection_target

    base = ["space={train.lr: {grid: [0.1]}}"]
    assert selection_target(load_sweep(None, "knee-seg", base), resolve_task("knee-seg")) == ("dice", "diffusion")
    assert selection_target(load_sweep(None, "knee-dx-ehr", base), resolve_task("knee-dx-ehr")) \
        == ("auroc", "diffusion+ehr")
    with pytest.raises(ConfigError, match="key 'metric' 'auroc' does not score a segmentation task"):
        selection_target(load_sweep(None, "knee-seg", [*base, "metric=auroc"]), resolve_task("knee-seg"))
    with pytest.raises(ConfigError, match="key 'model' 'ehr_only' is not trained by task 'knee-dx'"):
        selection_target(load_sweep(None, "knee-dx", [*base, "model=ehr_only"]), resolve_task("knee-dx"))
    from downstream.sweep import per_epoch

    assert per_epoch(resolve_task("knee-dx", ["train.weight_decay_grid=[0.01]"]))
    assert not per_epoch(resolve_task("knee-dx"))  # a weight-decay grid: the task's own selection, one report
    with pytest.raises(ConfigError, match="'select_split' may not be the test split"):
        load_sweep(None, "knee-dx", [*base, "select_split=test"])


@pytest.mark.integration
@pytest.mark.parametrize("task, extra, metric", [
    ("knee-dx", ["planes=[sag]", "head.finetune_blocks=[mid]"], "auroc"),
    ("knee-seg", ["planes=[sag]"], "dice"),
    ("knee-dx", ["planes=[sag,cor]", "fusion.kind=experts", "fusion.folds=2"], "auroc"),
], ids=["partial-finetuning", "segmentation", "plane-experts"])
def test_volume_heads_are_scored_on_the_selection_split(task, extra, metric, tiny_shards, tiny_hub, tmp_path):
    """What a trial of these heads runs: the task's own training, scored on val rows only."""
    from downstream.data import check_task, load_studies, split_rows
    from downstream.features import FeatureCache
    from downstream.inputs import prepare_planes
    from downstream.sweep import per_epoch, selection_scores, trial_task

    t = trial_task(task, [*task_args(tiny_shards, tiny_hub, tmp_path, planes=("sag", "cor")), *extra], {}, "val")
    assert not per_epoch(t) and t.baselines.names == []
    manifest = check_task(t)
    frame = load_studies(t)
    train_rows, select_rows = split_rows(frame, t)
    assert set(frame["split"].iloc[select_rows]) == {"val"} and set(frame["split"].iloc[train_rows]) == {"train"}
    planes = prepare_planes(t, list(frame["key"]), manifest, FeatureCache(t.cache_dir))
    scores = selection_scores(t, frame, planes, train_rows, select_rows)
    assert list(scores) == ["diffusion"] and 0.0 <= scores["diffusion"][metric] <= 1.0


@pytest.mark.integration
def test_sweep_of_ehr_fusion(tiny_shards, tiny_hub, ray_local, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(json.dumps({"space": {"fusion.kind": {"grid": ["experts", "label_level"]}},
                                 "scheduler": {"grace_period": 1, "report_every": 1}, "max_concurrent_trials": 2}))
    run = tmp_path / "sweep"
    args = [*task_args(tiny_shards, tiny_hub, tmp_path, planes=("sag", "cor")), "planes=[sag,cor]", "train.epochs=2"]
    argv = ["sweep", "--task", "knee-dx-ehr", "--space", str(space), "--run-dir", str(run), *args]
    assert cli.main(argv) == 2  # EHR fusion with plane experts: refused before Ray, naming the values
    assert 'fusion.kind="experts"' in capsys.readouterr().err and not run.exists()
    space.write_text(space.read_text().replace('"experts"', '"projected_sum"'))
    assert cli.main(argv) == 0
    trials = pd.read_csv(run / "trials.csv")
    assert len(trials) == 2 and trials["error"].isna().all(), trials.to_string()
    assert sorted(trials["param:fusion.kind"]) == ['"label_level"', '"projected_sum"']
    best = json.loads((run / "best.json").read_text())
    assert best["metric"] == "val auroc of diffusion+ehr"
    # the driver cached volumes and features once per plane; trials only read them
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    kinds = [json.loads((p / "parts.json").read_text())["kind"] for p in entries]
    assert kinds.count("features") == 2 and kinds.count("volumes") == 2


@pytest.mark.integration
def test_sweep_best_head_and_from_sweep(sweep_env, ray_local, tmp_path):
    run = tmp_path / "sweep"
    assert cli.main(["sweep", "--task", str(sweep_env["task"]), "--space", str(sweep_env["space"]),
                     "--run-dir", str(run), "wandb.project=mskfm-test"]) == 0
    assert len(list((run / "wandb").glob("offline-run-*/run-*.wandb"))) == 1  # W&B offline (tests set WANDB_MODE)
    trials = pd.read_csv(run / "trials.csv")
    assert len(trials) == 4 and trials["error"].isna().all()
    assert sorted(trials["param:features.timesteps"]) == ["[10]", "[10]", "[60]", "[60]"]
    best = json.loads((run / "best.json").read_text())
    assert best["value"] == pytest.approx(trials["val_auroc"].max(), abs=1e-5)
    row = trials.loc[trials["val_auroc"].idxmax()]
    assert best["params"]["train.lr"] == pytest.approx(float(row["param:train.lr"]))
    # features were computed once per timestep setting (+ the volumes), by the driver
    entries = [p for p in (sweep_env["root"] / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    kinds = [json.loads((p / "parts.json").read_text())["kind"] for p in entries]
    assert kinds.count("features") == 2 and kinds.count("volumes") == 1

    ft = tmp_path / "ft"
    assert cli.main(["finetune", "--task", str(sweep_env["task"]), "--from-sweep", str(run), "--run-dir", str(ft),
                     "baselines.names=[]", "wandb.project=mskfm-test"]) == 0
    assert len(list((ft / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    assert not any((run / "trials").rglob("wandb"))  # trials without wandb configured write none
    import yaml

    resolved = yaml.safe_load((ft / "config.yaml").read_text())
    assert resolved["train"]["lr"] == pytest.approx(best["params"]["train.lr"])
    assert resolved["features"]["pooling"] == best["params"]["features.pooling"]
    assert resolved["train"]["eval_split"] == "test"
    assert cli.main(["finetune", "--task", "knee-dx", "--from-sweep", str(run)]) == 2


@pytest.mark.integration
def test_interrupted_sweep_resumes(sweep_env, ray_local, tmp_path):
    run = tmp_path / "sweep"
    argv = ["sweep", "--task", str(sweep_env["task"]), "--space", str(sweep_env["space"]), "--run-dir", str(run),
            "max_concurrent_trials=1", "train.epochs=1000", "scheduler.report_every=50",
            "scheduler.grace_period=20"]  # 20 reports, no early stop: seconds per trial, not milliseconds
    env = os.environ | {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "downstream", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not _finished_trials(run):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out[-3000:]
    assert "run the same command again to resume" in out, out[-3000:]
    done_before = _finished_trials(run)
    assert 1 <= len(done_before) < 4 and not (run / "best.json").exists()
    results = {p: p.read_text() for p in done_before}  # each result line carries its time stamp

    assert cli.main(argv) == 0                      # the same command: resumes
    trials = pd.read_csv(run / "trials.csv")
    assert len(trials) == 4 and trials["error"].isna().all() and (run / "best.json").is_file()
    assert {p: p.read_text() for p in done_before} == results   # finished trials were not re-run
    assert len(_finished_trials(run)) == 4


def _finished_trials(run: Path) -> list[Path]:
    """result.json of trials whose last result is final (Tune writes ``done: true``)."""
    done = []
    for path in (run / "tune").glob("*/result.json"):
        lines = path.read_text().strip().splitlines()
        if lines and json.loads(lines[-1]).get("done"):
            done.append(path)
    return sorted(done)
