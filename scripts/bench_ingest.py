"""Throughput of ``shards ingest dicom`` on a generated export (uncompressed and RLE series).

    PYTHONPATH=. python scripts/bench_ingest.py --studies 6 --slices 24 --size 256

Writes the export to a temporary folder (excluded from the timing), ingests it twice (the second
run resumes and decodes nothing) and prints files/s and MB/s of source DICOM.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RLELossless, generate_uid

from shards.config import load_config
from shards.ingest import DicomIngestConfig, ingest_dicom

PLANES = {"SAG PD FS": [0, 1, 0, 0, 0, -1], "COR T1": [1, 0, 0, 0, 0, -1], "AX T2 FS": [1, 0, 0, 0, 1, 0]}


def write_export(root: Path, studies: int, slices: int, size: int, rle: bool) -> int:
    rng = np.random.default_rng(0)
    n = 0
    for s in range(studies):
        study_uid, patient = generate_uid(), f"PAT{s // 2:05d}"
        for k, (desc, iop) in enumerate(PLANES.items()):
            series_uid = generate_uid()
            normal = np.cross(iop[:3], iop[3:])
            for i in range(slices):
                ds = Dataset()
                ds.file_meta = FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MRImageStorage
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study_uid, series_uid, k + 1
                ds.PatientName, ds.PatientID, ds.BodyPartExamined = f"PATIENT^{s}", patient, "KNEE"
                ds.StudyDate, ds.Manufacturer, ds.MagneticFieldStrength = "20240102", "SIEMENS", 3.0
                ds.SeriesDescription, ds.InstanceNumber = desc, i + 1
                ds.ImageOrientationPatient = iop
                ds.ImagePositionPatient = [float(v) for v in i * 3.0 * normal]
                ds.PixelSpacing, ds.SliceThickness = [0.4, 0.4], 3.0
                ds.Rows = ds.Columns = size
                ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
                ds.BitsAllocated = ds.BitsStored = 16
                ds.HighBit, ds.PixelRepresentation = 15, 0
                ds.PixelData = rng.integers(0, 4000, (size, size), dtype=np.uint16).tobytes()
                if rle and k == 2:
                    ds.compress(RLELossless)
                path = root / f"study{s:03d}" / f"series{k}" / f"{i:04d}"
                path.parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(path, enforce_file_format=True)
                n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=6)
    ap.add_argument("--slices", type=int, default=24)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rle", action="store_true", help="store the axial series RLE-compressed")
    args = ap.parse_args()
    os.environ.setdefault("MSKFM_DEID_SALT", "benchmark-salt")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "export", Path(tmp) / "shards"
        n_files = write_export(src, args.studies, args.slices, args.size, args.rle)
        mb = sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) / 1e6
        cfg = load_config(DicomIngestConfig, None, [f"source={src}", f"out={out}", f"run_dir={Path(tmp) / 'run'}"])
        for label in ("ingest", "resume"):
            t0 = time.perf_counter()
            code = ingest_dicom(cfg)
            dt = time.perf_counter() - t0
            print(f"{label}: exit {code}, {n_files} files ({mb:.1f} MB) in {dt:.2f} s = "
                  f"{n_files / dt:.0f} files/s, {mb / dt:.1f} MB/s")


if __name__ == "__main__":
    main()
