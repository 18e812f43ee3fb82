"""``run_finetune``: one task end to end — checks, cached features, heads and baselines, run folder.

In-process API for sweeps and studies::

    from downstream.finetune import run_finetune
    result = run_finetune("ankle-dx", ["train.epochs=20"])        # or a TaskConfig
    result["metrics"]["diffusion"]["macro"]["auroc"]
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from shards.config import load_config, save_config, to_dict
from shards.schema import STRUCTURES

from .data import check_task, load_studies, split_rows
from .diagnosis import run_diagnosis
from .features import FeatureCache
from .heads.segmentation import remap_structures
from .inputs import prepare_planes
from .metrics import diagnosis_metrics, segmentation_metrics
from .outputs import (diagnosis_outputs, diagnosis_table, save_heads, segmentation_outputs,
                      segmentation_table)
from .segment import run_segmentation
from .task_model import save_task_model
from .tasks import TaskConfig, load_task

log = logging.getLogger(__name__)


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
    ``n_train``/``n_eval`` (studies), ``cache`` ({plane: {"hits", "lookups"}}), ``timings`` (s).
    All checks (backbones, planes, labels, splits) run before any compute.
    """
    t0 = time.perf_counter()
    task = resolve_task(task, overrides)
    if task.threads:
        torch.set_num_threads(task.threads)
    manifest = check_task(task)
    frame = load_studies(task)
    train_rows, eval_rows = split_rows(frame, task)
    out = make_run_dir(task, run_dir)
    save_config(task, out / "config.yaml")
    cache = FeatureCache(task.cache_dir)
    planes = prepare_planes(task, list(frame["key"]), manifest, cache)
    t_features = time.perf_counter()
    m = task.metrics
    if task.kind == "diagnosis":
        results = run_diagnosis(task, frame, planes, train_rows, eval_rows)
        study = diagnosis_outputs(frame, eval_rows, task.labels, results, out)
        metrics = {name: diagnosis_metrics(study, task.labels, f"{name}/", m.bootstrap, m.ci, m.seed)
                   for name in results}
        table = diagnosis_table(metrics)
    else:
        data = planes[task.planes[0]]
        results = run_segmentation(task, frame, data, train_rows, eval_rows)
        metrics = {name: segmentation_metrics(r["scores"], task.structures, m.ci, m.bootstrap, m.seed)
                   for name, r in results.items()}
        segmentation_outputs(frame, eval_rows, task.structures, results, data.volumes,
                             _eval_truth(task, data, eval_rows), out)
        table = segmentation_table(metrics)
    save_heads(results, out, {"task": task.name, "labels": task.labels, "structures": task.structures,
                              "planes": task.planes, "backbones": task.backbones,
                              "channels": {p: d.channels() for p, d in planes.items()},
                              "tabular": results.get("diffusion+ehr", {}).get("tabular")})
    save_task_model(out, task, results["diffusion"], planes, manifest, metrics,
                    {"n_train": int(len(train_rows)), "n_eval": int(len(eval_rows)),
                     "train_split": task.train.train_split, "eval_split": task.train.eval_split})
    timings = {"features_s": round(t_features - t0, 3), "total_s": round(time.perf_counter() - t0, 3)}
    summary = {"task": task.name, "kind": task.kind, "run_dir": str(out), "metrics": metrics,
               "n_train": int(len(train_rows)), "n_eval": int(len(eval_rows)),
               "cache": {p: d.cache for p, d in planes.items()}, "timings": timings,
               "history": {name: r["history"] for name, r in results.items()},
               "encoders": {name: r["encoder"] for name, r in results.items() if "encoder" in r}}
    (out / "metrics.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    title = (f"task {task.name} ({task.kind}, {task.joint}, planes {'+'.join(task.planes)}): "
             f"{len(train_rows)} train / {len(eval_rows)} {task.train.eval_split} studies -> {out}")
    return summary | {"table": f"{title}\n{table}"}


def _eval_truth(task: TaskConfig, data, eval_rows: np.ndarray) -> np.ndarray:
    seg = torch.from_numpy(np.asarray(data.seg[eval_rows, 0]))
    truth = remap_structures(seg, STRUCTURES[task.joint], task.structures, task.ignore_index)
    return torch.where(truth == task.ignore_index, 0, truth).numpy()


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
