"""The run folder: metrics.json, predictions.csv, trained heads (safetensors), plots, the terminal table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.torch import save_model

from .metrics import patient_level, roc_points
from .plots import plot_fusion_weights, plot_overlays, plot_roc

REPORTED = ("auroc", "ap")   # the macro diagnosis metrics that sweeps, studies and trackers report


def flat_metrics(result: dict) -> dict:
    """``{model/metric, model/metric_lo, model/metric_hi}`` of the macro diagnosis metrics (and
    ``model/auroc.<label>`` per label), or mean Dice for segmentation, plus the training and evaluation
    sizes."""
    out = {"n_train": result["n_train"], "n_eval": result["n_eval"]}
    for model, m in result["metrics"].items():
        if "macro" in m:
            for k in REPORTED:
                lo, hi = m["macro"].get("ci", {}).get(k, [np.nan, np.nan])
                out |= {f"{model}/{k}": m["macro"][k], f"{model}/{k}_lo": lo, f"{model}/{k}_hi": hi}
            for label, v in m.get("per_label", {}).items():
                lo, hi = v.get("ci", {}).get("auroc", [np.nan, np.nan])
                out |= {f"{model}/auroc.{label}": v["auroc"], f"{model}/auroc.{label}_lo": lo,
                        f"{model}/auroc.{label}_hi": hi}
        else:
            d = m["mean"]["dice"]
            out |= {f"{model}/dice": d["mean"], f"{model}/dice_lo": d["ci"][0], f"{model}/dice_hi": d["ci"][1]}
    return out


def _fmt(v: float, digits: int = 3) -> str:
    return "  -  " if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci or not all(math.isfinite(c) for c in ci) else f" [{ci[0]:.2f}, {ci[1]:.2f}]"


def diagnosis_table(metrics: dict[str, dict]) -> str:
    head = f"{'model':<18} {'macro AUROC [95% CI]':<24} {'macro AP [95% CI]':<24} {'sens':>5} {'spec':>5}"
    lines = [head, "-" * len(head)]
    for name, m in metrics.items():
        macro, ci = m["macro"], m["macro"].get("ci", {})
        lines.append(f"{name:<18} {_fmt(macro['auroc']) + _ci(ci.get('auroc')):<24} "
                     f"{_fmt(macro['ap']) + _ci(ci.get('ap')):<24} {_fmt(macro['sensitivity'], 2):>5} "
                     f"{_fmt(macro['specificity'], 2):>5}")
    for name, m in metrics.items():
        lines += multiclass_lines(name, m.get("multiclass", {}))
    return "\n".join(lines)


def multiclass_lines(model: str, multiclass: dict) -> list[str]:
    """Per multiclass/ordinal label: macro one-vs-rest AUROC, per-class AUROC and the confusion matrix."""
    lines = []
    for label, mc in multiclass.items():
        per = ", ".join(f"{c} {_fmt(v)}" for c, v in mc["auroc_per_class"].items())
        lines.append(f"{model} {label}: macro AUROC {_fmt(mc['macro_auroc'])} (one-vs-rest: {per}); "
                     f"confusion (rows true, columns predicted {'/'.join(mc['classes'])}; {mc['n']} studies): "
                     + " | ".join(" ".join(str(x) for x in row) for row in mc["confusion"]))
    return lines


def segmentation_table(metrics: dict[str, dict]) -> str:
    head = f"{'model':<18} {'Dice [95% CI]':<24} {'HD95 mm [95% CI]':<26} {'IoU':>6}"
    lines = [head, "-" * len(head)]
    for name, m in metrics.items():
        d, h, i = (m["mean"][k] for k in ("dice", "hd95", "iou"))
        lines.append(f"{name:<18} {_fmt(d['mean']) + _ci(d['ci']):<24} {_fmt(h['mean'], 2) + _ci(h['ci']):<26} "
                     f"{_fmt(i['mean']):>6}")
    return "\n".join(lines)


def save_heads(results: dict[str, dict], run_dir: Path, meta: dict) -> None:
    """``head.safetensors`` is the task's model; the others go to ``models/<name>.safetensors``."""
    (run_dir / "models").mkdir(exist_ok=True)
    for name, res in results.items():
        path = run_dir / "head.safetensors" if name == "diffusion" else run_dir / "models" / f"{name}.safetensors"
        save_model(res["model"], str(path), metadata={"model": name, "class": type(res["model"]).__name__})
    (run_dir / "head.json").write_text(json.dumps(meta, indent=1, default=str))


def diagnosis_outputs(frame: pd.DataFrame, eval_rows: np.ndarray, labels: list[str], results: dict[str, dict],
                      run_dir: Path) -> pd.DataFrame:
    """Per-patient predictions.csv, per-study study_predictions.csv, ROC and fusion-weight plots;
    returns the study-level frame."""
    study = frame.iloc[eval_rows][["key", "patient", "split", *labels]].reset_index(drop=True)
    for name, res in results.items():
        for k, label in enumerate(labels):
            study[f"{name}/{label}"] = res["probs"][:, k]
    study.to_csv(run_dir / "study_predictions.csv", index=False, float_format="%.9g")
    scores = [c for c in study.columns if "/" in c]
    patient = patient_level(study, labels, scores)
    patient.to_csv(run_dir / "predictions.csv", index=False, float_format="%.5f")
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    curves = {name: roc_points(study, labels, f"{name}/") for name in results}
    plot_roc(curves, labels, plots / "roc.png")
    for name, res in results.items():
        weights = res.get("weights")
        if weights is not None:
            weights.to_csv(run_dir / f"fusion_weights_{name.replace('+', '_')}.csv", index=False, float_format="%.5f")
            plot_fusion_weights(weights, plots / f"fusion_weights_{name.replace('+', '_')}.png",
                                f"{name}: fusion weight per label")
    return study


def segmentation_outputs(frame: pd.DataFrame, eval_rows: np.ndarray, structures: list[str], results: dict,
                         volumes: np.ndarray, truth: np.ndarray, run_dir: Path, n_overlays: int = 3) -> None:
    rows = frame.iloc[eval_rows].reset_index(drop=True)
    records = []
    for name, res in results.items():
        for i, r in rows.iterrows():
            rec = {"key": r["key"], "patient": r["patient"], "model": name}
            for metric, arr in res["scores"].items():
                rec |= {f"{metric}/{s}": float(arr[i, j]) for j, s in enumerate(structures)}
            records.append(rec)
    pd.DataFrame(records).to_csv(run_dir / "predictions.csv", index=False, float_format="%.5f")
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    n = min(n_overlays, len(rows))
    images = np.asarray(volumes[eval_rows[:n], 0])
    plot_overlays(images, truth[:n], results["diffusion"]["pred"][:n], list(rows["key"][:n]),
                  plots / "segmentation_overlays.png")
