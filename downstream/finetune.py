"""``run_finetune``: one task end to end — checks, cached features, heads and baselines, run folder.

In-process API for sweeps and studies::

    from downstream.finetune import run_finetune
    result = run_finetune("ankle-dx", ["train.epochs=20"])        # or a TaskConfig
    result["metrics"]["diffusion"]["macro"]["auroc"]
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from shards.config import load_config, save_config, to_dict
from shards.dataset import dataset_of
from shards.runs import write_metrics
from shards.tracking import start_tracking

from .data import check_task, load_studies, select_rows, split_rows
from .diagnosis import run_diagnosis
from .features import FeatureCache
from .heads.segmentation import remap_structures
from .inputs import prepare_planes
from .labels import multiclass_metrics, output_task
from .metrics import diagnosis_metrics, segmentation_metrics, select_thresholds
from .outputs import (diagnosis_outputs, diagnosis_table, flat_metrics, save_heads, segmentation_outputs,
                      segmentation_table)
from .segment import run_segmentation
from .task_model import save_task_model
from .tasks import TaskConfig, load_task


def resolve_task(task: TaskConfig | str | Path, overrides: Sequence[str] = ()) -> TaskConfig:
    if isinstance(task, TaskConfig):
        if overrides:
            return load_config(TaskConfig, None, overrides, base=to_dict(task))
        return task
    return load_task(task, overrides)


def make_run_dir(task: TaskConfig, run_dir: str | Path | None) -> Path:
    if run_dir is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        run_dir = Path(task.out) / (task.run_name or f"{task.name}-{stamp}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run_finetune(task: TaskConfig | str | Path, overrides: Sequence[str] = (), *,
                 run_dir: str | Path | None = None) -> dict:
    """Train and evaluate the task's head and its baselines; returns the results dict.

    Keys: ``task``, ``kind``, ``run_dir``, ``metrics`` ({model: metrics}), ``table`` (str),
    ``n_train``/``n_select``/``n_eval`` (studies), ``selection`` ({model: what selection chose}), ``cache`` ({plane: {"hits", "lookups"}}), ``timings`` (s).
    All checks (backbones, planes, labels, splits) run before any compute.
    """
    t0 = time.perf_counter()
    task = resolve_task(task, overrides)
    if task.threads:
        torch.set_num_threads(task.threads)
    manifest = check_task(task)
    dataset = dataset_of(manifest)
    frame = load_studies(task)
    train_rows, eval_rows = split_rows(frame, task)
    chosen_rows = select_rows(frame, task) if task.kind == "diagnosis" else np.array([], dtype=np.int64)
    out = make_run_dir(task, run_dir)
    save_config(task, out / "config.yaml")
    cache = FeatureCache(task.cache_dir)
    planes = prepare_planes(task, list(frame["key"]), manifest, cache)
    t_features = time.perf_counter()
    m = task.metrics
    thresholds: dict[str, dict[str, float]] = {}
    if task.kind == "diagnosis":
        # multiclass/ordinal labels train and score as their one-hot class outputs (downstream.labels)
        task = output_task(task, manifest)
        results = run_diagnosis(task, frame, planes, {"train": train_rows, "select": chosen_rows, "eval": eval_rows})
        study = diagnosis_outputs(frame, eval_rows, task.labels, results, out)
        thresholds = decision_thresholds(frame, chosen_rows, task.labels, results)
        metrics = {name: diagnosis_metrics(study, task.labels, f"{name}/", m.bootstrap, m.ci, m.seed, thresholds[name])
                   for name in results}
        for name, mm in metrics.items():
            if multi := multiclass_metrics(study, task.labels, mm["per_label"], f"{name}/"):
                mm["multiclass"] = multi
        table = diagnosis_table(metrics)
    else:
        data = planes[task.planes[0]]
        results = run_segmentation(task, frame, data, train_rows, eval_rows)
        metrics = {name: segmentation_metrics(r["scores"], task.structures, m.ci, m.bootstrap, m.seed)
                   for name, r in results.items()}
        segmentation_outputs(frame, eval_rows, task.structures, results, data.volumes,
                             _eval_truth(task, data, eval_rows, dataset.structure_values(task.joint)), out)
        table = segmentation_table(metrics)
    save_heads(results, out, {"task": task.name, "labels": task.labels, "structures": task.structures,
                              "planes": task.planes, "backbones": task.backbones,
                              "channels": {p: d.channels() for p, d in planes.items()},
                              "tabular": results.get("diffusion+ehr", {}).get("tabular"),
                              "thresholds": {name: {k: v if np.isfinite(v) else None for k, v in thr.items()}
                                             for name, thr in thresholds.items()},
                              "selection": {name: r.get("selection") for name, r in results.items()}})
    save_task_model(out, task, results["diffusion"], planes, manifest, metrics,
                    {"n_train": int(len(train_rows)), "n_select": int(len(chosen_rows)), "n_eval": int(len(eval_rows)),
                     "train_split": task.train.train_split, "select_split": task.train.select_split,
                     "eval_split": task.train.eval_split}, thresholds.get("diffusion"))
    timings = {"features_s": round(t_features - t0, 3), "total_s": round(time.perf_counter() - t0, 3)}
    summary = {"task": task.name, "kind": task.kind, "run_dir": str(out), "metrics": metrics,
               "n_train": int(len(train_rows)), "n_select": int(len(chosen_rows)), "n_eval": int(len(eval_rows)),
               "selection": {name: r.get("selection") for name, r in results.items()},
               "cache": {p: d.cache for p, d in planes.items()}, "timings": timings,
               "history": {name: r["history"] for name, r in results.items()},
               "encoders": {name: r["encoder"] for name, r in results.items() if "encoder" in r}}
    write_metrics(out, summary, default=_json_default)
    track(task, out, summary)
    title = (f"task {task.name} ({task.kind}, {task.joint}, planes {'+'.join(task.planes)}): "
             f"{len(train_rows)} train / {len(chosen_rows)} {task.train.select_split or 'no'} selection / "
             f"{len(eval_rows)} {task.train.eval_split} studies -> {out}")
    return summary | {"table": f"{title}\n{table}"}


def track(task: TaskConfig, out: Path, summary: dict) -> None:
    """The run's W&B record (when ``wandb.project`` is set): per-epoch training losses of every model,
    the macro metrics with their intervals as summary."""
    with start_tracking(task.wandb, out, out.name, to_dict(task), group=task.name, job_type="finetune") as tracker:
        history = {m: list(h or []) for m, h in summary["history"].items()}
        for epoch in range(max((len(h) for h in history.values()), default=0)):
            tracker.log({f"{m}/train_loss": h[epoch] for m, h in history.items() if epoch < len(h)}, step=epoch + 1)
        tracker.summary(flat_metrics(summary))


def decision_thresholds(frame, rows: np.ndarray, labels: list[str], results: dict) -> dict[str, dict[str, float]]:
    """Per model and label the Youden threshold of its predictions on the selection rows (NaN without)."""
    out = {}
    for name, res in results.items():
        if len(rows) == 0:
            out[name] = {label: float("nan") for label in labels}
            continue
        chosen = frame.iloc[rows][["patient", *labels]].reset_index(drop=True)
        chosen = chosen.assign(**{f"p_{label}": res["select_probs"][:, k] for k, label in enumerate(labels)})
        out[name] = select_thresholds(chosen, labels, "p_")
    return out


def _eval_truth(task: TaskConfig, data, eval_rows: np.ndarray, structures: dict[str, int]) -> np.ndarray:
    seg = torch.from_numpy(np.asarray(data.seg[eval_rows, 0]))
    truth = remap_structures(seg, structures, task.structures, task.ignore_index)
    return torch.where(truth == task.ignore_index, 0, truth).numpy()


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
