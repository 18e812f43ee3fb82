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
        "max_concurrent_trials": 2, "overrides": [o for o in FAST if not o.startswith("features.pooling")]}))
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


@pytest.mark.integration
def test_sweep_best_head_and_from_sweep(sweep_env, ray_local, tmp_path):
    run = tmp_path / "sweep"
    assert cli.main(["sweep", "--task", str(sweep_env["task"]), "--space", str(sweep_env["space"]),
                     "--run-dir", str(run)]) == 0
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
                     "baselines.names=[]"]) == 0
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
