"""Label and EHR tables (CSV or Parquet) keyed by study or patient, joined to ingested studies.

Table keys are hospital identifiers (StudyInstanceUID, PatientID, accession, NIfTI study names).
They are hashed with the dataset's salt exactly like the studies' own identifiers, so the join
happens on keyed hashes and the raw keys never reach a shard. Problems are reported by row number
(never by key value): missing key column, duplicate keys, unknown columns (with the nearest known
name, for header typos), values out of range, rows matching no study and studies without a row.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Callable

import pandas as pd

from ..dataset import DatasetDeclaration, EHRField, LabelSpec
from .config import TableConfig
from .deid import MAX_AGE_YEARS, screen_text

# Which label and EHR columns are known, their types, classes, ranges and closed vocabularies come from
# the dataset declaration; categorical text outside a field's vocabulary is free text and stays out of
# shards unless deid.keep_free_text (then screened).
SEXES = {"f": "F", "female": "F", "w": "F", "m": "M", "male": "M"}
BINARY_TRUE = ("1", "1.0", "true", "yes", "pos", "positive")
BINARY_FALSE = ("0", "0.0", "false", "no", "neg", "negative")
IGNORED_COLUMNS = ("joint",)


class TableError(ValueError):
    """A table that cannot be read at all."""


def read_table(path: str | Path) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise TableError(f"table {p} does not exist")
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(p)
        return pd.read_csv(p, sep=None, engine="python", dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises many parser errors; all mean "unreadable"
        raise TableError(f"table {p}: cannot read: {exc}") from exc


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def label_value(value, spec: LabelSpec) -> tuple[int | None, bool]:
    """(stored value or None, ok): binary 0/1 from the usual spellings; multiclass/ordinal the class
    index from a class name (any case) or the index itself."""
    if _blank(value):
        return None, True
    text = str(value).strip().lower()
    if spec.type == "binary":
        return (1, True) if text in BINARY_TRUE else (0, True) if text in BINARY_FALSE else (None, False)
    names = [c.lower() for c in spec.classes]
    if text in names:
        return names.index(text), True
    try:
        number = float(text)
    except ValueError:
        return None, False
    ok = number == int(number) and 0 <= number < len(names)
    return (int(number), True) if ok else (None, False)


def _ehr_value(column: str, spec: EHRField, value, free_text: bool = False):
    """(clean value or None, ok); ok is "free_text" for text outside the column's vocabulary."""
    if _blank(value):
        return None, True
    if spec.type == "numeric":
        try:
            number = float(value)
        except (TypeError, ValueError):
            return None, False
        if not math.isfinite(number) or (spec.range and not spec.range[0] <= number <= spec.range[1]):
            return None, False
        return (min(number, float(MAX_AGE_YEARS)) if column == "age" else number), True
    text = " ".join(str(value).strip().split())
    by_lower = {v.lower(): v for v in spec.values}
    if column == "sex" and text.lower() in SEXES and SEXES[text.lower()] in spec.values:
        return SEXES[text.lower()], True
    if text.lower() in by_lower:
        return by_lower[text.lower()], True
    if column == "sex":
        return None, False
    return (screen_text(text.lower(), set()) or None) if free_text else None, "free_text"


