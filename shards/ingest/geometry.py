"""Patient-space geometry shared by DICOM and NIfTI ingest: plane from a slice normal, obliquity,
slice order and slice spacing from positions.

DICOM patient coordinates are LPS and NIfTI world coordinates RAS; both put left-right on x,
anterior-posterior on y and inferior-superior on z, so the nearest plane only needs the axis the
normal is closest to: x -> sagittal, y -> coronal, z -> axial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

AXIS_PLANE = ("sag", "cor", "ax")


class GeometryError(ValueError):
    """Geometry that cannot define a stack (missing or degenerate orientation, bad positions)."""


@dataclass(frozen=True)
class PlaneInfo:
    plane: str            # nearest of sag / cor / ax
    obliquity_deg: float  # angle between the normal and that plane's axis
    normal: tuple[float, float, float]


def slice_normal(orientation) -> np.ndarray:
    """Unit normal (row cosine x column cosine) of a DICOM ImageOrientationPatient."""
    iop = np.asarray(orientation, dtype=np.float64)
    if iop.shape != (6,) or not np.isfinite(iop).all():
        raise GeometryError(f"ImageOrientationPatient must be 6 numbers, got {list(orientation)}")
    normal = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(normal)
    if norm < 1e-3:
        raise GeometryError(f"degenerate ImageOrientationPatient {list(orientation)}")
    return normal / norm


def plane_of(normal) -> PlaneInfo:
    """Nearest anatomical plane of a slice normal and how far from it the normal tilts."""
    n = np.asarray(normal, dtype=np.float64)
    n = n / np.linalg.norm(n)
    axis = int(np.argmax(np.abs(n)))
    angle = math.degrees(math.acos(min(1.0, abs(float(n[axis])))))
    return PlaneInfo(AXIS_PLANE[axis], round(angle, 2), tuple(round(float(v), 6) for v in n))


def cluster_orientations(orientations, tolerance: float = 0.01) -> list[int]:
    """Cluster index of each orientation: same cluster when every cosine agrees within
    ``tolerance`` (scanner round-off differs per slice; rounding would split at a boundary)."""
    centers: list[np.ndarray] = []
    labels = []
    for orientation in orientations:
        o = np.asarray(orientation, dtype=np.float64)
        for i, center in enumerate(centers):
            if np.max(np.abs(o - center)) <= tolerance:
                labels.append(i)
                break
        else:
            centers.append(o)
            labels.append(len(centers) - 1)
    return labels


def sort_positions(positions, normal) -> tuple[np.ndarray, np.ndarray]:
    """Order of slices along the normal (ascending) and their distances along it."""
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 3 or not np.isfinite(pos).all():
        raise GeometryError("ImagePositionPatient must be 3 finite numbers per slice")
    dist = pos @ np.asarray(normal, dtype=np.float64)
    order = np.argsort(dist, kind="stable")
    return order, dist[order]


def slice_spacing(sorted_dist: np.ndarray, fallback: float | None,
                  tolerance: float = 0.1) -> tuple[float, list[str]]:
    """Slice spacing (mm) from sorted positions along the normal.

    Positions decide; ``fallback`` (SpacingBetweenSlices or SliceThickness) is used only for a
    single slice. Returns the spacing and warnings (irregular gaps). Raises on coincident slices.
    """
    warnings: list[str] = []
    if len(sorted_dist) < 2:
        if not fallback or fallback <= 0:
            raise GeometryError("single slice without SpacingBetweenSlices or SliceThickness")
        return float(fallback), ["single-slice stack: slice spacing taken from the header"]
    gaps = np.diff(sorted_dist)
    if (gaps < 1e-3).any():
        raise GeometryError("two slices at the same position")
    spacing = float(np.median(gaps))
    spread = float(np.max(np.abs(gaps - spacing)))
    if spread > tolerance * spacing:
        raise GeometryError(f"irregular slice gaps {np.round(gaps, 3).tolist()} mm (missing slices?)")
    if fallback and abs(fallback - spacing) > tolerance * spacing:
        warnings.append(f"slice spacing from positions {spacing:.3f} mm differs from the header's "
                        f"{fallback:.3f} mm; positions win")
    return round(spacing, 5), warnings


def dicom_affine(orientation, position, spacing) -> np.ndarray:
    """NIfTI (RAS) affine of a stack stored as (cols, rows, slices): ``orientation`` the 6 direction
    cosines (ImageOrientationPatient), ``position`` the first slice's ImagePositionPatient (LPS),
    ``spacing`` [slice, row, col] mm with slices in ascending order along the normal."""
    iop = np.asarray(orientation, dtype=np.float64)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * spacing[2]
    lps[:3, 1] = iop[3:] * spacing[1]
    lps[:3, 2] = slice_normal(orientation) * spacing[0]
    lps[:3, 3] = np.asarray(position, dtype=np.float64)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
