"""First pass over a DICOM export: read headers only, de-identify them, and turn every usable
image file into frames (one per 2-D image; a multi-frame object gives many). Files that cannot be
used get one report entry each, with a code and a reason.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import (UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         MediaStorageDirectoryStorage)

from .deid import DeidConfig, Pseudonymizer, deidentify
from .geometry import GeometryError, slice_normal
from .report import IngestReport

IGNORED_NAMES = {".DS_Store", "Thumbs.db"}
# What later stages read from a single-frame header; the rest is dropped to keep memory per file
# small on large exports (multi-frame headers are kept whole: their functional groups are needed).
HEADER_KEEP = """StudyInstanceUID SeriesInstanceUID SOPInstanceUID InstanceNumber SeriesNumber EchoNumbers
SeriesDescription ProtocolName StudyDescription BodyPartExamined PatientID AccessionNumber
Manufacturer MagneticFieldStrength PatientAge PatientSex PatientSize PatientWeight StudyDate
SeriesDate SpacingBetweenSlices ScanningSequence ScanOptions InversionTime EchoTime RepetitionTime
ImageType""".split()


@dataclass
class Frame:
    """One 2-D image and the de-identified header it came from."""

    path: Path
    rel: str
    index: int | None            # frame number in a multi-frame object, None for single-frame
    header: Dataset              # de-identified, without pixel data
    orientation: tuple
    position: np.ndarray
    pixel_spacing: tuple[float, float]
    thickness: float | None
    slope: float
    intercept: float
    shape: tuple[int, int]
    site: str

    @property
    def series_key(self) -> tuple:
        h = self.header
        return (h.get("StudyInstanceUID", ""), h.get("SeriesInstanceUID", ""),
                str(h.get("EchoNumbers", "") or ""))


def walk(source: Path) -> list[Path]:
    """Every file under ``source`` (any layout, any or no extension), sorted."""
    files = []
    for root, dirs, names in os.walk(source):
        dirs.sort()
        files += [Path(root) / n for n in sorted(names) if n not in IGNORED_NAMES]
    return files


def read_dicom(path: Path, **kwargs) -> Dataset:
    """Read a DICOM file, also a bare dataset without preamble and file meta (old PACS exports)."""
    with warnings.catch_warnings():  # vendor quirks (VR lengths...) would flood the log
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path, **kwargs)
        except InvalidDicomError:
            with open(path, "rb") as f:
                head = f.read(4)
            if head[:2] not in (b"\x08\x00", b"\x02\x00"):  # group 0008 or 0002 first
                raise
            ds = pydicom.dcmread(path, force=True, **kwargs)
            if len(ds) == 0:
                raise InvalidDicomError(f"{path}: no data elements") from None
    if "TransferSyntaxUID" not in ds.file_meta:  # bare dataset: encoding was detected on read
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


# Secondary Capture Image Storage and its multi-frame variants (PS3.4 B.5): pixels captured from a
# screen or a film, often with names and dates burned in
SECONDARY_CAPTURE = frozenset(f"1.2.840.10008.5.1.4.1.1.7{s}" for s in ("", ".1", ".2", ".3", ".4"))
_CAPTURE_WORDS = ("SCREEN SHOT", "SCREENSHOT", "SCREEN CAPTURE", "CAPTURE", "SNAPSHOT")


def capture_problem(ds: Dataset, sop_class: str) -> tuple[str, str] | None:
    """(code, reason) for images whose pixels may show text (burned-in annotation, secondary or
    screen captures), else None. Checked before de-identification: these are refused, not cleaned."""
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        return "burned_in", "BurnedInAnnotation is YES: pixels may show identifying text"
    sc = next((c for c in (sop_class, str(ds.get("SOPClassUID", ""))) if c in SECONDARY_CAPTURE), None)
    if sc:
        return "secondary_capture", f"secondary capture ({UID(sc).name}): pixels may show identifying text"
    image_type = [str(v).strip().upper() for v in (ds.get("ImageType") or [])]
    joined = "\\".join(image_type)
    if len(image_type) > 1 and image_type[1] == "SECONDARY":
        return "secondary_capture", f"ImageType {joined}: a secondary (derived, captured) image"
    if any(w in v for v in image_type for w in _CAPTURE_WORDS) or "ConversionType" in ds:
        what = f"ConversionType {ds.ConversionType}" if "ConversionType" in ds else f"ImageType {joined}"
        return "screen_capture", f"{what}: a screen or film capture, pixels may show identifying text"
    return None


def decoder_problem(ts: UID) -> str | None:
    """None when pixels of this transfer syntax can be decoded here, else what to install."""
    if not ts.is_compressed:
        return None
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return f"transfer syntax '{ts.name}' has no pixel decoder in pydicom"
    if decoder.is_available:
        return None
    needs = "; ".join(decoder.missing_dependencies) or "a pydicom pixel-data plugin"
    return f"transfer syntax '{ts.name}' needs a decoder package: {needs}"


def _truncated(path: Path, ds: Dataset) -> str | None:
    """For native (uncompressed) pixel data: is the file shorter than its pixels need?"""
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is None or UID(ts).is_compressed:
        return None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    need = int(ds.Rows) * int(ds.Columns) * frames * int(ds.get("SamplesPerPixel", 1)) \
        * int(ds.BitsAllocated) // 8
    elem = ds.get_item("PixelData")  # raw (deferred) or read: both know where the value starts
    start = getattr(elem, "value_tell", None) or getattr(elem, "file_tell", None) or 0
    have = path.stat().st_size - start
    if have < need:
        return f"pixel data truncated: {have} of {need} bytes"
    return None


def frame_attr(ds: Dataset, seq_kw: str, attr: str, frame: int | None):
    """An attribute from the per-frame functional group, else the shared group, else the top."""
    for group_kw, index in (("PerFrameFunctionalGroupsSequence", frame),
                            ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(group_kw)
        if groups is None or index is None or index >= len(groups):
            continue
        seq = groups[index].get(seq_kw)
        if seq and attr in seq[0]:
            return seq[0].get(attr)
    return ds.get(attr)


def _frames_of(path: Path, rel: str, ds: Dataset, site: str) -> list[Frame]:
    """The file's frames with their geometry and rescale; raises GeometryError when missing."""
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    multi = n_frames > 1 or "PerFrameFunctionalGroupsSequence" in ds
    frames = []
    for i in range(n_frames):
        idx = i if multi else None
        iop = frame_attr(ds, "PlaneOrientationSequence", "ImageOrientationPatient", idx)
        ipp = frame_attr(ds, "PlanePositionSequence", "ImagePositionPatient", idx)
        spacing = frame_attr(ds, "PixelMeasuresSequence", "PixelSpacing", idx)
        if iop is None or ipp is None or spacing is None:
            missing = [n for n, v in (("ImageOrientationPatient", iop), ("ImagePositionPatient", ipp),
                                      ("PixelSpacing", spacing)) if v is None]
            raise GeometryError(f"missing {', '.join(missing)}")
        position = np.asarray([float(v) for v in ipp], dtype=np.float64)
        if multi and "PerFrameFunctionalGroupsSequence" not in ds:  # legacy multi-frame
            step = float(ds.get("SpacingBetweenSlices", 0) or ds.get("SliceThickness", 0) or 0)
            if step <= 0:
                raise GeometryError("multi-frame without per-frame positions or slice spacing")
            position = position + i * step * slice_normal(iop)
        slope = frame_attr(ds, "PixelValueTransformationSequence", "RescaleSlope", idx)
        intercept = frame_attr(ds, "PixelValueTransformationSequence", "RescaleIntercept", idx)
        thickness = frame_attr(ds, "PixelMeasuresSequence", "SliceThickness", idx)
        frames.append(Frame(path, rel, idx, ds, tuple(float(v) for v in iop), position,
                            (float(spacing[0]), float(spacing[1])),
                            float(thickness) if thickness not in (None, "") else None,
                            float(slope if slope not in (None, "") else 1.0),
                            float(intercept if intercept not in (None, "") else 0.0),
                            (int(ds.Rows), int(ds.Columns)), site))
    slice_normal(frames[0].orientation)  # degenerate orientation -> GeometryError
    if not multi:
        frames[0].header = _slim(ds)
    return frames