class TableJoin:
    """One loaded table; :meth:`lookup` gives a study its row, :meth:`finish` reports the rest."""

    def __init__(self, cfg: TableConfig, kind: str, to_key: Callable[[str, str], str], dataset: DatasetDeclaration,
                 free_text: bool = False):
        self.cfg, self.kind, self.free_text = cfg, kind, free_text
        # column -> its spec: every anatomy's labels (a column names the same label in each), or the EHR fields
        self.specs: dict = ({name: spec for a in dataset.anatomies.values() for name, spec in a.labels.items()}
                            if kind == "labels" else dict(dataset.ehr))
        self.problems: list[dict] = []
        self.rows: dict[str, tuple[int, dict, list[str]]] = {}
        self.used: set[str] = set()
        self.without_row: list[str] = []
        self.n_rows = 0
        try:
            frame = read_table(cfg.path)
        except TableError as exc:
            self._problem("unreadable", str(exc))
            return
        if cfg.key_column not in frame.columns:
            near = difflib.get_close_matches(cfg.key_column, list(map(str, frame.columns)), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            self._problem("missing_key_column", f"key column '{cfg.key_column}' not in the header "
                          f"{list(map(str, frame.columns))}{hint}; table not joined")
            return
        self.columns = self._check_columns([str(c) for c in frame.columns if c != cfg.key_column])
        self._load_rows(frame, to_key)

    def _problem(self, code: str, message: str, **where) -> None:
        self.problems.append({"code": code, "message": message, **where})

    def _check_columns(self, columns: list[str]) -> list[str]:
        known = list(self.specs)
        usable = []
        for col in columns:
            if col in known:
                usable.append(col)
            elif col not in IGNORED_COLUMNS:
                near = difflib.get_close_matches(col, known, n=1)
                hint = f"; did you mean '{near[0]}'?" if near else ""
                what = "label name" if self.kind == "labels" else "EHR column"
                self._problem("unknown_column", f"unknown {what} '{col}'{hint}; column ignored "
                              "(declare it in the dataset declaration to keep it)", column=col)
        return usable

    def _load_rows(self, frame: pd.DataFrame, to_key: Callable[[str, str], str]) -> None:
        for i, row in enumerate(frame.to_dict("records"), start=1):
            self.n_rows += 1
            raw = row[self.cfg.key_column]
            if _blank(raw):
                self._problem("missing_key", "row has no key; row ignored", row=i)
                continue
            key = str(raw).strip() if self.cfg.key_kind == "key" else to_key(self.cfg.key_kind, str(raw))
            if key in self.rows:
                self._problem("duplicate_key", f"same key as row {self.rows[key][0]}; row ignored", row=i)
                continue
            values, invalid = {}, []
            for col in self.columns:
                spec = self.specs[col]
                value, ok = (label_value(row[col], spec) if self.kind == "labels"
                             else _ehr_value(col, spec, row[col], self.free_text))
                if ok == "free_text":  # the value itself is never written to the report
                    self._problem("free_text", f"'{col}' value outside its vocabulary "
                                  f"{list(spec.values)}; " + ("screened free text kept" if self.free_text else
                                  "treated as unknown (deid.keep_free_text=true keeps it screened)"),
                                  row=i, column=col)
                elif not ok:
                    allowed = _allowed(spec)
                    self._problem("out_of_range", f"value '{row[col]}' of '{col}' out of range ({allowed}); "
                                  "treated as unknown", row=i, column=col)
                    invalid.append(f"{self.kind} '{col}': table row {i} value outside the declaration ({allowed}); "
                                   "treated as unknown")
                values[col] = value
            self.rows[key] = (i, values, invalid)

    def _row_key(self, join_keys: dict[str, str]) -> str | None:
        key = join_keys.get(self.cfg.key_kind) if self.cfg.key_kind != "key" else None
        candidates = [key] if key else [join_keys.get("study"), join_keys.get("patient")]
        return next((c for c in candidates if c in self.rows), None)

    def lookup(self, study_key: str, join_keys: dict[str, str]) -> dict | None:
        """The row for a study (by the table's key kind), or None (recorded for the report)."""
        key = self._row_key(join_keys)
        if key is not None:
            self.used.add(key)
            return self.rows[key][1]
        if self.rows or not self.problems:
            self.without_row.append(study_key)
        return None

    def contradictions(self, join_keys: dict[str, str]) -> list[str]:
        """The values of a study's row that contradict the declaration (reported per study)."""
        key = self._row_key(join_keys)
        return list(self.rows[key][2]) if key is not None else []

    def finish(self) -> dict:
        """The validation report of this table."""
        unmatched = sorted(i for key, (i, _, _) in self.rows.items() if key not in self.used)
        if unmatched:
            self._problem("row_without_study", f"{len(unmatched)} rows match no ingested study",
                          rows=unmatched)
        if self.without_row:
            self._problem("study_without_row", f"{len(self.without_row)} studies have no row",
                          studies=sorted(self.without_row))
        return {"path": self.cfg.path, "kind": self.kind, "key_column": self.cfg.key_column,
                "key_kind": self.cfg.key_kind, "rows": self.n_rows, "matched_rows": len(self.used),
                "problems": self.problems}


def _allowed(spec) -> str:
    if isinstance(spec, LabelSpec):
        return "0/1" if spec.type == "binary" else f"{spec.type} classes {spec.classes}"
    return f"range {spec.range} {spec.unit}".rstrip() if spec.type == "numeric" else f"values {spec.values}"


def labels_for(dataset: DatasetDeclaration, anatomy: str, row: dict | None) -> dict:
    """The anatomy's full label dict (None where the row has no value or there is no row)."""
    row, spec = row or {}, dataset.anatomies.get(anatomy)
    return {name: row.get(name) for name in spec.labels} if spec else {}
