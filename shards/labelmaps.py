"""One class vocabulary over many anatomies (MRAnnotator's one model for all regions).

Each anatomy numbers its own structures (value -> name, 0 = background), as the shard set's dataset
declaration says (:func:`shards.dataset.dataset_of`); the model's classes are the ordered union of
the names, so ``femur`` of the knee and of the hip is one class. A label-map value that its anatomy
does not declare (beyond the table, or a gap in it: ``None``) maps to ``ignore_index`` (left out of
the loss and of the scores) and is reported by :func:`undeclared_values`.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np


def union_structures(tables: Mapping[str, Sequence[str]]) -> list[str]:
    """Ordered union of the anatomies' structure names, background excluded."""
    out: list[str] = []
    for names in tables.values():
        out += [n for n in names if n not in (None, "background") and n not in out]
    return out


def class_lut(declared: Sequence[str], classes: Sequence[str], ignore_index: int = 255) -> np.ndarray:
    """A 256-entry table: label value -> class index (1..K), 0 for background or a declared structure
    that is not a class, ``ignore_index`` for values the anatomy does not declare."""
    lut = np.full(256, ignore_index, np.int64)
    index = {name: k for k, name in enumerate(classes, start=1)}
    for value, name in enumerate(declared):
        if name is not None:
            lut[value] = index.get(name, 0)
    return lut


def to_classes(seg: np.ndarray, declared: Sequence[str], classes: Sequence[str], ignore_index: int = 255) -> np.ndarray:
    if seg.min() < 0 or seg.max() > 255:
        raise ValueError(f"label values must lie in 0..255, got {seg.min()}..{seg.max()}")
    return class_lut(declared, classes, ignore_index)[seg.astype(np.int64)]


def undeclared_values(seg: np.ndarray, declared: Sequence[str]) -> list[int]:
    """Label values present in ``seg`` that its anatomy does not declare."""
    return [int(v) for v in np.unique(seg) if not 0 <= v < len(declared) or declared[int(v)] is None]


def by_value(values: Mapping[str, int]) -> list[Optional[str]]:
    """A declaration's name -> value mapping as a table indexed by value (``None`` = not declared)."""
    table: list[Optional[str]] = [None] * (max(values.values(), default=0) + 1)
    for name, value in values.items():
        table[value] = name
    return table


def structure_tables(manifest: dict, joints: Sequence[str]) -> dict[str, list[Optional[str]]]:
    """Per anatomy its structure names by label value (index = value, 0 = background), from the
    manifest's dataset declaration."""
    from .dataset import dataset_of

    decl = dataset_of(manifest)
    missing = [j for j in joints if j not in decl.anatomies]
    if missing:
        raise ValueError(f"no label-map structures declared for {missing}; the shards declare: {', '.join(decl.anatomies)}")
    return {j: by_value(decl.structure_values(j)) for j in joints}
