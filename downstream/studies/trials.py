"""A study's trials: small specs (task + overrides + tags), checked before any trial starts, run as a
Ray Tune grid of ``run_finetune`` calls, and read back as one row per trial and model.

A spec carries only names, paths and overrides; backbones and features travel by path (the
published backbone folder and the feature cache), never as objects.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import pandas as pd

from shards.config import ConfigError

from ..data import check_task, load_studies, split_rows, task_splits
from ..features import FeatureCache
from ..finetune import resolve_task, run_finetune
from ..inputs import prepare_planes
from ..outputs import flat_metrics
from ..tasks import TaskConfig
from ..tuning import run_tuner, trial_rows

def absolute_paths(task: TaskConfig, overrides: Sequence[str]) -> list[str]:
    """``overrides`` plus the task's shard, cache and backbone paths made absolute, so trials that run
    in another working directory (a Ray worker, another node with a shared file system) find them."""
    def absolute(p: str) -> str:
        return p if "://" in p else str(Path(p).resolve())

    fixed = [f"shards={absolute(task.shards)}", f"cache_dir={absolute(task.cache_dir)}"]
    fixed += [f"backbones.{plane}={absolute(url)}" for plane, url in sorted(task.backbones.items())]
    return [*overrides, *fixed]


def make_spec(task: str, overrides: Sequence[str], tags: dict) -> dict:
    slug = "_".join(f"{k}={v}" for k, v in tags.items())
    return {"task": task, "overrides": list(overrides), "tags": dict(tags), "id": re.sub(r"[^\w=.+-]", "-", slug)}


def resolve_specs(specs: list[dict]) -> list[dict]:
    """Resolve every spec's task (paths made absolute); any bad override fails here, before Ray."""
    out = []
    for spec in specs:
        task = resolve_task(spec["task"], spec["overrides"])
        out.append(spec | {"overrides": absolute_paths(task, spec["overrides"])})
    return out


def check_specs(specs: list[dict]) -> None:
    """Backbones, shards, splits and label positives of every trial, then the features, once each.

    Raises ConfigError naming the trial when a backbone is missing, a split or domain is empty, or a
    training subset leaves a label without a positive (its AUROC and loss would be meaningless).
    """
    frames: dict = {}
    prepared: set = set()
    for spec in specs:
        task = resolve_task(spec["task"], spec["overrides"])
        where = f"trial {spec['id']}"
        try:
            manifest = check_task(task)
            key = (task.shards, task.joint, tuple(task.planes), tuple(task.labels), task_splits(task))
            if key not in frames:
                frames[key] = load_studies(task)
            frame = frames[key]
            train_rows, _ = split_rows(frame, task)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if task.kind == "diagnosis":
            _check_positives(frame.iloc[train_rows], task, where)
        features = json.dumps([task.shards, task.cache_dir, task.joint, task.backbones, task.planes,
                               task.features.__dict__, "random_backbone" in task.baselines.names,
                               task.kind, task_splits(task), task.train.seed if "random_backbone" in task.baselines.names else 0],
                              sort_keys=True, default=str)
        if features not in prepared:
            prepared.add(features)
            prepare_planes(task, list(frame["key"]), manifest, FeatureCache(task.cache_dir))


def _check_positives(train: pd.DataFrame, task: TaskConfig, where: str) -> None:
    empty = [name for name in task.labels if not (train[name] == 1).any()]
    if empty:
        raise ConfigError(f"{where}: the training subset ({train['patient'].nunique()} patients, "
                          f"train_fraction={task.train.train_fraction}) has no positive for label(s) {empty}; "
                          f"use larger fractions or drop those labels (labels=[...])")


def study_trial(config: dict) -> None:
    """Ray Tune trainable: one ``run_finetune`` into the study's trial folder; reports macro metrics."""
    from ray import tune

    spec = config["spec"]
    result = run_finetune(spec["task"], spec["overrides"], run_dir=Path(config["trials_dir"]) / spec["id"])
    tune.report(flat_metrics(result))


def run_trials(specs: list[dict], run_dir: Path, resources: dict[str, float], max_concurrent: int,
               address: str | None = None) -> pd.DataFrame:
    """Run (or resume) the grid; returns the long table of trial x model results, errors included."""
    from ray import tune

    space = {"spec": tune.grid_search(specs), "trials_dir": str((run_dir / "trials").resolve())}
    tune_config = tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=True)
    grid = run_tuner(study_trial, space, run_dir, tune_config, resources, address)
    return trials_frame(trial_rows(grid))


def trials_frame(rows: list[dict]) -> pd.DataFrame:
    """One row per (trial, model): the spec's tags, the model, metric values and CI, the error."""
    records = []
    for r in sorted(rows, key=lambda r: r["config"]["spec"]["id"]):
        spec, m = r["config"]["spec"], r["metrics"]
        base = {"trial": spec["id"], **spec["tags"], "n_train": m.get("n_train"), "n_eval": m.get("n_eval"),
                "error": r["error"]}
        models = sorted({k.split("/")[0] for k in m if "/" in k})
        if r["error"] or not models:
            records.append(base | {"model": None})
        for model in models:
            values = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith(f"{model}/")}
            records.append(base | {"model": model, **values})
    return pd.DataFrame(records)
