"""The dataset declaration: which anatomies, diagnosis labels, label-map structures, EHR fields and
planes a shard set holds (in the spirit of nnU-Net's ``dataset.json``).

A declaration is a YAML beside the data (``shards ingest ... dataset=<yaml>``), inferred by the ingest
from its tables and label maps when none is given, or written by the synthetic generator
(:func:`shards.synth.vocab.synth_declaration`). The manifest (schema v2) carries it under ``dataset``;
v1 manifests have none and read as the synthetic vocabulary. Every layer reads the vocabulary from
here (via :func:`dataset_of`), never from module constants. See ``docs/datasets.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from .config import ConfigError, load_config, to_dict

LABEL_TYPES = ("binary", "multiclass", "ordinal")
EHR_TYPES = ("numeric", "categorical")
PLANES = ("sag", "cor", "ax")


@dataclass
class LabelSpec:
    """One diagnosis label. Stored values: binary 0/1; multiclass/ordinal the class index (0..K-1,
    ``classes`` names them, in order for ordinal grades); ``None`` = unknown."""

    type: str = "binary"
    classes: list[str] = field(default_factory=list)
    description: str = ""

    @property
    def n_classes(self) -> int:
        return 2 if self.type == "binary" else len(self.classes)

    def check_value(self, value: Any) -> str | None:
        """None when ``value`` is a valid stored value, else why not."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            return f"value {value!r} is not an integer class"
        if not 0 <= int(value) < self.n_classes:
            known = "0/1" if self.type == "binary" else f"0..{self.n_classes - 1} ({', '.join(self.classes)})"
            return f"value {value!r} outside its classes {known}"
        return None


@dataclass
class EHRField:
    """One EHR field: ``numeric`` (``unit``, plausible ``range`` [lo, hi]; values outside are
    contradictions) or ``categorical`` (closed vocabulary ``values``; other text is free text)."""

    type: str = "numeric"
    unit: str = ""
    range: list[float] = field(default_factory=list)
    values: list[str] = field(default_factory=list)
    description: str = ""

    def check_value(self, value: Any) -> str | None:
        """None when ``value`` fits the field, else why not. Categorical text outside the vocabulary is
        free text, which the ingest's de-identification rules handle (dropped, or kept screened)."""
        if value is None or self.type != "numeric":
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"value {value!r} is not a number"
        if self.range and not self.range[0] <= value <= self.range[1]:
            return f"value {value!r} outside its plausible range {self.range} {self.unit}".rstrip()
        return None


@dataclass
class AnatomySpec:
    """One anatomy: its diagnosis labels and its label-map structures (name -> integer value in
    ``<plane>.seg``; 0 is background and is not listed)."""

    labels: dict[str, LabelSpec] = field(default_factory=dict)
    structures: dict[str, int] = field(default_factory=dict)


@dataclass
class DatasetDeclaration:
    name: str = ""
    description: str = ""
    anatomies: dict[str, AnatomySpec] = field(default_factory=dict)
    ehr: dict[str, EHRField] = field(default_factory=dict)
    planes: list[str] = field(default_factory=lambda: list(PLANES))

    def validate(self) -> None:
        where = f"dataset '{self.name}'" if self.name else "dataset"
        if not self.anatomies:
            raise ConfigError(f"{where}: anatomies is empty (declare at least one, e.g. anatomies.hip)")
        bad = [p for p in self.planes if p not in PLANES]
        if bad or not self.planes:
            raise ConfigError(f"{where}: planes {bad or '(empty)'} unknown; known: {', '.join(PLANES)}")
        for anatomy, spec in self.anatomies.items():
            if not anatomy or "/" in anatomy or "." in anatomy:
                raise ConfigError(f"{where}: anatomy name '{anatomy}' must be non-empty, without '.' or '/'")
            for label, ls in spec.labels.items():
                key = f"{where}: anatomies.{anatomy}.labels.{label}"
                if not label or "=" in label:
                    raise ConfigError(f"{key}: a label name must be non-empty, without '='")
                if ls.type not in LABEL_TYPES:
                    raise ConfigError(f"{key}.type '{ls.type}' unknown; known: {', '.join(LABEL_TYPES)}")
                if ls.type == "binary" and ls.classes:
                    raise ConfigError(f"{key}: a binary label has no classes (use type: multiclass)")
                if ls.type != "binary" and (len(ls.classes) < 2 or len(set(ls.classes)) != len(ls.classes)):
                    raise ConfigError(f"{key}: a {ls.type} label needs >= 2 distinct class names, got {ls.classes}")
            values = list(spec.structures.values())
            if any(not 0 < v < 256 for v in values) or len(set(values)) != len(values):
                raise ConfigError(f"{where}: anatomies.{anatomy}.structures values must be distinct integers "
                                  f"1..255 (0 is background), got {spec.structures}")
            if "background" in spec.structures:
                raise ConfigError(f"{where}: anatomies.{anatomy}.structures: 'background' is value 0, do not list it")
        for name, ef in self.ehr.items():
            if ef.type not in EHR_TYPES:
                raise ConfigError(f"{where}: ehr.{name}.type '{ef.type}' unknown; known: {', '.join(EHR_TYPES)}")
            if ef.range and (len(ef.range) != 2 or ef.range[0] > ef.range[1]):
                raise ConfigError(f"{where}: ehr.{name}.range must be [low, high], got {ef.range}")

    # -- lookups every layer uses -----------------------------------------------------------------

    def anatomy(self, name: str) -> AnatomySpec:
        if name not in self.anatomies:
            raise ConfigError(f"anatomy '{name}' is not in the dataset; anatomies: {', '.join(self.anatomies)}")
        return self.anatomies[name]

    def labels(self, anatomy: str) -> dict[str, LabelSpec]:
        return self.anatomy(anatomy).labels

    def structure_values(self, anatomy: str) -> dict[str, int]:
        """Structure name -> label-map value, background (0) first."""
        return {"background": 0, **self.anatomy(anatomy).structures}

    def to_dict(self) -> dict:
        return to_dict(self)


