"""Per-case segmentation scores on the native grid, and their summaries with bootstrap intervals.

A case scores each class with MONAI's Dice and HD95 (mm, the study's own spacing). A structure absent
from a case's ground truth is *absent*: excluded from every mean and counted (with how often the
model still predicted it), never scored 0 or 1. Intervals are percentile bootstraps of the mean over
cases (scipy), as MRAnnotator reports them.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot
from scipy import stats


def case_scores(pred: np.ndarray, truth: np.ndarray, n_classes: int, spacing: Sequence[float]) -> dict:
    """``{"dice", "hd95": (K,) NaN where absent, "present", "predicted": (K,) bool}`` for one case
    (integer maps on the same grid; class 0 is background)."""
    p = one_hot(torch.as_tensor(pred)[None, None].long(), n_classes)
    t = one_hot(torch.as_tensor(truth)[None, None].long(), n_classes)
    present = t[0, 1:].flatten(1).any(1).numpy()
    predicted = p[0, 1:].flatten(1).any(1).numpy()
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(p, t)[0].numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # absent or missed structures give NaN/inf, masked below
        hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
            p, t, spacing=[float(s) for s in spacing])[0].numpy()
    hd = np.where(present & predicted & np.isfinite(hd), hd, np.nan)
    return {"dice": np.where(present, dice, np.nan), "hd95": hd, "present": present, "predicted": predicted}


def bootstrap_mean(values, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> dict:
    """Mean of the finite ``values`` and its percentile-bootstrap interval (``n`` cases)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"mean": None, "ci": [None, None], "n": 0}
    if len(v) == 1 or np.ptp(v) == 0 or not n_boot:
        return {"mean": float(v.mean()), "ci": [float(v.mean())] * 2, "n": int(len(v))}
    res = stats.bootstrap((v,), np.mean, n_resamples=n_boot, confidence_level=ci, method="percentile",
                          random_state=np.random.default_rng(seed))
    return {"mean": float(v.mean()), "ci": [float(res.confidence_interval.low), float(res.confidence_interval.high)],
            "n": int(len(v))}


def summarise(cases: list[dict], classes: Sequence[str], regions: dict[str, Sequence[str]],
              n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> dict:
    """Per structure, per region (the cases of that anatomy, mean over its present structures) and
    overall: Dice and HD95 with intervals, plus present / absent / false-positive counts."""
    if not cases:
        return {"n_cases": 0, "per_structure": {}, "per_region": {}, "overall": {}}
    dice = np.stack([c["dice"] for c in cases])
    hd = np.stack([c["hd95"] for c in cases])
    present = np.stack([c["present"] for c in cases])
    predicted = np.stack([c["predicted"] for c in cases])
    joints = np.array([c["joint"] for c in cases])
    per_structure = {}
    for k, name in enumerate(classes):
        holders = np.isin(joints, [j for j, names in regions.items() if name in names])
        per_structure[name] = {
            "dice": bootstrap_mean(dice[:, k], n_boot, ci, seed), "hd95": bootstrap_mean(hd[:, k], n_boot, ci, seed),
            "n_present": int(present[:, k].sum()), "n_absent": int((holders & ~present[:, k]).sum()),
            "n_false_positive": int((~present[:, k] & predicted[:, k]).sum()),
            "n_missed": int((present[:, k] & ~predicted[:, k]).sum())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a case without any present structure: NaN
        case_dice, case_hd = np.nanmean(dice, axis=1), np.nanmean(hd, axis=1)
    per_region = {j: {"dice": bootstrap_mean(case_dice[joints == j], n_boot, ci, seed),
                      "hd95": bootstrap_mean(case_hd[joints == j], n_boot, ci, seed),
                      "n_cases": int((joints == j).sum())}
                  for j in sorted(set(joints.tolist()))}
    overall = {"dice": bootstrap_mean(case_dice, n_boot, ci, seed), "hd95": bootstrap_mean(case_hd, n_boot, ci, seed)}
    return {"n_cases": len(cases), "per_structure": per_structure, "per_region": per_region, "overall": overall}
