"""Cross-joint transfer: backbones pretrained on each source (one joint, another joint, all joints)
fine-tuned on each target task; a source x target matrix against the random-init backbone."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from shards.report import Report

from ..finetune import resolve_task
from .config import StudyConfig
from .plots import plot_heatmap
from .pretrained import backbone_overrides, needed
from .summary import aggregate, errors_table, fmt_ci, paired_difference
from .trials import make_spec

PRETRAINED, PROBE, RANDOM = "diffusion", "probe", "random_backbone"


def _row(cfg: StudyConfig, source: str, model: str) -> str:
    """Table row of a model: the pretrained source (its head, its reference probe) or the baseline."""
    if model in (PRETRAINED, PROBE):
        return f"{source} {cfg.sources.get(source, [])}" + (" probe" if model == PROBE else "")
    return {RANDOM: "random init", f"{RANDOM}_probe": "random init probe"}.get(model, model)


def backbones(cfg: StudyConfig) -> list[dict]:
    return needed(cfg, cfg.targets, [0])


def plan(cfg: StudyConfig) -> list[dict]:
    """Baselines (random init, scratch CNN) do not depend on the source: trained with the first only."""
    specs = []
    for target in cfg.targets:
        planes = resolve_task(target, cfg.overrides).planes
        for i, source in enumerate(cfg.sources):
            extra = [] if i == 0 else ["baselines.names=[]"]
            for s in cfg.seeds:
                specs.append(make_spec(target, [*cfg.overrides, *backbone_overrides(cfg, source, planes), *extra,
                                                f"train.seed={s}", f"metrics.seed={s}"],
                                       {"target": target, "source": source, "seed": s}))
    return specs


def report(cfg: StudyConfig, trials: pd.DataFrame, run_dir: Path) -> Report:
    metric = cfg.metric
    rep = Report(f"Cross-joint transfer (macro {metric.upper()})")
    rep.text("Rows: where the backbone was pretrained (joints in brackets); columns: target task. Cells: mean over "
             f"seeds [{cfg.ci:.0%} CI]. 'probe' rows: the reference logistic probe on the same features. 'random init' "
             "is the same architecture with random weights, 'scratch_cnn' a 3D CNN and 'mrnet_2d' an MRNet-style 2D "
             "model trained from scratch on the target; baselines are trained in the first source's trials.")
    ok = trials[trials["model"].notna()].copy()
    ok["row"] = ok.apply(lambda r: _row(cfg, r["source"], r["model"]), axis=1)
    agg = aggregate(ok, ["row", "target"], metric, cfg.ci)
    if agg.empty:
        rep.text("No trial finished.")
    else:
        first = [_row(cfg, s, m) for s in cfg.sources for m in (PRETRAINED, PROBE)]
        order = first + sorted(set(agg["row"]) - set(first))
        cells = agg.assign(cell=[fmt_ci(m, lo, hi) for m, lo, hi in zip(agg["mean"], agg["lo"], agg["hi"])])
        table = cells.pivot(index="row", columns="target", values="cell").reindex([r for r in order if r in set(agg["row"])])
        rep.heading("Source x target")
        rep.table(table.reset_index().rename(columns={"row": "pretrained on"}))
        matrix = agg.pivot(index="row", columns="target", values="mean").reindex(table.index)[list(table.columns)]
        plots = run_dir / "plots"
        plots.mkdir(exist_ok=True)
        rep.image(plot_heatmap(matrix, plots / "transfer_matrix.png", f"macro {metric.upper()} (test)", "target task",
                               "backbone pretrained on", cmap="RdYlGn", center=0.5),
                  "source x target heatmap of the mean metric")
        rep.text(_in_joint_note(cfg))
        _differences(rep, cfg, ok)
    failed = errors_table(trials)
    if len(failed):
        rep.heading("Failed trials")
        rep.table(failed)
    return rep


def _differences(rep: Report, cfg: StudyConfig, ok: pd.DataFrame) -> None:
    """Pretrained (first source) minus each baseline, paired by seed, per target."""
    first = ok[ok["source"] == next(iter(cfg.sources))]
    baselines = sorted(set(first["model"]) - {PRETRAINED, PROBE})
    rows = []
    for model in (PRETRAINED, PROBE):
        for base in baselines:
            diff = paired_difference(first, ["target"], "model", model, base, cfg.metric, cfg.ci)
            rows += [{"target": r["target"], "pretrained": _row(cfg, next(iter(cfg.sources)), model), "baseline": base,
                      f"Δ macro {cfg.metric.upper()}": fmt_ci(r["difference"], r["lo"], r["hi"]),
                      "seeds": int(r["n_seeds"])} for _, r in diff.iterrows()]
    if rows:
        rep.heading("Pretrained minus baseline (paired by seed)")
        rep.table(pd.DataFrame(rows))


def _in_joint_note(cfg: StudyConfig) -> str:
    notes = []
    for target in cfg.targets:
        joint = resolve_task(target, cfg.overrides).joint
        same = [s for s, j in cfg.sources.items() if list(j) == [joint]]
        notes.append(f"{target}: in-joint source {same[0] if same else '(none in the grid)'}")
    return "In-joint reference per target: " + "; ".join(notes) + "."
