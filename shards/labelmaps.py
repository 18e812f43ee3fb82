"""One class vocabulary over many anatomies (MRAnnotator's one model for all regions).

Each anatomy numbers its own structures (value -> name, 0 = background); the model's classes are
the ordered union of the names, so ``femur`` of the knee and of the hip is one class. A label-map
value that its anatomy does not declare maps to ``ignore_index`` (left out of the loss and of the
scores) and is reported by :func:`undeclared_values`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def union_structures(tables: Mapping[str, Sequence[str]]) -> list[str]:
    """Ordered union of the anatomies' structure names, background excluded."""
    out: list[str] = []
    for names in tables.values():
        out += [n for n in names if n != "background" and n not in out]
    return out


def class_lut(declared: Sequence[str], classes: Sequence[str], ignore_index: int = 255) -> np.ndarray:
    """A 256-entry table: label value -> class index (1..K), 0 for background or a declared structure
    that is not a class, ``ignore_index`` for values the anatomy does not declare."""
    lut = np.full(256, ignore_index, np.int64)
    lut[: len(declared)] = 0
    index = {name: k for k, name in enumerate(classes, start=1)}
    for value, name in enumerate(declared):
        lut[value] = index.get(name, 0)
    return lut


def to_classes(seg: np.ndarray, declared: Sequence[str], classes: Sequence[str], ignore_index: int = 255) -> np.ndarray:
    if seg.min() < 0 or seg.max() > 255:
        raise ValueError(f"label values must lie in 0..255, got {seg.min()}..{seg.max()}")
    return class_lut(declared, classes, ignore_index)[seg.astype(np.int64)]


def undeclared_values(seg: np.ndarray, declared: Sequence[str]) -> list[int]:
    """Label values present in ``seg`` that its anatomy does not declare."""
    return [int(v) for v in np.unique(seg) if not 0 <= v < len(declared)]


def structure_tables(manifest: dict, joints: Sequence[str]) -> dict[str, list[str]]:
    """Per anatomy its structure names by label value (index = value, 0 = background)."""
    from .schema import STRUCTURES

    missing = [j for j in joints if j not in STRUCTURES]
    if missing:
        raise ValueError(f"no label-map structures declared for {missing}; declared: {', '.join(STRUCTURES)}")
    return {j: list(STRUCTURES[j]) for j in joints}
