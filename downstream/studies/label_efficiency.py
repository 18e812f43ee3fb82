"""Label efficiency: the task trained on nested patient-level fractions of its labelled training set,
for the pretrained backbone and the baselines trained in the same run (random-init backbone,
from-scratch CNN), several seeds each; metric vs fraction with confidence bands."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..report import Report
from .config import StudyConfig
from .plots import plot_bands
from .summary import aggregate, errors_table, fmt_ci, paired_difference
from .trials import make_spec

PRETRAINED = "diffusion"


def plan(cfg: StudyConfig) -> list[dict]:
    return [make_spec(cfg.task, [*cfg.overrides, f"train.train_fraction={f}", f"train.seed={s}", f"metrics.seed={s}"],
                      {"fraction": f, "seed": s})
            for f in sorted(cfg.fractions) for s in cfg.seeds]


def report(cfg: StudyConfig, trials: pd.DataFrame, run_dir: Path) -> Report:
    metric = cfg.metric
    rep = Report(f"Label efficiency: {Path(cfg.task).stem} (macro {metric.upper()})")
    rep.text(f"Each cell: mean over seeds [{cfg.ci:.0%} CI]. Seeds redraw the nested patient subset and the head's "
             f"initialisation; with several seeds the interval is Student's t over seeds, with one seed it is the "
             f"trial's bootstrap over test patients. Evaluation: the task's test split, patient level.")
    agg = aggregate(trials, ["fraction", "model"], metric, cfg.ci)
    if agg.empty:
        rep.text("No trial finished.")
    else:
        rep.heading("Metric by training fraction")
        rep.table(_wide(agg))
        plots = run_dir / "plots"
        plots.mkdir(exist_ok=True)
        rep.image(plot_bands(agg, "fraction", "model", plots / "label_efficiency.png", "fraction of labelled training patients",
                             f"macro {metric.upper()} (test)", f"{Path(cfg.task).stem}: label efficiency"),
                  f"macro {metric.upper()} vs training fraction, {cfg.ci:.0%} bands")
        _differences(rep, trials, agg, metric, cfg.ci)
    failed = errors_table(trials)
    if len(failed):
        rep.heading("Failed trials")
        rep.table(failed)
    return rep


def _wide(agg: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for fraction, g in agg.groupby("fraction", sort=True):
        row = {"fraction": f"{fraction:g}", "train studies": f"{g['n_train'].iloc[0]:g}", "seeds": int(g["n_seeds"].max())}
        row |= {m: fmt_ci(r["mean"], r["lo"], r["hi"]) for m, r in g.set_index("model").iterrows()}
        rows.append(row)
    return pd.DataFrame(rows)


def _differences(rep: Report, trials: pd.DataFrame, agg: pd.DataFrame, metric: str, ci: float) -> None:
    baselines = sorted(set(agg["model"]) - {PRETRAINED})
    if PRETRAINED not in set(agg["model"]) or not baselines:
        return
    rep.heading("Pretrained minus baseline (paired by seed)")
    table, lines = [], []
    for base in baselines:
        diff = paired_difference(trials, ["fraction"], "model", PRETRAINED, base, metric, ci)
        for _, r in diff.iterrows():
            table.append({"fraction": f"{r['fraction']:g}", "baseline": base,
                          f"Δ macro {metric.upper()}": fmt_ci(r["difference"], r["lo"], r["hi"]),
                          "seeds": int(r["n_seeds"])})
        if len(diff):
            low = diff.iloc[0]
            verdict = ("above zero" if low["lo"] > 0 else "below zero" if low["hi"] < 0 else
                       "includes zero" if low["n_seeds"] > 1 else "has no interval (one seed)")
            lines.append(f"At the smallest fraction ({low['fraction']:g}) the pretrained backbone minus {base} is "
                         f"{fmt_ci(low['difference'], low['lo'], low['hi'])}; the interval {verdict}.")
    rep.table(pd.DataFrame(table))
    for line in lines:
        rep.text(line)
