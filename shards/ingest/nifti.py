"""``shards ingest nifti``: NIfTI volumes (and ``*_seg`` label maps) -> study shards.

Each volume is brought to the closest canonical (RAS) orientation; the slice axis is the one with
the largest voxel size (or a size-1 axis; ``plane=`` forces it for isotropic data), and its
direction in the affine gives the plane and the obliquity. Slices are then laid out like a DICOM
display of that plane (rows from superior/anterior down, columns from the patient's right/anterior,
coronal slices anterior to posterior), so NIfTI and DICOM ingests agree. Study and patient ids come
from the path (``study_regex``) or a mapping CSV and are stored only as keyed hashes; file names
and NIfTI header text never reach a shard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..schema import PLANES
from .common import FoundStudy, as_float32, run_pipeline
from .config import NiftiIngestConfig
from .deid import Pseudonymizer, load_salt
from .dicom_scan import walk
from .geometry import plane_of
from .report import IngestReport
from .series import Candidate, choose, contrast_from_text, joint_from_text
from .tables import read_table

COMMAND = "ingest-nifti"
SUFFIXES = (".nii.gz", ".nii")


@dataclass
class Volume:
    path: Path
    rel: str
    study: str
    patient: str
    joint: str | None
    axis: int
    plane: str
    obliquity: float
    normal: list[float]
    zooms: tuple[float, float, float]
    shape: tuple[int, int, int]
    contrast: str
    seg: Path | None


def _stem(rel: str) -> str:
    name = rel.rsplit("/", 1)[-1]
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _slice_axis(zooms, shape, forced_plane: str) -> int:
    if forced_plane:
        return PLANES.index(forced_plane)  # canonical RAS: axis 0 = x = sagittal slices
    ones = [i for i, n in enumerate(shape) if n == 1]
    if ones:
        return ones[0]
    largest = int(np.argmax(zooms))
    others = [z for i, z in enumerate(zooms) if i != largest]
    return largest if zooms[largest] > 1.1 * max(others) else 2


def to_slices(data: np.ndarray, axis: int) -> np.ndarray:
    """Canonical (RAS) array -> (slices, rows, cols) in the DICOM display layout of the plane."""
    vol = np.moveaxis(data, axis, 0).transpose(0, 2, 1)[:, ::-1, ::-1]
    return vol[::-1] if axis == 1 else vol


def from_slices(vol: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`to_slices`: (slices, rows, cols) back to the canonical (RAS) array."""
    vol = vol[::-1] if axis == 1 else vol
    return np.moveaxis(vol[:, ::-1, ::-1].transpose(0, 2, 1), 0, axis)


def _spacing(zooms, axis: int) -> list[float]:
    a, b = [i for i in range(3) if i != axis]
    return [round(float(zooms[axis]), 5), round(float(zooms[b]), 5), round(float(zooms[a]), 5)]


def _ids(rel: str, cfg: NiftiIngestConfig, mapping: dict) -> tuple[str, str, dict]:
    row = mapping.get(rel, {})
    match = re.search(cfg.study_regex, rel)
    groups = match.groupdict() if match else {}
    if row.get("study"):
        return row["study"], row.get("patient") or row["study"], row
    study = groups.get("study") or _stem(rel)
    patient = groups.get("patient")
    # a study folder name is only unique within its patient: <patient>/<study> is the study id
    return (f"{patient}/{study}", patient, row) if patient else (study, study, row)


