"""Metrics from the field's libraries: scikit-learn (AUROC, AP, ROC), MONAI (Dice, HD95, IoU), scipy.

Diagnosis metrics are computed per label at the patient level, on the patients whose label is
known (unknown = NaN is excluded, never counted as negative), with percentile-bootstrap 95%
confidence intervals over patients. Segmentation scores are per case and structure; their interval
is the normal approximation when the per-case scores pass a Shapiro–Wilk test, else a bootstrap.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU
from monai.networks.utils import one_hot
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


def patient_level(frame: pd.DataFrame, labels: list[str], score_cols: list[str]) -> pd.DataFrame:
    """Aggregate study rows to one row per patient: mean score, max of known labels (NaN if none)."""
    agg = {c: "mean" for c in score_cols} | {name: (lambda s: s.max(skipna=True)) for name in labels}
    return frame.groupby("patient", sort=True).agg(agg).reset_index()


def youden_point(y: np.ndarray, p: np.ndarray) -> dict:
    """Sensitivity and specificity at the ROC point maximising J = sens + spec - 1."""
    fpr, tpr, thr = roc_curve(y, p)
    i = int(np.argmax(tpr - fpr))
    return {"threshold": float(min(thr[i], 1.0)), "sensitivity": float(tpr[i]), "specificity": float(1 - fpr[i])}


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict:
    """AUROC, AP and the Youden point; NaN when only one class is present."""
    if len(np.unique(y)) < 2:
        return {"auroc": float("nan"), "ap": float("nan"), "sensitivity": float("nan"),
                "specificity": float("nan"), "threshold": float("nan")}
    return {"auroc": float(roc_auc_score(y, p)), "ap": float(average_precision_score(y, p)), **youden_point(y, p)}


def bootstrap_ci(y: np.ndarray, p: np.ndarray, n: int, ci: float, seed: int) -> dict:
    """Percentile bootstrap intervals of each binary metric, resampling patients with replacement."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) < 2:
            continue
        for k, v in binary_metrics(y[idx], p[idx]).items():
            draws.setdefault(k, []).append(v)
    lo, hi = (1 - ci) / 2 * 100, (1 + ci) / 2 * 100
    return {k: [float(np.percentile(v, lo)), float(np.percentile(v, hi))] for k, v in draws.items()
            if k != "threshold"}


def diagnosis_metrics(frame: pd.DataFrame, labels: list[str], score_prefix: str = "p_",
                      n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> dict:
    """Per-label and macro metrics on patient-level predictions.

    ``frame`` has one row per study with ``patient``, the true labels (0/1/NaN) under each label
    name and the predicted probability under ``score_prefix + label``.
    """
    cols = [score_prefix + name for name in labels]
    pat = patient_level(frame, labels, cols)
    per_label = {}
    for name in labels:
        known = pat[name].notna().to_numpy()
        y = pat.loc[known, name].to_numpy().astype(int)
        p = pat.loc[known, score_prefix + name].to_numpy()
        m = binary_metrics(y, p) | {"n": int(known.sum()), "n_pos": int(y.sum())}
        m["ci"] = bootstrap_ci(y, p, n_boot, ci, seed) if n_boot and len(np.unique(y)) == 2 else {}
        per_label[name] = m
    macro = {k: float(np.nanmean([per_label[n][k] for n in labels]))
             if any(np.isfinite(per_label[n][k]) for n in labels) else float("nan")
             for k in ("auroc", "ap", "sensitivity", "specificity")}
    return {"per_label": per_label, "macro": macro, "n_patients": int(len(pat))}


def roc_points(frame: pd.DataFrame, labels: list[str], score_prefix: str = "p_") -> dict:
    """(fpr, tpr) per label at the patient level, for the ROC plot."""
    cols = [score_prefix + name for name in labels]
    pat = patient_level(frame, labels, cols)
    out = {}
    for name in labels:
        known = pat[name].notna()
        y, p = pat.loc[known, name].astype(int), pat.loc[known, score_prefix + name]
        if y.nunique() == 2:
            fpr, tpr, _ = roc_curve(y, p)
            out[name] = (fpr, tpr)
    return out


def interval(values: np.ndarray, ci: float = 0.95, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean and CI of per-case scores: normal approximation if Shapiro–Wilk does not reject
    normality (p > 0.05, needs >= 3 cases), else a percentile bootstrap of the mean."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"mean": float("nan"), "ci": [float("nan"), float("nan")], "method": "none", "n": 0}
    mean = float(v.mean())
    if len(v) >= 3 and np.ptp(v) > 0 and stats.shapiro(v).pvalue > 0.05:
        half = stats.norm.ppf((1 + ci) / 2) * v.std(ddof=1) / np.sqrt(len(v))
        return {"mean": mean, "ci": [mean - half, mean + half], "method": "normal", "n": len(v)}
    rng = np.random.default_rng(seed)
    means = rng.choice(v, size=(n_boot, len(v)), replace=True).mean(axis=1)
    lo, hi = np.percentile(means, [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100])
    return {"mean": mean, "ci": [float(lo), float(hi)], "method": "bootstrap", "n": len(v)}


def segmentation_scores(pred: torch.Tensor, target: torch.Tensor, n_classes: int,
                        spacing: list[float] | tuple[float, ...]) -> dict[str, np.ndarray]:
    """Per-case, per-structure Dice, HD95 (mm, using ``spacing``) and IoU, background excluded.

    ``pred`` and ``target`` are integer label maps (B, D, H, W) on the same grid. A structure
    absent from both prediction and truth gives NaN (MONAI's convention), and is skipped in means.
    """
    p = one_hot(pred[:, None].long(), n_classes)
    t = one_hot(target[:, None].long(), n_classes)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(p, t)
    iou = MeanIoU(include_background=False, reduction="none", ignore_empty=True)(p, t)
    hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
        p, t, spacing=list(spacing))
    return {"dice": dice.numpy(), "hd95": hd.numpy(), "iou": iou.numpy()}


def segmentation_metrics(scores: dict[str, np.ndarray], structures: list[str], ci: float = 0.95,
                         n_boot: int = 1000, seed: int = 0) -> dict:
    """Per structure and mean (over structures, per case) of each score, with intervals."""
    out: dict = {"per_structure": {}, "mean": {}}
    for metric, arr in scores.items():
        arr = np.where(np.isinf(arr), np.nan, arr)
        for j, name in enumerate(structures):
            out["per_structure"].setdefault(name, {})[metric] = interval(arr[:, j], ci, n_boot, seed)
        with np.errstate(all="ignore"):
            case_mean = np.nanmean(arr, axis=1) if arr.size else arr
        out["mean"][metric] = interval(case_mean, ci, n_boot, seed)
    return out
