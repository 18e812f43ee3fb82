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
from .summary import PatientBootstrap, aggregate, errors_table, fmt_ci, paired_difference
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
        _differences(rep, cfg, ok, run_dir)
    failed = errors_table(trials)
    if len(failed):
        rep.heading("Failed trials")
        rep.table(failed)
    return rep


def _differences(rep: Report, cfg: StudyConfig, ok: pd.DataFrame, run_dir: Path) -> None:
    """Pretrained (first source) minus each baseline per target: t interval over seeds and, for AUROC,
    the paired bootstrap over the target's test patients (see ``summary.PatientBootstrap``)."""
    first = ok[(ok["source"] == next(iter(cfg.sources))) & ok["error"].isna()]
    baselines = sorted(set(first["model"]) - {PRETRAINED, PROBE})
    boots = {target: PatientBootstrap(run_dir, _target_labels(group)) for target, group in first.groupby("target")}
    rows = []
    for model in (PRETRAINED, PROBE):
        for base in baselines:
            diff = paired_difference(first, ["target"], "model", model, base, cfg.metric, cfg.ci)
            for _, r in diff.iterrows():
                row = {"target": r["target"], "pretrained": _row(cfg, next(iter(cfg.sources)), model), "baseline": base,
                       f"Δ macro {cfg.metric.upper()} [t over seeds]": fmt_ci(r["difference"], r["lo"], r["hi"]),
                       "seeds": int(r["n_seeds"])}
                if cfg.metric == "auroc":
                    group = first[first["target"] == r["target"]]
                    ids = sorted(set(group[group["model"] == model]["trial"]) & set(group[group["model"] == base]["trial"]))
                    paired = boots[r["target"]].difference(ids, model, base, cfg.ci)
                    row["[patient bootstrap]"] = f"[{paired['lo']:.3f}, {paired['hi']:.3f}]" if paired else "n/a"
                rows.append(row)
    if rows:
        rep.heading("Pretrained minus baseline (paired)")
        rep.text("Mean over seeds; intervals: Student's t over the per-seed differences, and a paired bootstrap "
                 "over the target's test patients (one draw for both models and every seed).")
        rep.table(pd.DataFrame(rows))


def _target_labels(group: pd.DataFrame) -> list[str]:
    """The labels scored for one target (its non-empty ``auroc.<label>`` columns)."""
    return [c[len("auroc."):] for c in group.columns
            if c.startswith("auroc.") and not c.endswith(("_lo", "_hi")) and group[c].notna().any()]


def _in_joint_note(cfg: StudyConfig) -> str:
    notes = []
    for target in cfg.targets:
        joint = resolve_task(target, cfg.overrides).joint
        same = [s for s, j in cfg.sources.items() if list(j) == [joint]]
        notes.append(f"{target}: in-joint source {same[0] if same else '(none in the grid)'}")
    return "In-joint reference per target: " + "; ".join(notes) + "."
