"""Study tables: metric means over seeds with confidence intervals, and paired differences.

Across seeds (each seed redraws the training subset and the head's initialisation) the interval is
Student's t on the per-seed values. With a single seed it falls back to that trial's own
percentile bootstrap over test patients (computed by ``downstream.metrics``). A paired difference
(pretrained minus a baseline, in-domain minus cross-domain) is taken per seed first, so the
shared test set's difficulty cancels. With few seeds that t-interval is wide; the paired patient
bootstrap (:class:`PatientBootstrap`) resamples the shared test patients instead, the
same draw for both models and every seed, and gives the interval of the seed-mean difference that
test-set sampling leaves.
"""

from __future__ import annotations

import math
import warnings

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ..metrics import patient_level


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


def draw_aurocs(y: np.ndarray, p: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """AUROC of scores ``p`` for labels ``y`` (0/1, NaN = unknown, excluded) on each row of patient
    indices ``draws`` (Mann-Whitney on average ranks, as scikit-learn); NaN where a draw holds one
    class only."""
    yd, pd_ = y[draws], p[draws]
    known = np.isfinite(yd)
    ranks = stats.rankdata(np.where(known, pd_, np.nan), axis=1, nan_policy="omit")
    pos = known & (yd == 1)
    n_pos, n_neg = pos.sum(1), (known & (yd == 0)).sum(1)
    rank_sum = np.where(pos, ranks, 0.0).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def macro_auroc_draws(frame: pd.DataFrame, labels: list[str], model: str, draws: np.ndarray) -> np.ndarray:
    """Macro AUROC (mean over the labels with both classes in the draw) of ``model``'s patient-level
    scores (columns ``model/label``; ``frame`` is patient level) per row of ``draws``."""
    per = np.stack([draw_aurocs(frame[label].to_numpy(float), frame[f"{model}/{label}"].to_numpy(float), draws)
                    for label in labels], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a draw with one class in every label stays NaN
        return np.nanmean(per, axis=1)


class PatientBootstrap:
    """Paired bootstrap over the test patients that a study's trials share: each draw resamples the
    patients once, and every trial and model is scored on that same draw, so differences between
    models (and their means over seeds) keep the pairing. Draw 0 is the observed sample."""

    def __init__(self, run_dir: Path, labels: list[str], n_boot: int = 1000, seed: int = 0):
        self.run_dir, self.labels, self.n_boot, self.seed = Path(run_dir), labels, n_boot, seed
        self.patients: list[str] | None = None
        self.draws: np.ndarray | None = None
        self._frames: dict[str, pd.DataFrame | None] = {}
        self._macro: dict[tuple[str, str], np.ndarray] = {}

    def frame(self, trial: str) -> pd.DataFrame | None:
        """The trial's evaluation predictions at the patient level, in the shared patient order; None
        without ``study_predictions.csv`` or when its patients differ from the first trial's."""
        if trial not in self._frames:
            path = self.run_dir / "trials" / trial / "study_predictions.csv"
            frame = None
            if path.is_file():
                study = pd.read_csv(path, dtype={"patient": str})
                frame = patient_level(study, self.labels, [c for c in study.columns if "/" in c])
                if self.patients is None:
                    self.patients = list(frame["patient"])
                    rng = np.random.default_rng(self.seed)
                    n = len(self.patients)
                    self.draws = np.vstack([np.arange(n), rng.integers(0, n, (self.n_boot, n))])
                frame = (frame.set_index("patient").loc[self.patients].reset_index()
                         if sorted(frame["patient"]) == sorted(self.patients) else None)
            self._frames[trial] = frame
        return self._frames[trial]

    def macro(self, trial: str, model: str) -> np.ndarray | None:
        if (trial, model) not in self._macro:
            frame = self.frame(trial)
            if frame is None:
                return None
            self._macro[trial, model] = macro_auroc_draws(frame, self.labels, model, self.draws)
        return self._macro[trial, model]

    def difference(self, trials: list[str], a: str, b: str, ci: float = 0.95) -> dict | None:
        """Macro AUROC of ``a`` minus ``b`` averaged over ``trials`` (one per seed), with the percentile
        interval of that mean over the draws; None when a trial lacks comparable predictions."""
        parts = [(self.macro(t, a), self.macro(t, b)) for t in trials]
        if not parts or any(x is None or y is None for x, y in parts):
            return None
        diff = np.mean([x - y for x, y in parts], axis=0)
        boot = diff[1:][np.isfinite(diff[1:])]
        lo, hi = (np.percentile(boot, [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100]) if len(boot)
                  else (float("nan"), float("nan")))
        return {"difference": float(diff[0]), "lo": float(lo), "hi": float(hi), "n_seeds": len(trials),
                "n_patients": len(self.patients)}


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
