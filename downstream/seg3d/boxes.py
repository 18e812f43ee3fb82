"""Box prompts from the ground truth (the SAM study's protocol): the tight 3D box of each present
structure, each face moved by a seeded jitter (a fraction of the box's extent on that axis), then
clipped to the volume. The jitter of one (study, structure) depends only on the seed, the study key
and the structure, so boxes are reproducible whatever else the run contains. A box that had to be
clipped is marked and named in the report; one left empty by clipping is dropped and named.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Box:
    structure: str
    lo: tuple[int, int, int]   # first voxel per axis
    hi: tuple[int, int, int]   # one past the last voxel per axis
    clipped: bool = False

    def mask(self, shape) -> np.ndarray:
        m = np.zeros(shape, bool)
        m[tuple(slice(a, b) for a, b in zip(self.lo, self.hi))] = True
        return m


def _key_seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


def tight_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    idx = np.argwhere(mask)
    return (idx.min(0), idx.max(0) + 1) if len(idx) else None


def jitter_box(lo, hi, shape, jitter: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, bool]:
    """Move each face by up to ``jitter`` x the extent (uniform), then clip to the volume."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    extent = hi - lo
    lo = np.round(lo + rng.uniform(-jitter, jitter, 3) * extent).astype(int)
    hi = np.round(hi + rng.uniform(-jitter, jitter, 3) * extent).astype(int)
    clo, chi = np.clip(lo, 0, shape), np.clip(hi, 0, shape)
    return clo, chi, bool((clo != lo).any() or (chi != hi).any())


def prompt_boxes(truth: np.ndarray, classes, key: str, jitter: float, seed: int) -> tuple[list[Box], list[dict]]:
    """Boxes of the structures present in ``truth`` (class map, 1..K = ``classes``), and the
    problems to report (``{"study", "structure", "problem"}``: clipped, or empty after clipping)."""
    boxes, problems = [], []
    for k, name in enumerate(classes, start=1):
        tight = tight_box(truth == k)
        if tight is None:
            continue
        rng = np.random.default_rng([seed, _key_seed(key), k])
        lo, hi, clipped = jitter_box(*tight, truth.shape, jitter, rng)
        if (hi <= lo).any():
            problems.append({"study": key, "structure": name, "problem": "box outside the volume (dropped)"})
            continue
        if clipped:
            problems.append({"study": key, "structure": name, "problem": "box clipped to the volume"})
        boxes.append(Box(name, tuple(int(v) for v in lo), tuple(int(v) for v in hi), clipped))
    return boxes, problems