def _slim(ds: Dataset) -> Dataset:
    slim = Dataset()
    for kw in HEADER_KEEP:
        if kw in ds:
            slim.add(ds[kw])
    return slim


def _site_of(ds: Dataset, pseudo: Pseudonymizer, override: str) -> str:
    if override:
        return override
    name = str(ds.get("InstitutionName", "") or "").strip()
    return "site-" + pseudo.digest("site", name.upper())[:8] if name else "unknown"


def scan_file(path: Path, rel: str, cfg: DeidConfig, pseudo: Pseudonymizer, site: str,
              report: IngestReport) -> list[Frame]:
    """Frames of one file, or [] with a report entry saying why not."""
    try:
        ds = read_dicom(path, defer_size=1024)
    except InvalidDicomError:
        report.skip(rel, "not_dicom", "not a DICOM file (no DICM preamble, no leading DICOM tag)")
        return []
    except Exception as exc:  # pydicom raises many error types on damaged files
        report.skip(rel, "unreadable", f"cannot read DICOM header: {type(exc).__name__}: {exc}")
        return []
    sop_class = UID(str(ds.file_meta.get("MediaStorageSOPClassUID", ds.get("SOPClassUID", ""))))
    if sop_class == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds:
        report.skip(rel, "dicomdir", "DICOMDIR index; image files are found by walking the folder")
        return []
    if "PixelData" not in ds:
        if len(ds) == 0 or ("Rows" in ds and "Columns" in ds):
            # pydicom drops the whole dataset when encapsulated pixel data ends before its delimiter
            report.skip(rel, "truncated", f"{sop_class.name or 'DICOM'} file without (complete) "
                        "data elements or pixel data: file cut short?")
        else:
            what = sop_class.name if sop_class else "no SOP class (truncated header?)"
            report.skip(rel, "not_image", f"no pixel data: {what}")
        return []
    refused = capture_problem(ds, str(sop_class))
    if refused:
        report.skip(rel, *refused)
        return []
    try:
        problem = _truncated(path, ds)
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            problem = f"{ds.SamplesPerPixel} samples per pixel (colour); MR magnitude expected"
    except (AttributeError, TypeError, ValueError) as exc:
        problem = f"incomplete image header: {exc}"
    if problem:
        report.skip(rel, "truncated" if "truncated" in problem else "not_image", problem)
        return []
    site_name = _site_of(ds, pseudo, site)
    del ds.PixelData
    deidentify(ds, cfg, pseudo)
    problem = decoder_problem(UID(str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))))
    if problem:
        study = str(ds.get("StudyInstanceUID", ""))
        report.skip(rel, "needs_decoder", problem, study=pseudo.key("s", study) if study else None)
        return []
    try:
        return _frames_of(path, rel, ds, site_name)
    except (GeometryError, ValueError, TypeError, IndexError) as exc:
        report.skip(rel, "missing_geometry", f"cannot place the image in space: {exc}")
        return []
