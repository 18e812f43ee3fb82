"""Real data in: DICOM exports, NIfTI volumes, label/EHR tables -> de-identified, validated,
resumable study shards (schema v1). Entry points: :func:`ingest_dicom`, :func:`ingest_nifti`,
and ``shards ingest <kind>`` (:mod:`shards.ingest.cli`)."""

from .config import DicomIngestConfig, IngestConfig, NiftiIngestConfig, TableConfig
from .deid import DeidConfig
from .dicom import ingest_dicom
from .nifti import ingest_nifti
from .series import ChoiceConfig

__all__ = ["ChoiceConfig", "DeidConfig", "DicomIngestConfig", "IngestConfig", "NiftiIngestConfig",
           "TableConfig", "ingest_dicom", "ingest_nifti"]
