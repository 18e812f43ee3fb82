"""What ``predict`` writes: ``predictions.csv``, label maps as NIfTI in each input's own geometry,
and (DICOM/NIfTI inputs) the private map from de-identified keys back to source files."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from shards.ingest.nifti import from_slices

PRIVATE_MAP = "sources.private.csv"


def predictions_frame(rows: list[dict], labels: list[str], thresholds: dict[str, float]) -> pd.DataFrame:
    """One row per study: key, patient, planes, status, error, then ``prob/<label>`` and
    ``decision/<label>`` (1 when prob >= the stored threshold) or the label map file."""
    records = []
    for r in rows:
        rec = {k: r.get(k) for k in ("key", "patient", "planes", "status", "error", "split", "site", "vendor",
                                     "field_strength") if k in r}
        for name in labels:
            p = (r.get("probs") or {}).get(name)
            rec[f"prob/{name}"] = p
            rec[f"decision/{name}"] = None if p is None else int(p >= thresholds[name])
        if "seg_files" in r:
            rec["segmentation"] = ";".join(r["seg_files"])
        records.append(rec)
    return pd.DataFrame(records)


def grid_image(seg: np.ndarray, geometry: dict):
    """A NIfTI image of a (slices, rows, cols) label map in the geometry its input came in."""
    kind = geometry["kind"]
    if kind == "nifti":
        src = nib.load(geometry["path"])
        canonical = from_slices(seg, geometry["axis"])
        ornt = nib.orientations.io_orientation(src.affine)
        back = nib.orientations.apply_orientation(canonical, inverse_ornt(ornt))
        return nib.Nifti1Image(np.ascontiguousarray(back.reshape(src.shape[:3])), src.affine)
    if kind == "dicom":
        return nib.Nifti1Image(np.ascontiguousarray(seg.transpose(2, 1, 0)), np.asarray(geometry["affine"]))
    return nib.Nifti1Image(seg, np.diag([*geometry["spacing"], 1.0]))  # shards: the stored grid and spacing


def inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes ``ornt`` (canonical array -> original axes)."""
    inv = np.zeros_like(ornt)
    for axis, (target, flip) in enumerate(ornt):
        inv[int(target)] = [axis, flip]
    return inv


def write_segmentations(row: dict, geometry: dict, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for plane, seg in row.pop("seg").items():
        img = grid_image(seg, geometry[plane])
        img.set_data_dtype(np.uint8)
        name = f"{row['key']}_{plane}.nii.gz"
        nib.save(img, folder / name)
        names.append(f"{folder.name}/{name}")
    return names


def write_private_map(out: Path, kind: str, source: Path, found: list) -> Path:
    """Key -> source files; readable by the owner only. It identifies studies: keep it local."""
    path = out / PRIVATE_MAP
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "input_kind", "sources"])
        for s in found:
            w.writerow([s.key, kind, ";".join(str((Path(source) / rel).resolve()) for rel in s.sources)])
    return path
