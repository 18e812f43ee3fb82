"""Label efficiency: the task trained on nested patient-level fractions of its labelled training set,
for the pretrained backbone and the baselines trained in the same run (random-init backbone,
from-scratch CNN, MRNet-style 2D), several seeds each; metric vs fraction with confidence bands,
per-label tables and paired pretrained-minus-baseline differences."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from shards.report import Report

from .config import StudyConfig
from .plots import plot_bands
from .summary import aggregate, errors_table, fmt_ci, paired_difference
from .trials import make_spec

PRETRAINED = ("diffusion", "probe")  # the task's head and the reference probe on the pretrained features


def plan(cfg: StudyConfig) -> list[dict]:
    return [make_spec(cfg.task, [*cfg.overrides, f"train.train_fraction={f}", f"train.seed={s}", f"metrics.seed={s}"],
                      {"fraction": f, "seed": s})
            for f in sorted(cfg.fractions) for s in cfg.seeds]


def report(cfg: StudyConfig, trials: pd.DataFrame, run_dir: Path) -> Report:
    metric = cfg.metric
    rep = Report(f"Label efficiency: {Path(cfg.task).stem} (macro {metric.upper()})")
    rep.text(f"Each cell: mean over seeds [{cfg.ci:.0%} CI]. Seeds redraw the nested patient subset and the head's "
             f"initialisation; with several seeds the interval is Student's t over seeds, with one seed it is the "
             f"trial's bootstrap over test patients. Evaluation: the task's test split, patient level. Models: "
             f"diffusion = the task's head on the pretrained backbone's features, probe = the reference logistic "
             f"probe on them; random_backbone (and _probe) = the same on a random-init copy of the backbone; "
             f"scratch_cnn = a 3D CNN trained from scratch; mrnet_2d = an MRNet-style 2D slice model.")
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
        _per_label(rep, trials, cfg.ci)
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


def _per_label(rep: Report, trials: pd.DataFrame, ci: float) -> None:
    labels = [c[len("auroc."):] for c in trials.columns
              if c.startswith("auroc.") and not c.endswith(("_lo", "_hi"))]
    if not labels:
        return
    rep.heading("Per-label AUROC")
    rep.text("Mean over seeds [CI] per label, fraction and model (test split, patient level).")
    cells: dict = {}
    for label in labels:
        for _, r in aggregate(trials, ["fraction", "model"], f"auroc.{label}", ci).iterrows():
            cells.setdefault((r["fraction"], r["model"]), {})[label] = fmt_ci(r["mean"], r["lo"], r["hi"], 2)
    rep.table(pd.DataFrame([{"fraction": f"{f:g}", "model": m} | row for (f, m), row in sorted(cells.items())]))


def _differences(rep: Report, trials: pd.DataFrame, agg: pd.DataFrame, metric: str, ci: float) -> None:
    models = set(agg["model"])
    pretrained = [m for m in PRETRAINED if m in models]
    baselines = sorted(models - set(PRETRAINED))
    if not pretrained or not baselines:
        return
    rep.heading("Pretrained minus baseline (paired by seed)")
    table, lines = [], []
    for model in pretrained:
        for base in baselines:
            diff = paired_difference(trials, ["fraction"], "model", model, base, metric, ci)
            for _, r in diff.iterrows():
                table.append({"fraction": f"{r['fraction']:g}", "pretrained": model, "baseline": base,
                              f"Δ macro {metric.upper()}": fmt_ci(r["difference"], r["lo"], r["hi"]),
                              "seeds": int(r["n_seeds"])})
            for _, r in diff[diff["fraction"].isin([diff["fraction"].min(), 0.1])].iterrows():
                lines.append(f"At fraction {r['fraction']:g}, {model} minus {base} is "
                             f"{fmt_ci(r['difference'], r['lo'], r['hi'])}; the interval {_verdict(r)}.")
    rep.table(pd.DataFrame(table))
    for line in lines:
        rep.text(line)


def _verdict(r) -> str:
    if r["n_seeds"] < 2:
        return "has no interval (one seed)"
    return "is above zero" if r["lo"] > 0 else "is below zero" if r["hi"] < 0 else "includes zero"
