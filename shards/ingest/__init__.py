"""Real data in: DICOM exports, NIfTI volumes, label/EHR tables -> de-identified, validated,
resumable study shards (schema v2). Entry points: :func:`ingest_dicom`, :func:`ingest_nifti`,
and ``shards ingest <kind>`` (:mod:`shards.ingest.cli`).

Names are imported on first use, so that the CLI starts without pydicom, nibabel and pandas.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ChoiceConfig": "series", "DeidConfig": "deid", "DicomIngestConfig": "config",
    "IngestConfig": "config", "NiftiIngestConfig": "config", "TableConfig": "config",
    "ingest_dicom": "dicom", "ingest_nifti": "nifti",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'shards.ingest' has no attribute '{name}'")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
