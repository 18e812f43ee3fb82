"""Dataset statistics kept in the manifest: counts per joint/site/field/vendor/split, per-plane
shapes, spacing and intensity percentiles (the data fingerprint preprocessing reads back), and
per-label prevalence. Statistics are plain dicts of sums so shards written in different runs merge."""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import numpy as np

from .schema import PLANES

PERCENTILES = (0.5, 50.0, 99.5)


def _bump(d: dict, key: Any, n: float = 1) -> None:
    d[str(key)] = d.get(str(key), 0) + n


def empty_stats() -> dict:
    return {"n_samples": 0, "joint": {}, "site": {}, "field_strength": {}, "vendor": {},
            "split": {}, "anatomy": {}, "coils": {}, "planes": {}, "labels": {}}


def add_sample(stats: dict, sample: dict, split: str) -> None:
    """Accumulate one decoded sample (study or reconstruction slice)."""
    meta = sample.get("meta", {})
    stats["n_samples"] += 1
    _bump(stats["split"], split)
    for field in ("joint", "site", "field_strength", "vendor"):
        if field in meta:
            _bump(stats[field], meta[field])
    if "kspace" in sample:
        _bump(stats["anatomy"], meta.get("anatomy", meta.get("joint", "unknown")))
        _bump(stats["coils"], sample["kspace"].shape[0])
    for plane in PLANES:
        vol = sample.get(plane)
        if vol is None:
            continue
        ps = stats["planes"].setdefault(plane, {"n": 0, "shapes": {}, "spacing_sum": [0.0, 0.0, 0.0],
                                                 "pct_sum": [0.0] * len(PERCENTILES),
                                                 "mean_sum": 0.0, "std_sum": 0.0, "contrast": {}})
        ps["n"] += 1
        _bump(ps["shapes"], "x".join(map(str, vol.shape)))
        spacing = meta["planes"][plane]["spacing"]
        ps["spacing_sum"] = [a + float(b) for a, b in zip(ps["spacing_sum"], spacing)]
        sub = vol.reshape(-1)[:: max(1, vol.size // 65536)].astype(np.float64)
        ps["pct_sum"] = [a + float(b) for a, b in zip(ps["pct_sum"], np.percentile(sub, PERCENTILES))]
        ps["mean_sum"] += float(sub.mean())
        ps["std_sum"] += float(sub.std())
        _bump(ps["contrast"], meta["planes"][plane].get("contrast", "unknown"))
    labels = sample.get("labels") or {}
    joint = meta.get("joint", "unknown")
    for name, value in labels.items():
        ls = stats["labels"].setdefault(joint, {}).setdefault(name, {"pos": 0, "neg": 0, "unknown": 0})
        ls["unknown" if value is None else ("pos" if value else "neg")] += 1  # pos: any class but the first
        if value is not None:
            _bump(ls.setdefault("values", {}), int(value))


def merge(a: dict, b: dict) -> dict:
    """Sum two statistics dicts (as produced by :func:`add_sample`)."""
    out: dict = {}
    for key in set(a) | set(b):
        va, vb = a.get(key), b.get(key)
        if va is None or vb is None:
            out[key] = va if vb is None else vb
        elif isinstance(va, dict):
            out[key] = merge(va, vb)
        elif isinstance(va, list):
            out[key] = [x + y for x, y in zip(va, vb)]
        else:
            out[key] = va + vb
    return out


def summarize(stats: dict) -> dict:
    """Turn sums into means: the form stored under ``manifest['stats']`` for readers."""
    stats = copy.deepcopy(stats)
    out = {k: v for k, v in stats.items() if k != "planes"}
    out["planes"] = {}
    for plane, ps in stats["planes"].items():
        n = max(ps["n"], 1)
        out["planes"][plane] = {
            "n": ps["n"],
            "shapes": ps["shapes"],
            "contrast": ps["contrast"],
            "spacing_mean": [round(s / n, 4) for s in ps["spacing_sum"]],
            "intensity": {f"p{p:g}": round(s / n, 5) for p, s in zip(PERCENTILES, ps["pct_sum"])}
            | {"mean": round(ps["mean_sum"] / n, 5), "std": round(ps["std_sum"] / n, 5)},
            "common_shape": [int(x) for x in Counter(ps["shapes"]).most_common(1)[0][0].split("x")],
        }
    for labels in stats["labels"].values():
        for c in labels.values():
            known = c["pos"] + c["neg"]
            c["prevalence"] = round(c["pos"] / known, 4) if known else None
    return out
