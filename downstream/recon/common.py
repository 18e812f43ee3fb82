"""What the reconstruction studies share: bootstrap intervals, per-slice Dice, the acceleration's mask."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import bootstrap

from pretrain.recon.evaluate import DEFAULT_CENTER

from monai.metrics import DiceMetric
from monai.networks.utils import one_hot


def mean_ci(values, ci: float = 0.95, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean and percentile-bootstrap interval (scipy) of the finite ``values``; NaN bounds for < 2 values."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) < 2 or np.ptp(v) == 0:
        m = float(v.mean()) if len(v) else float("nan")
        return {"mean": m, "ci": [m, m] if len(v) else [float("nan")] * 2, "n": int(len(v))}
    res = bootstrap((v,), np.mean, confidence_level=ci, n_resamples=n_boot, method="percentile",
                    random_state=np.random.default_rng(seed))
    return {"mean": float(v.mean()), "ci": [float(res.confidence_interval.low), float(res.confidence_interval.high)],
            "n": int(len(v))}


def fmt(stat: dict, digits: int = 3) -> str:
    if not np.isfinite(stat["mean"]):
        return "n/a"
    return f"{stat['mean']:.{digits}f} [{stat['ci'][0]:.{digits}f}, {stat['ci'][1]:.{digits}f}]"


def slice_dice(logits: torch.Tensor, truth: torch.Tensor, n_classes: int) -> float:
    """Mean Dice over the structures present in prediction or truth of one slice (MONAI), background excluded."""
    pred = one_hot(logits.argmax(dim=0)[None, None], n_classes)
    true = one_hot(truth.long()[None, None], n_classes)
    scores = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(pred, true).numpy()
    finite = scores[np.isfinite(scores)]
    return float(finite.mean()) if finite.size else float("nan")


def mask_spec(kind: str, acceleration: float) -> dict:
    """The retrospective mask of one acceleration (fastMRI's centre pairing: 4x 0.08, 8x 0.04, else 0.32/R);
    1x is the fully sampled ``full`` mask."""
    if acceleration == 1:
        return {"kind": "full", "acceleration": 1.0}
    return {"kind": kind, "acceleration": float(acceleration),
            "center_fraction": float(DEFAULT_CENTER.get(int(acceleration), 0.32 / acceleration))}
