"""The label-efficiency benchmark script end to end at tiny scale: shards with a `pretrain` pool,
three knee backbones from `pretrain run`, the label-efficiency and transfer studies with all three
baselines and their reports; a rerun resumes every stage instead of redoing it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_label_efficiency.sh"
TINY = {
    "BENCH_SHARDS_ARGS": "synth.n_patients=90 synth.joint_weights=[0.6,0.2,0.2] synth.shape.sag=[8,32,32] "
                         "synth.shape.cor=[8,32,32] synth.shape.ax=[8,32,32] shard_max_bytes=2000000 workers=1 "
                         "splits.pretrain=0.3 splits.train=0.4 splits.val=0.1 splits.test=0.2",
    "BENCH_PRETRAIN_ARGS": "launcher=local optim.total_steps=2 optim.warmup_steps=1 checkpoint_every=2 log_every=1 "
                           "batch_size=2",
    "BENCH_STUDY_ARGS": "seeds=[0] max_concurrent_trials=2",
    "BENCH_LE_ARGS": 'fractions=[0.1,1.0] overrides=["shards=data/shards/bench","cache_dir=cache/bench",'
                     '"backbones.sag=hub/bench/knee-sag","backbones.cor=hub/bench/knee-cor","backbones.ax=hub/bench/knee-ax",'
                     '"train.cover_labels=true","labels=[effusion,cartilage_bml]","train.epochs=3",'
                     '"baselines.epochs=1","metrics.bootstrap=20","features.timesteps=[10]","features.blocks=[mid]",'
                     '"features.pooling=avg"]',
    "BENCH_TRANSFER_ARGS": 'targets=[ankle-dx] seeds=[0] overrides=["shards=data/shards/bench","cache_dir=cache/bench",'
                           '"fusion.kind=concat","labels=[atfl]","train.epochs=3","baselines.epochs=1",'
                           '"metrics.bootstrap=20","features.timesteps=[10]","features.blocks=[mid]","features.pooling=avg"]',
}


def run_bench(root: Path) -> str:
    env = os.environ | TINY | {"BENCH_ROOT": str(root), "PYTHON": sys.executable}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.integration
@pytest.mark.timeout(1800)  # two runs of the whole pipeline; ~3 min each on an idle machine, 10 on a loaded one
def test_bench_label_efficiency_tiny_end_to_end_then_resumes(tmp_path):
    run_bench(tmp_path)
    for plane in ("sag", "cor", "ax"):
        assert (tmp_path / "hub" / "bench" / f"knee-{plane}" / "config.json").is_file()
    assert (tmp_path / "runs/pretrain/bench-knee/config.yaml").read_text().count("split: pretrain") == 1

    le = tmp_path / "runs/study/label-efficiency-bench"
    trials = pd.read_csv(le / "trials.csv")
    assert trials["error"].isna().all(), trials["error"].dropna().tolist()
    assert {"diffusion", "random_backbone", "scratch_cnn", "mrnet_2d"} <= set(trials["model"])
    assert {"auroc.effusion", "auroc.cartilage_bml"} <= set(trials.columns)
    small = trials[trials["fraction"] == 0.1]
    assert (small["n_train"] < trials[trials["fraction"] == 1.0]["n_train"].min()).all()
    md = (le / "report.md").read_text()
    for heading in ("Metric by training fraction", "Pretrained minus baseline", "Per-label AUROC"):
        assert heading in md
    for base in ("random_backbone", "scratch_cnn", "mrnet_2d"):
        assert f"| diffusion | {base} |" in md
    assert (le / "plots" / "label_efficiency.png").is_file() and (le / "report.html").is_file()
    mean = trials[(trials["model"] == "scratch_cnn") & (trials["fraction"] == 1.0)]["auroc.effusion"].mean()
    assert f"| 1 | scratch_cnn | {mean:.2f}" in md

    tr = tmp_path / "runs/study/transfer-bench"
    ttrials = pd.read_csv(tr / "trials.csv")
    assert ttrials["error"].isna().all() and set(ttrials["target"]) == {"ankle-dx"}
    tmd = (tr / "report.md").read_text()
    assert "knee ['knee']" in tmd and "random init" in tmd and "mrnet_2d" in tmd

    before = {p: p.stat().st_mtime for p in (le / "trials").rglob("metrics.json")}
    out = run_bench(tmp_path)
    after = {p: p.stat().st_mtime for p in (le / "trials").rglob("metrics.json")}
    assert before == after  # no trial ran again
    assert pd.read_csv(le / "trials.csv")["auroc"].tolist() == trials["auroc"].tolist()
    times = pd.read_csv(tmp_path / "runs/bench/label-efficiency/timings.tsv", sep="\t")
    assert list(times["stage"]) == ["shards", "pretrain", "publish", "label-efficiency", "transfer"] * 2
    assert "(0 generated now" in out
