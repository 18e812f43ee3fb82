"""Typed configuration of ``shards ingest dicom`` and ``shards ingest nifti``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError
from ..schema import PLANES
from .deid import DeidConfig
from .series import ChoiceConfig

KEY_KINDS = ("study", "patient", "accession", "key")


@dataclass
class TableConfig:
    """A label or EHR table (CSV or Parquet) joined to the ingested studies."""

    path: str = ""                 # empty: no table
    key_column: str = "study_uid"  # column holding the join key
    # What the key is: study (StudyInstanceUID / NIfTI study id), patient (PatientID / NIfTI
    # patient id), accession (AccessionNumber) or key (an already de-identified s-/p- shard key).
    key_kind: str = "study"

    def validate(self, name: str) -> None:
        if self.key_kind not in KEY_KINDS:
            raise ConfigError(f"{name}.key_kind '{self.key_kind}' unknown; known: {', '.join(KEY_KINDS)}")


@dataclass
class IngestConfig:
    source: str = ""       # input folder (positional argument of the CLI)
    out: str = ""          # shard folder
    name: str = ""         # run name; default: the shard folder's name
    run_dir: str = ""      # where the report and resolved config go; default runs/<command>/<name>
    dataset: str = ""      # dataset declaration YAML (docs/datasets.md); empty: inferred, written to the report
    joint: str = ""        # force one anatomy for every study; empty: read it from the data
    site: str = ""         # a site name to record; empty: keyed hash of the institution
    strict: bool = False   # exit non-zero when anything was skipped, a table has problems or data contradicts the declaration
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    split_seed: int = 0
    shard_max_count: int = 200
    shard_max_mb: int = 1000
    deid: DeidConfig = field(default_factory=DeidConfig)
    choice: ChoiceConfig = field(default_factory=ChoiceConfig)
    labels: TableConfig = field(default_factory=TableConfig)
    ehr: TableConfig = field(default_factory=lambda: TableConfig(key_column="patient_id", key_kind="patient"))

    def validate(self) -> None:
        if not self.source:
            raise ConfigError("source: the input folder is required")
        if not self.out:
            raise ConfigError("out: the shard folder is required (--out)")
        if self.dataset and not Path(self.dataset).is_file():
            raise ConfigError(f"dataset: declaration '{self.dataset}' does not exist")
        if not any(v > 0 for v in self.splits.values()):
            raise ConfigError(f"splits must have a positive fraction, got {dict(self.splits)}")
        self.deid.validate()
        self.labels.validate("labels")
        self.ehr.validate("ehr")


@dataclass
class DicomIngestConfig(IngestConfig):
    slice_gap_tolerance: float = 0.1  # relative deviation of slice gaps that still counts as regular


@dataclass
class NiftiIngestConfig(IngestConfig):
    # Study (and optional patient) id from the file path relative to the input folder. The default
    # reads <patient>/<study>/<file> (study id "<patient>/<study>") or <study>/<file>; files at the
    # top level are their own study (name without suffix).
    study_regex: str = r"(?:(?P<patient>[^/]+)/)?(?P<study>[^/]+)/[^/]+$"
    mapping: str = ""          # CSV with columns image, study[, patient, seg, joint, plane]
    seg_suffix: str = "_seg"   # label map of X.nii.gz is X_seg.nii.gz
    plane: str = ""            # force the plane of every volume (isotropic data); empty: from affine
    nan_policy: str = "skip"   # skip the volume, or zero the NaNs (reported either way)

    def validate(self) -> None:
        super().validate()
        if self.plane and self.plane not in PLANES:
            raise ConfigError(f"plane '{self.plane}' unknown; known: {', '.join(PLANES)}")
        if self.nan_policy not in ("skip", "zero"):
            raise ConfigError(f"nan_policy must be skip or zero, got '{self.nan_policy}'")
