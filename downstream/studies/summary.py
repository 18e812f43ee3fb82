"""Study tables: metric means over seeds with confidence intervals, and paired differences.

Across seeds (each seed redraws the training subset and the head's initialisation) the interval is
Student's t on the per-seed values. With a single seed it falls back to that trial's own
percentile bootstrap over test patients (computed by ``downstream.metrics``). A paired difference
(pretrained minus a baseline, in-domain minus cross-domain) is taken per seed first, so the
shared test set's difficulty cancels.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats


def seed_interval(values, ci: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the finite ``values``; low/high NaN below two values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan"), float("nan"), 1
    half = float(stats.t.ppf((1 + ci) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half, len(v)


def aggregate(trials: pd.DataFrame, by: list[str], metric: str, ci: float = 0.95) -> pd.DataFrame:
    """Mean and CI of ``metric`` over seeds per group of ``by`` (successful trials only)."""
    ok = trials[trials["error"].isna() & trials["model"].notna()]
    rows = []
    for keys, group in ok.groupby(by, sort=True, dropna=False):
        mean, lo, hi, n = seed_interval(group[metric], ci)
        method = "t over seeds"
        if n == 1 and f"{metric}_lo" in group:
            only = group[group[metric].notna()].iloc[0]
            lo, hi, method = float(only[f"{metric}_lo"]), float(only[f"{metric}_hi"]), "bootstrap (1 seed)"
        rows.append(dict(zip(by, keys if isinstance(keys, tuple) else (keys,))) |
                    {"mean": mean, "lo": lo, "hi": hi, "n_seeds": n, "ci_method": method,
                     "n_train": _median(group["n_train"]), "n_eval": _median(group["n_eval"])})
    return pd.DataFrame(rows)


def paired_difference(trials: pd.DataFrame, by: list[str], column: str, a, b, metric: str,
                      ci: float = 0.95) -> pd.DataFrame:
    """Per group of ``by``: mean and t-CI over seeds of ``metric`` where ``column == a`` minus where
    ``column == b``, matched on seed and the other tags."""
    ok = trials[trials["error"].isna() & trials["model"].notna()]
    key = [*by, "seed"]
    left = ok[ok[column] == a].set_index(key)[metric]
    right = ok[ok[column] == b].set_index(key)[metric]
    diff = (left - right).dropna().reset_index()
    rows = []
    for keys, group in diff.groupby(by, sort=True):
        mean, lo, hi, n = seed_interval(group[metric], ci)
        rows.append(dict(zip(by, keys if isinstance(keys, tuple) else (keys,))) |
                    {"difference": mean, "lo": lo, "hi": hi, "n_seeds": n})
    return pd.DataFrame(rows)


def _median(values: pd.Series) -> float:
    v = pd.to_numeric(values, errors="coerce").dropna()
    return float(v.median()) if len(v) else float("nan")


def fmt_ci(mean: float, lo: float, hi: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "n/a"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def errors_table(trials: pd.DataFrame) -> pd.DataFrame:
    failed = trials[trials["error"].notna()].drop_duplicates("trial")
    return failed[["trial", "error"]].reset_index(drop=True)
