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
from .summary import PatientBootstrap, aggregate, errors_table, fmt_ci, paired_difference
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
        _differences(rep, trials, agg, metric, cfg.ci, run_dir)
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
    labels = _labels(trials)
    if not labels:
        return
    rep.heading("Per-label AUROC")
    rep.text("Mean over seeds [CI] per label, fraction and model (test split, patient level).")
    cells: dict = {}
    for label in labels:
        for _, r in aggregate(trials, ["fraction", "model"], f"auroc.{label}", ci).iterrows():
            cells.setdefault((r["fraction"], r["model"]), {})[label] = fmt_ci(r["mean"], r["lo"], r["hi"], 2)
    rep.table(pd.DataFrame([{"fraction": f"{f:g}", "model": m} | row for (f, m), row in sorted(cells.items())]))


def _differences(rep: Report, trials: pd.DataFrame, agg: pd.DataFrame, metric: str, ci: float,
                 run_dir: Path) -> None:
    models = set(agg["model"])
    pretrained = [m for m in PRETRAINED if m in models]
    baselines = sorted(models - set(PRETRAINED))
    if not pretrained or not baselines:
        return
    bootstrap = metric == "auroc" and (run_dir / "trials").is_dir()
    rep.heading("Pretrained minus baseline (paired)")
    rep.text(f"Δ = pretrained minus baseline, mean over seeds. Two {ci:.0%} intervals: Student's t over the "
             f"per-seed differences (seed-to-seed variation; wide with few seeds) and"
             + (" a paired bootstrap over the test patients (1,000 draws; each draw resamples the patients once "
                "for both models and every seed, so it is the interval test-set sampling leaves around the "
                "seed-mean difference)." if bootstrap else " no patient bootstrap (only for AUROC)."))
    boot = PatientBootstrap(run_dir, _labels(trials)) if bootstrap else None
    table, lines = [], []
    for model in pretrained:
        for base in baselines:
            diff = paired_difference(trials, ["fraction"], "model", model, base, metric, ci)
            for _, r in diff.iterrows():
                row = {"fraction": f"{r['fraction']:g}", "pretrained": model, "baseline": base,
                       f"Δ macro {metric.upper()} [t over seeds]": fmt_ci(r["difference"], r["lo"], r["hi"]),
                       "seeds": int(r["n_seeds"])}
                paired = boot.difference(_paired_trials(trials, r["fraction"], model, base), model, base, ci) if boot else None
                if boot:
                    row["[patient bootstrap]"] = f"[{paired['lo']:.3f}, {paired['hi']:.3f}]" if paired else "n/a"
                table.append(row)
                if r["fraction"] in (diff["fraction"].min(), 0.1):
                    lines.append(_line(r, model, base, paired))
    rep.table(pd.DataFrame(table))
    for line in lines:
        rep.text(line)


def _labels(trials: pd.DataFrame) -> list[str]:
    return [c[len("auroc."):] for c in trials.columns if c.startswith("auroc.") and not c.endswith(("_lo", "_hi"))]


def _paired_trials(trials: pd.DataFrame, fraction: float, a: str, b: str) -> list[str]:
    """Trials (one per seed) at ``fraction`` where both ``a`` and ``b`` finished."""
    ok = trials[trials["error"].isna() & (trials["fraction"] == fraction)]
    both = set(ok[ok["model"] == a]["trial"]) & set(ok[ok["model"] == b]["trial"])
    return sorted(both)


def _line(r, model: str, base: str, boot: dict | None) -> str:
    text = f"At fraction {r['fraction']:g}, {model} minus {base} is {fmt_ci(r['difference'], r['lo'], r['hi'])} over seeds; "
    text += "one seed gives no such interval" if r["n_seeds"] < 2 else f"that interval {_verdict(r['lo'], r['hi'])}"
    if boot is not None:
        text += (f"; the paired patient-bootstrap interval [{boot['lo']:.3f}, {boot['hi']:.3f}] "
                 f"{_verdict(boot['lo'], boot['hi'])}")
    return text + "."


def _verdict(lo: float, hi: float) -> str:
    return "is above zero" if lo > 0 else "is below zero" if hi < 0 else "includes zero"
