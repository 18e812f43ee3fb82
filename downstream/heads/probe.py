"""The closed-form reference probe (``head.kind: logistic``, and the ``probe`` row of every diagnosis run).

Mean and standard deviation over voxels per channel of every block map, concatenated over planes,
standardised per feature with training-row statistics; one L2 logistic regression per label
(scikit-learn ``LogisticRegressionCV``, balanced class weights, ``C`` chosen by patient-grouped,
stratified cross-validation on the training rows only). Unknown labels are left out of that label's
fit. The fitted coefficients live in a torch ``nn.Linear``, so the probe is saved, loaded and applied
like every other head.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn

from ..pooling import Pooler
from ..train import GetBatch, fit_standardizers, predict


class LogisticProbe(nn.Module):
    """Standardised mean+std pooled features of every plane -> per-label logits."""

    def __init__(self, channels: dict[str, Sequence[int]], n_labels: int):
        super().__init__()
        self.planes = list(channels)
        self.pools = nn.ModuleDict({p: Pooler("mean_std", c) for p, c in channels.items()})
        self.linear = nn.Linear(sum(pool.out_dim for pool in self.pools.values()), n_labels)

    def features(self, inputs: dict) -> torch.Tensor:
        return torch.cat([self.pools[p](inputs[p]) for p in self.planes], dim=1)

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.linear(self.features(inputs))


class _Features(nn.Module):
    def __init__(self, probe: LogisticProbe):
        super().__init__()
        self.probe = probe

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.probe.features(inputs)


def fit_probe(probe: LogisticProbe, get_batch: GetBatch, train_rows: np.ndarray, y: np.ndarray,
              groups: np.ndarray, cs: int = 10, folds: int = 5, seed: int = 0) -> list[dict]:
    """Fit ``probe`` on ``train_rows`` (``y``: all rows' labels, NaN = unknown; ``groups``: patient per
    row). Returns per label the chosen ``C``, the folds used and the training counts."""
    fit_standardizers(probe, get_batch, train_rows)
    x = predict(_Features(probe), get_batch, train_rows).double().numpy()
    y_tr, g_tr = y[train_rows], groups[train_rows]
    weight = np.zeros((y.shape[1], x.shape[1]))
    bias = np.zeros(y.shape[1])
    chosen = []
    for k in range(y.shape[1]):
        known = np.isfinite(y_tr[:, k])
        yk, xk, gk = y_tr[known, k].astype(int), x[known], g_tr[known]
        n_pos, n_neg = int(yk.sum()), int(len(yk) - yk.sum())
        n_folds = min(folds, n_pos, n_neg, len(set(gk)))
        info = {"n": int(len(yk)), "n_pos": n_pos, "C": None, "folds": n_folds}
        if n_folds >= 2:
            model = reference_fit(xk, yk, gk, cs, n_folds, seed)
            weight[k], bias[k] = model.coef_[0], model.intercept_[0]
            info["C"] = float(model.C_)
        elif n_pos and n_neg:                       # too few to cross-validate: the prevalence only
            bias[k] = np.log(n_pos / n_neg)
        chosen.append(info)
    with torch.no_grad():
        probe.linear.weight.copy_(torch.from_numpy(weight).float())
        probe.linear.bias.copy_(torch.from_numpy(bias).float())
    return chosen


def reference_fit(x: np.ndarray, y: np.ndarray, groups: np.ndarray, cs: int, folds: int, seed: int):
    """scikit-learn's L2 logistic regression with ``C`` from ``cs`` values by patient-grouped,
    stratified ``folds``-fold cross-validation (log loss), refitted on all of ``x``."""
    cv = list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y, groups))
    model = LogisticRegressionCV(Cs=cs, l1_ratios=(0.0,), cv=cv, scoring="neg_log_loss", class_weight="balanced",
                                 max_iter=5000, use_legacy_attributes=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)
