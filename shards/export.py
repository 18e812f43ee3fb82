"""Write studies as loose files — NIfTI per plane (the layout most hospital pipelines and MONAI
read) or .npy — with JSON sidecars. Used by ``shards synth`` previews and the read benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from .schema import JSON_FIELDS, PLANES
from .synth.geometry import AXIS_INDEX, PLANE_AXES, PLANE_DESCENDING


def plane_affine(plane: str, spacing) -> np.ndarray:
    """Voxel (slice, row, col) → patient mm; column d is the physical direction of array axis d."""
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for d, (axis, desc) in enumerate(zip(PLANE_AXES[plane], PLANE_DESCENDING[plane])):
        affine[AXIS_INDEX[axis], d] = (-1.0 if desc else 1.0) * float(spacing[d])
    return affine


def export_study(sample: dict, out_dir: str | Path, fmt: str = "nifti") -> Path:
    if fmt not in ("nifti", "npy"):
        raise ValueError(f"unknown export format '{fmt}'; known: nifti, npy")
    folder = Path(out_dir) / sample["__key__"]
    folder.mkdir(parents=True, exist_ok=True)
    for field in JSON_FIELDS:
        if field in sample:
            (folder / f"{field}.json").write_text(json.dumps(sample[field], indent=1))
    for plane in PLANES:
        for suffix, name in ((plane, plane), (f"{plane}.seg", f"{plane}_seg")):
            arr = sample.get(suffix)
            if arr is None:
                continue
            if fmt == "npy":
                np.save(folder / f"{name}.npy", arr)
            else:
                spacing = sample["meta"]["planes"][plane]["spacing"]
                nib.save(nib.Nifti1Image(arr, plane_affine(plane, spacing)), folder / f"{name}.nii.gz")
    return folder
