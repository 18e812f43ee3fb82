"""Metrics from the field's libraries: MONAI (AUROC, AP, Dice, HD95, IoU), scikit-learn (ROC curve,
Youden point), scipy (Shapiro–Wilk, normal quantiles).

Diagnosis metrics are computed per label at the patient level, on the patients whose label is
known (unknown = NaN is excluded, never counted as negative), with percentile-bootstrap 95%
confidence intervals over patients. Sensitivity and specificity are read at decision thresholds
chosen beforehand on the selection split (:func:`select_thresholds`, the Youden point there), never
on the split being scored. Segmentation scores are per case and structure; their interval
is the normal approximation when the per-case scores pass a Shapiro–Wilk test, else a bootstrap.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch
from monai.metrics import (DiceMetric, HausdorffDistanceMetric, MeanIoU, compute_average_precision,
                           compute_roc_auc)
from monai.networks.utils import one_hot
from scipy import stats
from sklearn.metrics import roc_curve


def patient_level(frame: pd.DataFrame, labels: list[str], score_cols: list[str]) -> pd.DataFrame:
    """Aggregate study rows to one row per patient: mean score, max of known labels (NaN if none)."""
    agg = {c: "mean" for c in score_cols} | {name: (lambda s: s.max(skipna=True)) for name in labels}
    return frame.groupby("patient", sort=True).agg(agg).reset_index()


def youden_point(y: np.ndarray, p: np.ndarray) -> dict:
    """Sensitivity and specificity at the ROC point maximising J = sens + spec - 1 (scikit-learn)."""
    fpr, tpr, thr = roc_curve(y, p)
    i = int(np.argmax(tpr - fpr))
    return {"threshold": float(min(thr[i], 1.0)), "sensitivity": float(tpr[i]), "specificity": float(1 - fpr[i])}


def _auroc_ap(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """MONAI's AUROC and average precision (fast enough to bootstrap; equal to scikit-learn's)."""
    yt, pt = torch.tensor(y, dtype=torch.float64), torch.tensor(p, dtype=torch.float64)
    return float(compute_roc_auc(pt, yt)), float(compute_average_precision(pt, yt))


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float = float("nan")) -> dict:
    """AUROC, AP, and sensitivity/specificity at the given ``threshold`` (NaN if none); NaN when only
    one class is present."""
    nan = float("nan")
    if len(np.unique(y)) < 2:
        return {"auroc": nan, "ap": nan, "sensitivity": nan, "specificity": nan, "threshold": threshold}
    auroc, ap = _auroc_ap(y, p)
    sens, spec = _at_threshold(y, p, threshold) if np.isfinite(threshold) else (nan, nan)
    return {"auroc": auroc, "ap": ap, "sensitivity": sens, "specificity": spec, "threshold": threshold}


def select_thresholds(frame: pd.DataFrame, labels: list[str], score_prefix: str = "p_") -> dict[str, float]:
    """Per label the Youden threshold at the patient level of ``frame`` (the selection split); NaN
    where that split has one class only of the label."""
    pat = patient_level(frame, labels, [score_prefix + name for name in labels])
    out = {}
    for name in labels:
        known = pat[name].notna().to_numpy()
        y = pat.loc[known, name].to_numpy().astype(int)
        p = pat.loc[known, score_prefix + name].to_numpy()
        out[name] = youden_point(y, p)["threshold"] if len(np.unique(y)) == 2 else float("nan")
    return out


def _at_threshold(y: np.ndarray, p: np.ndarray, thr: float) -> tuple[float, float]:
    return float((p[y == 1] >= thr).mean()), float((p[y == 0] < thr).mean())


METRIC_KEYS = ("auroc", "ap", "sensitivity", "specificity")


def _bootstrap(pat: pd.DataFrame, labels: list[str], prefix: str, thresholds: dict, n: int, seed: int) -> dict:
    """Per resample of patients: per-label AUROC, AP, and sens/spec at each label's given threshold
    (NaN without one), plus their macro means. Returns {label or "macro": {metric: [values]}}."""
    rng = np.random.default_rng(seed)
    ys = {name: pat[name].to_numpy() for name in labels}
    ps = {name: pat[prefix + name].to_numpy() for name in labels}
    draws: dict[str, dict[str, list[float]]] = {name: {k: [] for k in METRIC_KEYS} for name in labels + ["macro"]}
    for _ in range(n):
        idx = rng.integers(0, len(pat), len(pat))
        per: dict[str, dict] = {}
        for name in labels:
            y, p = ys[name][idx], ps[name][idx]
            known = np.isfinite(y)
            y, p = y[known].astype(int), p[known]
            if len(np.unique(y)) < 2:
                continue
            auroc, ap = _auroc_ap(y, p)
            thr = thresholds.get(name, float("nan"))
            sens, spec = _at_threshold(y, p, thr) if np.isfinite(thr) else (float("nan"), float("nan"))
            per[name] = dict(zip(METRIC_KEYS, (auroc, ap, sens, spec)))
            for k, v in per[name].items():
                if np.isfinite(v):
                    draws[name][k].append(v)
        for k in METRIC_KEYS:
            finite = [m[k] for m in per.values() if np.isfinite(m[k])]
            if finite:
                draws["macro"][k].append(float(np.mean(finite)))
    return draws


def _percentiles(values: list[float], ci: float) -> list[float]:
    if not values:
        return [float("nan"), float("nan")]
    return [float(np.percentile(values, (1 - ci) / 2 * 100)), float(np.percentile(values, (1 + ci) / 2 * 100))]


def diagnosis_metrics(frame: pd.DataFrame, labels: list[str], score_prefix: str = "p_",
                      n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                      thresholds: dict[str, float] | None = None) -> dict:
    """Per-label and macro metrics on patient-level predictions, with bootstrap intervals.

    ``frame`` has one row per study with ``patient``, the true labels (0/1/NaN) under each label
    name and the predicted probability under ``score_prefix + label``. Unknown labels are excluded
    per label. Sensitivity/specificity are read at ``thresholds`` (per label, chosen on another split
    by :func:`select_thresholds`; NaN without). Intervals resample patients (``n_boot`` times).
    """
    thresholds = thresholds or {}
    cols = [score_prefix + name for name in labels]
    pat = patient_level(frame, labels, cols)
    per_label = {}
    for name in labels:
        known = pat[name].notna().to_numpy()
        y = pat.loc[known, name].to_numpy().astype(int)
        p = pat.loc[known, score_prefix + name].to_numpy()
        per_label[name] = (binary_metrics(y, p, float(thresholds.get(name, float("nan"))))
                           | {"n": int(known.sum()), "n_pos": int(y.sum())})
    finite = {k: [per_label[n][k] for n in labels if np.isfinite(per_label[n][k])] for k in METRIC_KEYS}
    macro = {k: float(np.mean(v)) if v else float("nan") for k, v in finite.items()}
    if n_boot:
        draws = _bootstrap(pat, labels, score_prefix, thresholds, n_boot, seed)
        for name in labels:
            per_label[name]["ci"] = {k: _percentiles(draws[name][k], ci) for k in METRIC_KEYS}
        macro["ci"] = {k: _percentiles(draws["macro"][k], ci) for k in METRIC_KEYS}
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an absent structure gives NaN/inf, handled below
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a case with no structure present: NaN
            case_mean = np.nanmean(arr, axis=1) if arr.size else arr
        out["mean"][metric] = interval(case_mean, ci, n_boot, seed)
    return out
