"""Patient-level train/val/test assignment, stable under re-runs and under adding patients."""

from __future__ import annotations

import hashlib

SPLIT_ORDER = ("train", "val", "test")


def assign_split(patient_key: str, fractions: dict[str, float], seed: int = 0) -> str:
    """Deterministic split of a patient: sha256 of ``f"{seed}:{patient_key}"`` mapped to [0, 1)
    and cut by the cumulative fractions in the order train, val, test.

    Every study of a patient lands in the same split, and a patient's split does not depend on
    which other patients are in the dataset.
    """
    names = [s for s in SPLIT_ORDER if fractions.get(s, 0) > 0] + sorted(
        s for s in fractions if s not in SPLIT_ORDER and fractions[s] > 0)
    total = sum(fractions[s] for s in names)
    if not names or total <= 0:
        raise ValueError(f"split fractions must have a positive entry, got {fractions}")
    digest = hashlib.sha256(f"{seed}:{patient_key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name in names:
        edge += fractions[name] / total
        if u < edge:
            return name
    return names[-1]