def canonical_geometry(img) -> tuple[tuple[int, ...], tuple[float, ...], np.ndarray]:
    """Shape, voxel sizes and affine the image will have after ``as_closest_canonical``, from the
    header alone (reorienting the image itself would read every voxel)."""
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ValueError(f"volume shape {list(img.shape)}; one 3-D volume per file expected")
    ornt = nib.orientations.io_orientation(img.affine)
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    out_shape, out_zooms = [0, 0, 0], [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(ornt.astype(int)):
        out_shape[target], out_zooms[target] = shape[axis], zooms[axis]
    return tuple(out_shape), tuple(out_zooms), affine


def _volume(path: Path, rel: str, cfg: NiftiIngestConfig, mapping: dict, report: IngestReport) -> Volume | None:
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises several types on damaged files
        report.skip(rel, "unreadable", f"cannot read NIfTI: {type(exc).__name__}: {exc}")
        return None
    try:
        shape, zooms, affine = canonical_geometry(img)
    except ValueError as exc:
        report.skip(rel, "not_3d", str(exc))
        return None
    study, patient, row = _ids(rel, cfg, mapping)
    forced = row.get("plane") or cfg.plane
    axis = _slice_axis(zooms, shape, forced)
    info = plane_of(affine[:3, axis])
    if not forced and max(zooms) <= 1.1 * min(zooms) and 1 not in shape:
        report.warn(rel, "isotropic voxels: slice axis taken as the third; set plane= to choose")
    seg = row.get("seg")
    seg_path = (Path(cfg.source) / seg) if seg else path.with_name(_stem(rel) + cfg.seg_suffix + ".nii.gz")
    joint = cfg.joint or row.get("joint") or joint_from_text(rel)
    contrast = contrast_from_text(_stem(rel).replace("_", " ")) or "unknown"
    plane = forced or info.plane
    normal_lps = [0.0 - info.normal[0], 0.0 - info.normal[1], info.normal[2]]  # as DICOM meta
    return Volume(path, rel, study, patient, joint, axis, plane, info.obliquity_deg, normal_lps,
                  zooms, shape, contrast, seg_path if seg_path.is_file() else None)


def _read_seg(path: Path) -> np.ndarray:
    seg = np.asanyarray(nib.as_closest_canonical(nib.load(path)).dataobj)
    return seg.reshape(seg.shape[:3])


def _load_seg(vol: Volume, source: Path, report: IngestReport) -> np.ndarray | None:
    """The volume's label map in slice layout (values are checked against the declaration later)."""
    rel = vol.seg.relative_to(source).as_posix() if vol.seg.is_relative_to(source) else vol.seg.name
    try:
        seg = _read_seg(vol.seg)
    except Exception as exc:  # damaged label map: keep the image, report the map
        report.skip(rel, "bad_seg", f"cannot read label map: {exc}")
        return None
    if seg.shape != vol.shape:
        report.skip(rel, "bad_seg", f"label map shape {list(seg.shape)} != image {list(vol.shape)}")
        return None
    if not np.isfinite(seg).all() or (seg < 0).any() or (seg > 255).any() \
            or not np.equal(np.mod(seg, 1), 0).all():
        report.skip(rel, "bad_seg", f"label values must be integers 0..255 (declared structures), "
                    f"got {np.unique(seg)[:10].tolist()}")
        return None
    return to_slices(seg.astype(np.uint8), vol.axis)


def _load_image(vol: Volume, cfg: NiftiIngestConfig, report: IngestReport) -> np.ndarray | None:
    try:
        data = np.asanyarray(nib.as_closest_canonical(nib.load(vol.path)).dataobj, dtype=np.float32)
    except Exception as exc:  # truncated gzip, bad header ...
        report.skip(vol.rel, "decode_error", f"cannot read voxels: {type(exc).__name__}: {exc}")
        return None
    data = data.reshape(vol.shape)
    bad = int((~np.isfinite(data)).sum())
    if bad and cfg.nan_policy == "skip":
        report.skip(vol.rel, "nan", f"{bad} NaN/infinite voxels (nan_policy=skip)")
        return None
    if bad:
        report.warn(vol.rel, f"{bad} NaN/infinite voxels set to 0 (nan_policy=zero)")
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    return to_slices(data, vol.axis)


def _label_values(vols: list[Volume]):
    def values() -> set[int]:
        out: set[int] = set()
        for v in vols:
            if v.seg is not None:
                try:
                    seg = _read_seg(v.seg)
                except Exception:  # reported when the study is loaded
                    continue
                out.update(int(x) for x in np.unique(seg) if np.isfinite(x) and x == int(x) and 0 <= x <= 255)
        return out
    return values


def _loader(vols: list[Volume], cfg: NiftiIngestConfig):
    origin: dict = {}

    def load(report: IngestReport):
        cands = [Candidate(v.plane, v.contrast, v.shape[v.axis], v.obliquity,
                           min(z for i, z in enumerate(v.zooms) if i != v.axis), 0, v.rel,
                           description=_stem(v.rel).replace("_", " ")) for v in vols]
        ranked, rejected = choose(cands, cfg.choice)
        for cand, why in rejected:
            report.warn(cand.ident, f"{cand.plane} volume not used: {why}")
        by_rel = {v.rel: v for v in vols}
        volumes, planes, segs = {}, {}, {}
        for plane, plane_cands in ranked.items():
            for cand in plane_cands:
                vol = by_rel[cand.ident]
                image = _load_image(vol, cfg, report)
                if image is None:
                    continue
                volumes[plane] = as_float32(image)
                planes[plane] = {"spacing": _spacing(vol.zooms, vol.axis), "shape": list(image.shape),
                                 "contrast": vol.contrast, "obliquity_deg": vol.obliquity,
                                 "oblique": vol.obliquity > cfg.choice.oblique_threshold_deg,
                                 "normal": vol.normal}
                origin[plane] = {"source": vol.rel, "axis": vol.axis}
                seg = _load_seg(vol, Path(cfg.source), report) if vol.seg else None
                if seg is not None:
                    segs[f"{plane}.seg"] = np.ascontiguousarray(seg)
                break
        return volumes, planes, segs
    return load, origin


def _read_mapping(cfg: NiftiIngestConfig) -> dict[str, dict]:
    if not cfg.mapping:
        return {}
    frame = read_table(cfg.mapping)
    if "image" not in frame.columns:
        raise ValueError(f"mapping {cfg.mapping}: needs an 'image' column, has {list(frame.columns)}")
    return {str(r["image"]): {k: str(v) for k, v in r.items() if str(v).strip()}
            for r in frame.to_dict("records")}


def find_studies(cfg: NiftiIngestConfig, pseudo: Pseudonymizer, report: IngestReport) -> list[FoundStudy]:
    source = Path(cfg.source)
    files = walk(source)
    report.files_seen = len(files)
    mapping = _read_mapping(cfg)
    seg_names = {str(Path(m["seg"])) for m in mapping.values() if m.get("seg")}
    vols: dict[str, list[Volume]] = {}
    for path in files:
        rel = path.relative_to(source).as_posix()
        if not rel.endswith(SUFFIXES):
            if Path(cfg.mapping).resolve() != path.resolve():
                report.skip(rel, "not_nifti", "not a .nii/.nii.gz file")
            continue
        if _stem(rel).endswith(cfg.seg_suffix) or rel in seg_names:
            continue  # label maps load with their image
        vol = _volume(path, rel, cfg, mapping, report)
        if vol is not None:
            vols.setdefault(vol.study, []).append(vol)
    studies = []
    for study_id, group in sorted(vols.items()):
        hashed = pseudo.digest("study", study_id)
        key = pseudo.key("s", hashed)
        joint = next((v.joint for v in group if v.joint), None)
        if joint is None:
            report.skip(group[0].rel, "unknown_joint", "anatomy not given; set joint=<anatomy> (e.g. hip) "
                        "or a 'joint' column in the mapping", study=key)
            continue
        patient = pseudo.key("p", pseudo.digest("patient", group[0].patient))
        load, origin = _loader(group, cfg)
        studies.append(FoundStudy(key, patient, joint, {"source": "nifti", "site": cfg.site or "unknown"},
                                  {"study": key, "patient": patient}, len(group), load,
                                  sources=sorted(v.rel for v in group), origin=origin,
                                  label_values=_label_values(group)))
    return studies


def key_function(pseudo: Pseudonymizer):
    def to_key(kind: str, raw: str) -> str:
        prefix = {"study": "s", "patient": "p"}.get(kind, "a")
        return pseudo.key(prefix, pseudo.digest(kind, raw))
    return to_key


def ingest_nifti(cfg: NiftiIngestConfig) -> int:
    """Run the NIfTI ingest; returns the exit code (0, or 1 when nothing usable / strict)."""
    pseudo = Pseudonymizer(load_salt(cfg.deid))
    return run_pipeline(cfg, COMMAND, pseudo, find_studies, key_function(pseudo))
