"""Studies: Ray Tune grids of ``run_finetune`` trials with seeds, ending in a markdown/HTML report.

``STUDIES`` maps a kind to its module, which offers ``plan(cfg) -> specs`` and
``report(cfg, trials, run_dir) -> Report`` (and ``backbones(cfg)`` when the grid needs
pretrained backbones of its own).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from shards.config import load_config, lookup, save_config, to_dict
from shards.report import write_report
from shards.resume import check_resume, saved_yaml
from shards.runs import write_metrics
from shards.tracking import start_tracking

from . import label_efficiency, multi_anatomy, robustness, transfer
from .config import StudyConfig
from .pretrained import make_missing
from .trials import check_specs, resolve_specs, run_trials

STUDIES = {"label-efficiency": label_efficiency, "transfer": transfer, "robustness": robustness,
           "multi-anatomy": multi_anatomy}
# keys a resumed study may change (reporting and scheduling only)
RESUME_IGNORE = ("resources", "max_concurrent_trials", "ci", "metric", "ray", "wandb")
TAG_TYPES = {"train_domain": str, "eval_domain": str, "source": str, "target": str, "trial": str}


def run_study(cfg: StudyConfig, run_dir: str | Path | None = None, make_backbones: bool = False) -> dict:
    """Backbones (if asked), every pre-trial check, the grid, then ``trials.csv`` and the report."""
    t0 = time.perf_counter()
    module = lookup(STUDIES, cfg.kind, "study kind")
    out = Path(run_dir or Path(cfg.out) / (cfg.name or cfg.kind)).resolve()
    check_resume(saved_yaml(out / "config.yaml"), to_dict(cfg), out, "study", ignore=RESUME_IGNORE)
    made = (make_missing(module.backbones(cfg), cfg, out / "pretrain")
            if make_backbones and hasattr(module, "backbones") else [])
    specs = resolve_specs(module.plan(cfg))
    check_specs(specs)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    t_checked = time.perf_counter()
    trials = run_trials(specs, out, cfg.resources, cfg.max_concurrent_trials, cfg.ray.address)
    trials.to_csv(out / "trials.csv", index=False, float_format="%.6f")
    md, page = study_report(out)
    summary = {"kind": cfg.kind, "run_dir": str(out), "n_trials": len(specs),
               "n_errors": int(trials.drop_duplicates("trial")["error"].notna().sum()),
               "backbones_made": made, "report": str(md), "html": str(page),
               "timings": {"prepare_s": round(t_checked - t0, 3), "total_s": round(time.perf_counter() - t0, 3)}}
    write_metrics(out, summary, default=None)
    with start_tracking(cfg.wandb, out, out.name, to_dict(cfg), job_type=f"study-{cfg.kind}") as tracker:
        tracker.table("trials", trials)
        tracker.summary({k: summary[k] for k in ("n_trials", "n_errors")})
    return summary


def study_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Render ``report.md`` and ``report.html`` of a study run folder from its config and trials."""
    run_dir = Path(run_dir)
    cfg = load_config(StudyConfig, run_dir / "config.yaml")
    trials = pd.read_csv(run_dir / "trials.csv", dtype=TAG_TYPES)
    return write_report(lookup(STUDIES, cfg.kind, "study kind").report(cfg, trials, run_dir), run_dir)