def load_declaration(path: str | Path, overrides=()) -> DatasetDeclaration:
    """A validated declaration from YAML (unknown keys are errors naming the key)."""
    return load_config(DatasetDeclaration, path, overrides)


def declaration_from_dict(data: dict, origin: str = "manifest") -> DatasetDeclaration:
    try:
        return load_config(DatasetDeclaration, None, (), base=dict(data))
    except ConfigError as exc:
        raise ConfigError(f"{origin}: dataset declaration: {exc}") from exc


def dataset_of(manifest: dict) -> DatasetDeclaration:
    """The vocabulary of a shard set: the manifest's declaration (v2), or the synthetic one (v1)."""
    if manifest.get("dataset"):
        return declaration_from_dict(manifest["dataset"], str(manifest.get("_base", "manifest")))
    from .synth.vocab import synth_declaration  # v1: shards were written with the generator's vocabulary

    return synth_declaration()


def save_declaration(decl: DatasetDeclaration, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.create(decl.to_dict())))


def declared_words(decl: DatasetDeclaration) -> set[str]:
    """Every name a declaration puts into a manifest (the PHI scan does not take them for identifiers)."""
    words = {decl.name, *decl.planes, *decl.ehr}
    for anatomy, spec in decl.anatomies.items():
        words |= {anatomy, *spec.labels, *spec.structures}
        words |= {c for ls in spec.labels.values() for c in ls.classes}
    words |= {w for f in decl.ehr.values() for w in (*f.values, f.unit)}
    return {w for w in words if w}


def check_sample(decl: DatasetDeclaration, sample: dict) -> list[str]:
    """Contradictions between a study sample and the declaration (empty when none): anatomy, label
    names and values, EHR values, label-map values."""
    meta = sample.get("meta") or {}
    anatomy = meta.get("joint")
    if anatomy not in decl.anatomies:
        return [f"anatomy '{anatomy}' is not declared; anatomies: {', '.join(decl.anatomies)}"]
    spec = decl.anatomies[anatomy]
    problems = []
    for name, value in (sample.get("labels") or {}).items():
        if name not in spec.labels:
            problems.append(f"label '{name}' is not declared for {anatomy}; labels: {', '.join(spec.labels) or 'none'}")
        elif why := spec.labels[name].check_value(value):
            problems.append(f"label '{name}': {why}")
    for name, value in (sample.get("ehr") or {}).items():
        if name in decl.ehr and (why := decl.ehr[name].check_value(value)):
            problems.append(f"ehr '{name}': {why}")
    allowed = {0, *spec.structures.values()}
    for plane in PLANES:
        seg = sample.get(f"{plane}.seg")
        if seg is not None:
            extra = sorted(set(np.unique(seg).tolist()) - allowed)
            if extra:
                problems.append(f"{plane}.seg values {extra[:10]} are not declared structures of {anatomy} "
                                f"(declared: 0=background, {', '.join(f'{v}={n}' for n, v in spec.structures.items())})")
    return problems
