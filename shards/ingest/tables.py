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

from ..schema import LABELS
from .config import TableConfig
from .deid import MAX_AGE_YEARS, screen_text

ALL_LABELS = sorted({name for names in LABELS.values() for name in names})
EHR_RANGES = {"age": (0.0, 120.0), "height_cm": (30.0, 250.0), "weight_kg": (1.0, 400.0)}
# Closed vocabularies of the EHR text columns (those of the synthetic generator); other values are
# free text and stay out of shards unless deid.keep_free_text (then screened)
EHR_VOCAB = {"patient_type": ("outpatient", "emergency", "inpatient"),
             "injury_event": ("none", "sport", "twisting", "fall", "traffic", "overuse")}
EHR_TEXT = tuple(EHR_VOCAB)
SEXES = {"f": "F", "female": "F", "w": "F", "m": "M", "male": "M"}
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


def _label_value(value) -> tuple[int | None, bool]:
    """(0/1/None, ok)."""
    if _blank(value):
        return None, True
    text = str(value).strip().lower()
    if text in ("1", "1.0", "true", "yes", "pos", "positive"):
        return 1, True
    if text in ("0", "0.0", "false", "no", "neg", "negative"):
        return 0, True
    return None, False


def _ehr_value(column: str, value, free_text: bool = False):
    """(clean value or None, ok); ok is "free_text" for text outside the column's vocabulary."""
    if _blank(value):
        return None, True
    if column in EHR_RANGES:
        try:
            number = float(value)
        except (TypeError, ValueError):
            return None, False
        lo, hi = EHR_RANGES[column]
        if not lo <= number <= hi:
            return None, False
        return (min(number, float(MAX_AGE_YEARS)) if column == "age" else number), True
    if column == "sex":
        sex = SEXES.get(str(value).strip().lower())
        return sex, sex is not None
    text = " ".join(str(value).strip().lower().split())
    if text in EHR_VOCAB.get(column, ()):
        return text, True
    return (screen_text(text, set()) or None) if free_text else None, "free_text"


class TableJoin:
    """One loaded table; :meth:`lookup` gives a study its row, :meth:`finish` reports the rest."""

    def __init__(self, cfg: TableConfig, kind: str, to_key: Callable[[str, str], str], free_text: bool = False):
        self.cfg, self.kind, self.free_text = cfg, kind, free_text
        self.problems: list[dict] = []
        self.rows: dict[str, tuple[int, dict]] = {}
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
        known = ALL_LABELS if self.kind == "labels" else list(EHR_RANGES) + ["sex", *EHR_TEXT]
        usable = []
        for col in columns:
            if col in known:
                usable.append(col)
            elif col not in IGNORED_COLUMNS:
                near = difflib.get_close_matches(col, known, n=1)
                hint = f"; did you mean '{near[0]}'?" if near else ""
                what = "label name" if self.kind == "labels" else "EHR column"
                self._problem("unknown_column", f"unknown {what} '{col}'{hint}; column ignored",
                              column=col)
        return usable

    def _load_rows(self, frame: pd.DataFrame, to_key: Callable[[str, str], str]) -> None:
        clean = _label_value if self.kind == "labels" else None
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
            values = {}
            for col in self.columns:
                value, ok = clean(row[col]) if clean else _ehr_value(col, row[col], self.free_text)
                if ok == "free_text":  # the value itself is never written to the report
                    self._problem("free_text", f"'{col}' value outside its vocabulary "
                                  f"{list(EHR_VOCAB[col])}; " + ("screened free text kept" if self.free_text else
                                  "treated as unknown (deid.keep_free_text=true keeps it screened)"),
                                  row=i, column=col)
                elif not ok:
                    self._problem("out_of_range", f"value '{row[col]}' of '{col}' out of range; "
                                  "treated as unknown", row=i, column=col)
                values[col] = value
            self.rows[key] = (i, values)

    def lookup(self, study_key: str, join_keys: dict[str, str]) -> dict | None:
        """The row for a study (by the table's key kind), or None (recorded for the report)."""
        key = join_keys.get(self.cfg.key_kind) if self.cfg.key_kind != "key" else None
        candidates = [key] if key else [join_keys.get("study"), join_keys.get("patient")]
        for cand in candidates:
            if cand in self.rows:
                self.used.add(cand)
                return self.rows[cand][1]
        if self.rows or not self.problems:
            self.without_row.append(study_key)
        return None

    def finish(self) -> dict:
        """The validation report of this table."""
        unmatched = sorted(i for key, (i, _) in self.rows.items() if key not in self.used)
        if unmatched:
            self._problem("row_without_study", f"{len(unmatched)} rows match no ingested study",
                          rows=unmatched)
        if self.without_row:
            self._problem("study_without_row", f"{len(self.without_row)} studies have no row",
                          studies=sorted(self.without_row))
        return {"path": self.cfg.path, "kind": self.kind, "key_column": self.cfg.key_column,
                "key_kind": self.cfg.key_kind, "rows": self.n_rows, "matched_rows": len(self.used),
                "problems": self.problems}


def labels_for(joint: str, row: dict | None) -> dict:
    """The joint's full label dict (None where the row has no value or there is no row)."""
    row = row or {}
    return {name: row.get(name) for name in LABELS[joint]}
