"""Multi-anatomy scaling: backbones pretrained on one joint vs on all joints at several pretraining
data sizes (nested study subsets), each fine-tuned on the task; metric vs pretraining size."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from shards.config import ConfigError
from shards.report import Report

from ..finetune import resolve_task
from .config import StudyConfig
from .plots import plot_bands
from .pretrained import backbone_name, backbone_overrides, needed
from .summary import aggregate, errors_table, fmt_ci
from .trials import make_spec

PRETRAINED = "diffusion"


def _sizes(cfg: StudyConfig) -> list[int]:
    if any(s <= 0 for s in cfg.sizes):
        raise ConfigError(f"study multi-anatomy: sizes must be positive numbers of pretraining studies, got {cfg.sizes}")
    return sorted(cfg.sizes)


def backbones(cfg: StudyConfig) -> list[dict]:
    return needed(cfg, [cfg.task], _sizes(cfg))


def plan(cfg: StudyConfig) -> list[dict]:
    planes = resolve_task(cfg.task, cfg.overrides).planes
    specs = []
    for i, (source, size) in enumerate((s, n) for s in cfg.sources for n in _sizes(cfg)):
        extra = [] if i == 0 else ["baselines.names=[]"]
        for seed in cfg.seeds:
            specs.append(make_spec(cfg.task, [*cfg.overrides, *backbone_overrides(cfg, backbone_name(source, size), planes),
                                              *extra, f"train.seed={seed}", f"metrics.seed={seed}"],
                                   {"source": source, "size": size, "seed": seed}))
    return specs


def report(cfg: StudyConfig, trials: pd.DataFrame, run_dir: Path) -> Report:
    metric = cfg.metric
    rep = Report(f"Multi-anatomy pretraining: {Path(cfg.task).stem} (macro {metric.upper()})")
    rep.text("Backbones pretrained on one joint or on several joints, on nested subsets of the pretraining studies "
             f"(train split only), then fine-tuned on {cfg.task}. Cells: mean over seeds [{cfg.ci:.0%} CI].")
    pre = trials[trials["model"] == PRETRAINED].copy()
    pre["pretraining"] = [f"{s} {cfg.sources.get(s, [])}" for s in pre["source"]]
    agg = aggregate(pre, ["pretraining", "size"], metric, cfg.ci)
    if agg.empty:
        rep.text("No trial finished.")
    else:
        agg["cell"] = [fmt_ci(m, lo, hi) for m, lo, hi in zip(agg["mean"], agg["lo"], agg["hi"])]
        table = agg.pivot(index="size", columns="pretraining", values="cell").reset_index()
        rep.heading("Metric by pretraining size")
        rep.table(table.rename(columns={"size": "pretraining studies"}))
        plots = run_dir / "plots"
        plots.mkdir(exist_ok=True)
        rep.image(plot_bands(agg, "size", "pretraining", plots / "multi_anatomy.png", "pretraining studies",
                             f"macro {metric.upper()} (test)", f"{cfg.task}: downstream vs pretraining size"),
                  "downstream metric vs pretraining data size")
    refs = aggregate(trials[trials["model"].notna() & (trials["model"] != PRETRAINED)], ["model"], metric, cfg.ci)
    if len(refs):
        rep.heading("References without pretraining")
        rep.table(pd.DataFrame({"model": refs["model"], f"macro {metric.upper()}":
                                [fmt_ci(m, lo, hi) for m, lo, hi in zip(refs["mean"], refs["lo"], refs["hi"])]}))
    failed = errors_table(trials)
    if len(failed):
        rep.heading("Failed trials")
        rep.table(failed)
    return rep
