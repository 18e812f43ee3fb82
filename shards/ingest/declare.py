"""The dataset declaration of an ingest: the user's YAML (``dataset=<yaml>``), or one inferred from the
found studies, the label and EHR tables and the label maps, written into the ingest report for the
user to confirm (then pass it back with ``dataset=``).

An anatomy the synthetic generator knows (knee, ankle, shoulder) starts from the generator's labels and
structures, so exports of those joints ingest as before; a column whose name is close to a known name
is taken for a typo and left out (the table report suggests the name). Inference never turns free
text into vocabulary: a label column becomes binary (0/1, yes/no, ...),
ordinal (integers 0..K-1) or multiclass only when it has at most :data:`MAX_CLASSES` values each seen
in at least two rows; an EHR column becomes numeric when every value is a number (no plausible range
is guessed), or takes the synthetic generator's spec when it has one of its names. Anything else is
left out and named in the report's notes.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Callable

import pandas as pd

from ..dataset import PLANES, AnatomySpec, DatasetDeclaration, EHRField, LabelSpec, load_declaration
from ..synth.vocab import EHR as SYNTH_EHR
from ..synth.vocab import synth_declaration
from .config import IngestConfig
from .tables import BINARY_FALSE, BINARY_TRUE, IGNORED_COLUMNS, TableError, read_table

MAX_CLASSES = 12


def resolve_dataset(cfg: IngestConfig, anatomies: list[str], label_values: Callable[[], dict[str, set[int]]]
                    ) -> tuple[DatasetDeclaration, dict]:
    """The declaration to ingest with, and what the report says about it."""
    if cfg.dataset:
        decl = load_declaration(cfg.dataset)
        return decl, {"source": "declared", "path": Path(cfg.dataset).name, "declaration": decl.to_dict()}
    decl, notes = infer_declaration(cfg, anatomies, label_values())
    return decl, {"source": "inferred", "notes": notes, "declaration": decl.to_dict(),
                  "confirm": "check this declaration, save it as YAML and pass it back with dataset=<yaml>"}


def _frame(path: str, key_column: str) -> pd.DataFrame | None:
    if not path:
        return None
    try:
        frame = read_table(path)
    except TableError:
        return None  # the table join reports it
    return frame.drop(columns=[c for c in frame.columns if c == key_column or c in IGNORED_COLUMNS])


def _values(series: pd.Series) -> list[str]:
    return [str(v).strip() for v in series.tolist() if v is not None and str(v).strip() not in ("", "nan")]


def infer_label(values: list[str]) -> LabelSpec | str:
    """A label spec from a column's values, or why none is inferred."""
    lower = [v.lower() for v in values]
    if set(lower) <= set(BINARY_TRUE) | set(BINARY_FALSE):
        return LabelSpec("binary")
    counts = pd.Series(lower).value_counts()
    if len(counts) > MAX_CLASSES or (counts < 2).any():
        return f"{len(counts)} distinct values, some seen once: not inferred as classes (declare it)"
    try:
        numbers = sorted({float(v) for v in lower})
    except ValueError:
        return LabelSpec("multiclass", sorted({v for v in values}, key=str.lower))
    if all(n == int(n) and n >= 0 for n in numbers):
        return LabelSpec("ordinal", [str(i) for i in range(int(numbers[-1]) + 1)])
    return "non-integer numbers: not inferred as classes (declare it)"


def infer_ehr(name: str, values: list[str]) -> EHRField | str:
    if name in SYNTH_EHR:
        return EHRField(**vars(SYNTH_EHR[name]))
    try:
        [float(v) for v in values]
    except ValueError:
        return "text column: not inferred (declare it as categorical with its values to keep it)"
    return EHRField("numeric")


def _typo(name: str, known) -> str | None:
    near = difflib.get_close_matches(name, [k for k in known if k != name], n=1)
    return near[0] if near and name not in known else None


def infer_declaration(cfg: IngestConfig, anatomies: list[str], structures: dict[str, set[int]]
                      ) -> tuple[DatasetDeclaration, list[str]]:
    synth = synth_declaration()
    known = {a: synth.anatomies[a] for a in anatomies if a in synth.anatomies}
    known_labels = {n: s for spec in known.values() for n, s in spec.labels.items()}
    notes: list[str] = []
    labels: dict[str, LabelSpec] = {}
    ehr: dict[str, EHRField] = {}
    frame = _frame(cfg.labels.path, cfg.labels.key_column)
    for column in frame.columns if frame is not None else ():
        column = str(column)
        spec = known_labels.get(column) or _typo(column, known_labels) or infer_label(_values(frame[column]))
        if isinstance(spec, str):
            notes.append(f"labels column '{column}': " + (f"close to the known label '{spec}': not inferred"
                                                          if spec in known_labels else spec))
        else:
            labels[column] = spec
    frame = _frame(cfg.ehr.path, cfg.ehr.key_column)
    for column in frame.columns if frame is not None else ():
        column = str(column)
        spec = _typo(column, SYNTH_EHR) or infer_ehr(column, _values(frame[column]))
        if isinstance(spec, str):
            notes.append(f"ehr column '{column}': " + (f"close to the known field '{spec}': not inferred"
                                                       if spec in SYNTH_EHR else spec))
        else:
            ehr[column] = spec
    specs = {}
    for a in sorted(anatomies):
        base = known.get(a, AnatomySpec())
        own = {k: v for k, v in labels.items() if a in known and k in base.labels or k not in known_labels}
        named = {v: k for k, v in base.structures.items()}
        specs[a] = AnatomySpec({**base.labels, **{k: LabelSpec(v.type, list(v.classes)) for k, v in own.items()}},
                               {**base.structures, **{f"structure_{v}": v for v in sorted(structures.get(a, set()))
                                                      if v and v not in named}})
    if any(name.startswith("structure_") for spec in specs.values() for name in spec.structures):
        notes.append("structures are named structure_<value>: give them their names in a declaration")
    decl = DatasetDeclaration(cfg.name or Path(cfg.out).name, "inferred by the ingest", specs, ehr, list(PLANES))
    if specs:
        decl.validate()
    return decl, notes
