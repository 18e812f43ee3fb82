"""``downstream evaluate``: a task model's metrics with intervals on another labelled shard set (an
external test set), without retraining, next to the run's own (internal) test metrics.

Diagnosis: per-label and macro AUROC and AP at the patient level with bootstrap intervals
(:func:`downstream.metrics.diagnosis_metrics`), and sensitivity/specificity at the thresholds stored
in the model — never re-chosen on the external labels. Segmentation: Dice, HD95, IoU per structure
on each input's own grid. Writes ``evaluation.json`` and ``evaluation.md`` beside the predictions.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from shards.runs import run_dir

from .metrics import diagnosis_metrics, patient_level, segmentation_metrics
from .model_card import with_ci
from .predict import PredictConfig, open_model, predict_with
from .task_model import TaskModel, TaskModelError


def at_thresholds(frame: pd.DataFrame, labels: list[str], thresholds: dict[str, float], n_boot: int, ci: float,
                  seed: int) -> dict:
    """Per label: sensitivity and specificity at the stored threshold, with patient-bootstrap intervals."""
    pat = patient_level(frame, labels, [f"prob/{n}" for n in labels])
    rng = np.random.default_rng(seed)
    out = {}
    for name in labels:
        known = pat[name].notna().to_numpy()
        y, p = pat.loc[known, name].to_numpy().astype(int), pat.loc[known, f"prob/{name}"].to_numpy()
        point = _sens_spec(y, p >= thresholds[name])
        draws = [_sens_spec(y[i], p[i] >= thresholds[name]) for i in (rng.integers(0, len(y), len(y))
                                                                       for _ in range(n_boot if len(y) else 0))]
        out[name] = {"threshold": thresholds[name], **point,
                     "ci": {k: percentiles([d[k] for d in draws if math.isfinite(d[k])], ci)
                            for k in ("sensitivity", "specificity")}}
    return out


def percentiles(values: list[float], ci: float) -> list[float]:
    if not values:
        return [float("nan"), float("nan")]
    return [float(v) for v in np.percentile(values, [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100])]


def _sens_spec(y: np.ndarray, decision: np.ndarray) -> dict:
    pos, neg = y == 1, y == 0
    return {"sensitivity": float(decision[pos].mean()) if pos.any() else float("nan"),
            "specificity": float((~decision[neg]).mean()) if neg.any() else float("nan")}


def diagnosis_evaluation(model: TaskModel, rows: list[dict]) -> tuple[dict, str]:
    labels, m = model.labels, model.task.metrics
    frame = pd.DataFrame([{"key": r["key"], "patient": r["patient"],
                           **{n: np.nan if r["truth"].get(n) is None else float(r["truth"][n]) for n in labels},
                           **{f"prob/{n}": r["probs"][n] for n in labels}} for r in rows])
    metrics = diagnosis_metrics(frame, labels, "prob/", m.bootstrap, m.ci, m.seed, model.meta["thresholds"])
    metrics["at_thresholds"] = at_thresholds(frame, labels, model.meta["thresholds"], m.bootstrap, m.ci, m.seed)
    internal = model.metrics.get("diffusion", {})
    lines = ["| label | internal AUROC | external AUROC | internal AP | external AP | external sens / spec at stored threshold |",
             "|---|---|---|---|---|---|"]
    for name in [*labels, "macro"]:
        ext = metrics["macro"] if name == "macro" else metrics["per_label"][name]
        inn = internal.get("macro", {}) if name == "macro" else internal.get("per_label", {}).get(name, {})
        ss = metrics["at_thresholds"].get(name)
        at = (f"{with_ci(ss['sensitivity'], ss['ci']['sensitivity'])} / {with_ci(ss['specificity'], ss['ci']['specificity'])}"
              if ss else "")
        lines.append(f"| {name} | {with_ci(inn.get('auroc'), inn.get('ci', {}).get('auroc'))} | "
                     f"{with_ci(ext['auroc'], ext.get('ci', {}).get('auroc'))} | "
                     f"{with_ci(inn.get('ap'), inn.get('ci', {}).get('ap'))} | {with_ci(ext['ap'], ext.get('ci', {}).get('ap'))} | {at} |")
    return metrics, "\n".join(lines)


def segmentation_evaluation(model: TaskModel, rows: list[dict]) -> tuple[dict, str]:
    m, structures = model.task.metrics, model.structures
    scored = [r for r in rows if "scores" in r]
    if not scored:
        raise TaskModelError("no study of this shard set has a label map for the model's plane")
    scores = {k: np.array([r["scores"][k] for r in scored], dtype=float) for k in ("dice", "hd95", "iou")}
    metrics = segmentation_metrics(scores, structures, m.ci, m.bootstrap, m.seed)
    internal = model.metrics.get("diffusion", {})
    lines = ["| structure | internal Dice | external Dice | external HD95 mm |", "|---|---|---|---|"]
    for name in [*structures, "mean"]:
        ext = metrics["mean"] if name == "mean" else metrics["per_structure"][name]
        inn = internal.get("mean", {}) if name == "mean" else internal.get("per_structure", {}).get(name, {})
        lines.append(f"| {name} | {with_ci(inn.get('dice', {}).get('mean'), inn.get('dice', {}).get('ci'))} | "
                     f"{with_ci(ext['dice']['mean'], ext['dice']['ci'])} | {with_ci(ext['hd95']['mean'], ext['hd95']['ci'])} |")
    return metrics, "\n".join(lines)


def run_evaluate(url: str, shards: str, out: str | Path | None, cfg: PredictConfig) -> dict:
    """Predict the labelled ``shards`` with the task model and measure it; returns the results dict."""
    t0 = time.perf_counter()
    model = open_model(url, cfg)
    name = Path(str(shards).rstrip("/")).name
    out = Path(out) if out else run_dir("evaluate", f"{model.meta['task']}-{name}")
    summary = predict_with(model, url, [str(shards)], out, cfg, with_truth=True,
                           timing={"load_s": time.perf_counter() - t0})
    ok = [r for r in summary["rows"] if r["status"] == "ok"]
    if not ok:
        raise TaskModelError(f"no study of {shards} could be predicted: {summary['failed'][:3]}")
    evaluate = diagnosis_evaluation if model.meta["kind"] == "diagnosis" else segmentation_evaluation
    metrics, table = evaluate(model, ok)
    sites = sorted({str(r.get("site")) for r in ok})
    result = {"task": model.meta["task"], "shard_set": name, "split": cfg.split or "all", "n_studies": len(ok),
              "n_failed": summary["n_failed"], "sites": sites, "metrics": metrics,
              "internal": {"split": model.meta["metrics_split"], "metrics": model.metrics.get("diffusion")}}
    (out / "evaluation.json").write_text(json.dumps(result, indent=1, default=float))
    title = (f"task model {model.meta['task']} on {name} ({cfg.split or 'all splits'}; {len(ok)} studies, sites "
             f"{', '.join(sites)}), internal = the run's own {model.meta['metrics_split']} split, 95% intervals")
    (out / "evaluation.md").write_text(f"# {title}\n\n{table}\n")
    return result | {"table": f"{title}\n{table}", "out": str(out)}
