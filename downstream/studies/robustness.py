"""Robustness to acquisition shift: train on one site / vendor / field strength, test on each.

The drop for a test domain E and a training domain T != E is (trained on E, tested on E) minus
(trained on T, tested on E), paired by seed: the same test studies on both sides, so the drop
measures the shift, not a harder test set. Training sets of different domains differ in size;
the table shows the number of training studies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from shards.report import Report

from ..data import domain_values, load_studies
from ..finetune import resolve_task
from .config import StudyConfig
from .plots import plot_heatmap
from .summary import aggregate, errors_table, fmt_ci, seed_interval
from .trials import make_spec

PRETRAINED = "diffusion"


def domains(cfg: StudyConfig) -> list[str]:
    if cfg.domains:
        return [str(d) for d in cfg.domains]
    return domain_values(load_studies(resolve_task(cfg.task, cfg.overrides)), cfg.domain_key)


def plan(cfg: StudyConfig) -> list[dict]:
    values = domains(cfg)
    return [make_spec(cfg.task, [*cfg.overrides, f"train.domain_key={cfg.domain_key}",
                                 f"train.train_domain={json.dumps(t)}", f"train.eval_domain={json.dumps(e)}",
                                 f"train.seed={s}", f"metrics.seed={s}"],
                      {"train_domain": t, "eval_domain": e, "seed": s})
            for t in values for e in values for s in cfg.seeds]


def report(cfg: StudyConfig, trials: pd.DataFrame, run_dir: Path) -> Report:
    metric, key = cfg.metric, cfg.domain_key
    rep = Report(f"Robustness across {key}: {Path(cfg.task).stem} (macro {metric.upper()})")
    rep.text(__doc__.split("\n\n", 1)[1].replace("\n", " ").strip())
    agg = aggregate(trials, ["model", "train_domain", "eval_domain"], metric, cfg.ci)
    if agg.empty:
        rep.text("No trial finished.")
    else:
        plots = run_dir / "plots"
        plots.mkdir(exist_ok=True)
        for model, g in agg.groupby("model", sort=True):
            cells = g.assign(cell=[fmt_ci(m, lo, hi) for m, lo, hi in zip(g["mean"], g["lo"], g["hi"])])
            rep.heading(f"{model}: trained on (rows) / tested on (columns) {key}")
            train_n = g.groupby("train_domain")["n_train"].first()
            table = cells.pivot(index="train_domain", columns="eval_domain", values="cell")
            table.insert(0, "train studies", [f"{train_n[d]:g}" for d in table.index])
            rep.table(table.reset_index().rename(columns={"train_domain": f"train {key}"}))
            matrix = g.pivot(index="train_domain", columns="eval_domain", values="mean")
            rep.image(plot_heatmap(matrix, plots / f"robustness_{model}.png", f"{model}: macro {metric.upper()}",
                                   f"test {key}", f"train {key}", cmap="RdYlGn", center=0.5),
                      f"{model}: train x test {key}")
        rep.heading("Drop under shift (in-domain minus cross-domain, same test studies, paired by seed)")
        rep.table(drops(trials, metric, cfg.ci))
    failed = errors_table(trials)
    if len(failed):
        rep.heading("Failed trials")
        rep.table(failed)
    return rep


def drops(trials: pd.DataFrame, metric: str, ci: float) -> pd.DataFrame:
    ok = trials[trials["error"].isna() & trials["model"].notna()]
    values = ok.set_index(["model", "train_domain", "eval_domain", "seed"])[metric]
    rows = []
    for model in sorted(ok["model"].unique()):
        for test in sorted(ok["eval_domain"].unique()):
            for train in sorted(ok["train_domain"].unique()):
                if train == test:
                    continue
                diffs = [values.get((model, test, test, s)) - values.get((model, train, test, s))
                         for s in sorted(ok["seed"].unique())
                         if (model, test, test, s) in values.index and (model, train, test, s) in values.index]
                mean, lo, hi, n = seed_interval(diffs, ci)
                rows.append({"model": model, "test": test, "trained on": train,
                             f"drop in macro {metric.upper()}": fmt_ci(mean, lo, hi), "seeds": n})
    return pd.DataFrame(rows)
