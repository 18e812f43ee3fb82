"""Frames -> stacks: one orientation (and echo) of one series, with bad frames reported and
dropped (other sizes, duplicates), slices sorted along the normal, spacing from positions, plane,
obliquity and contrast decided, and the pixels decoded with rescale applied.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
from pydicom.multival import MultiValue

from .dicom_scan import Frame, frame_attr, read_dicom
from .geometry import (GeometryError, PlaneInfo, cluster_orientations, plane_of, slice_normal,
                       slice_spacing, sort_positions)
from .report import IngestReport
from .series import Candidate, contrast_from_parameters, contrast_from_text


@dataclass
class Stack:
    frames: list[Frame]           # sorted along the normal
    plane: PlaneInfo
    spacing: list[float]          # [slice, row, col] mm
    contrast: str
    contrast_source: str
    description: str
    warnings: list[str] = field(default_factory=list)

    @property
    def header(self):
        return self.frames[0].header

    @property
    def where(self) -> str:
        return self.frames[0].rel.rsplit("/", 1)[0] if "/" in self.frames[0].rel else "."

    def candidate(self) -> Candidate:
        image_type = [str(v).upper() for v in (self.header.get("ImageType") or [])]
        return Candidate(self.plane.plane, self.contrast, len(self.frames), self.plane.obliquity_deg,
                         min(self.spacing[1:]), int(self.header.get("SeriesNumber", 0) or 0),
                         f"{self.header.get('SeriesInstanceUID', '')}/{self.frames[0].rel}/{self.frames[0].index}",
                         self.description, "DERIVED" in image_type, "LOCALIZER" in image_type)

    def plane_meta(self, keep_description: bool, oblique_threshold: float) -> dict:
        meta = {"spacing": self.spacing, "shape": [len(self.frames), *self.frames[0].shape],
                "contrast": self.contrast, "contrast_source": self.contrast_source,
                "obliquity_deg": self.plane.obliquity_deg,
                "oblique": self.plane.obliquity_deg > oblique_threshold,
                "normal": list(self.plane.normal),  # patient LPS
                "series_number": int(self.header.get("SeriesNumber", 0) or 0),
                "n_files": len({f.rel for f in self.frames})}
        if keep_description:
            meta["description"] = self.description
        return meta


def _drop(frames: list[Frame], bad: list[Frame], code: str, reason, report: IngestReport,
          reported: set[str]) -> list[Frame]:
    for frame in bad:
        if frame.rel not in reported:
            reported.add(frame.rel)
            report.skip(frame.rel, code, reason(frame) if callable(reason) else reason)
    bad_ids = {id(f) for f in bad}
    return [f for f in frames if id(f) not in bad_ids]


def _clean_frames(frames: list[Frame], report: IngestReport, reported: set[str]) -> list[Frame]:
    """Drop frames of a minority size and duplicate instances/positions, each with an entry."""
    sizes = Counter(f.shape for f in frames)
    main_size = sizes.most_common(1)[0][0]
    frames = _drop(frames, [f for f in frames if f.shape != main_size], "size_mismatch",
                   lambda f: f"slice size {f.shape[0]}x{f.shape[1]} differs from the series' "
                             f"{main_size[0]}x{main_size[1]}", report, reported)
    frames.sort(key=lambda f: (int(f.header.get("InstanceNumber", 0) or 0), f.rel, f.index or 0))
    seen_instance: dict[tuple, Frame] = {}
    seen_position: dict[tuple, Frame] = {}
    keep = []
    normal = slice_normal(frames[0].orientation)
    for f in frames:
        inst = (str(f.header.get("SOPInstanceUID", "")), f.index)
        pos = round(float(f.position @ normal), 3)
        if inst in seen_instance:
            _drop([], [f], "duplicate", f"duplicate instance of {seen_instance[inst].rel}", report, reported)
        elif pos in seen_position:
            _drop([], [f], "duplicate", f"same slice position {pos} mm as {seen_position[pos].rel}",
                  report, reported)
        else:
            seen_instance[inst], seen_position[pos] = f, f
            keep.append(f)
    return keep


def _contrast(frame: Frame) -> tuple[str, str, str]:
    h = frame.header
    description = " ".join(str(h.get(k, "") or "") for k in ("SeriesDescription", "ProtocolName")).strip()
    named = contrast_from_text(description)
    if named:
        return named, "description", description

    def number(value):
        if isinstance(value, (list, tuple, MultiValue)):
            value = value[0] if len(value) else None
        return float(value) if value not in (None, "") else None

    by_params = contrast_from_parameters(
        number(frame_attr(h, "MRTimingAndRelatedParametersSequence", "RepetitionTime", frame.index)),
        number(frame_attr(h, "MREchoSequence", "EffectiveEchoTime", frame.index)) or number(h.get("EchoTime")),
        number(h.get("InversionTime")),
        str(h.get("ScanningSequence", "") or ""), str(h.get("ScanOptions", "") or ""))
    return by_params, "parameters", description


def make_stack(frames: list[Frame], tolerance: float, report: IngestReport,
               reported: set[str]) -> Stack | None:
    """A validated stack, or None with an entry for each of its files."""
    frames = _clean_frames(frames, report, reported)
    normal = slice_normal(frames[0].orientation)
    try:
        order, dist = sort_positions([f.position for f in frames], normal)
        fallback = frames[0].header.get("SpacingBetweenSlices") or frames[0].thickness
        spacing, warnings = slice_spacing(dist, float(fallback) if fallback else None, tolerance)
    except GeometryError as exc:
        _drop(frames, frames, "bad_geometry", f"series geometry unusable: {exc}", report, reported)
        return None
    frames = [frames[i] for i in order]
    contrast, source, description = _contrast(frames[0])
    row_mm, col_mm = frames[0].pixel_spacing
    return Stack(frames, plane_of(normal), [spacing, row_mm, col_mm], contrast, source,
                 description, warnings)


def build_stacks(frames: list[Frame], tolerance: float, report: IngestReport) -> dict[str, list[Stack]]:
    """Stacks per (hashed) StudyInstanceUID: a series (and echo) split by orientation, so that
    e.g. a three-plane localizer series gives three stacks."""
    series: dict[tuple, list[Frame]] = defaultdict(list)
    for frame in frames:
        series[frame.series_key].append(frame)
    reported: set[str] = set()
    studies: dict[str, list[Stack]] = defaultdict(list)
    for key in sorted(series, key=str):
        members = series[key]
        labels = cluster_orientations([f.orientation for f in members])
        for label in sorted(set(labels)):
            stack = make_stack([f for f, lab in zip(members, labels) if lab == label], tolerance,
                               report, reported)
            if stack is not None:
                for message in stack.warnings:
                    report.warn(stack.where, message)
                studies[key[0]].append(stack)
    return studies


class DecodeError(ValueError):
    def __init__(self, rel: str, reason: str):
        super().__init__(f"{rel}: {reason}")
        self.rel, self.reason = rel, reason


def _pixels(frame: Frame) -> np.ndarray:
    try:
        return read_dicom(frame.path).pixel_array
    except Exception as exc:  # truncated fragments, bad lengths, plugin errors: all undecodable
        raise DecodeError(frame.rel, f"{type(exc).__name__}: {exc}") from exc


def decode(stack: Stack) -> np.ndarray:
    """(slices, rows, cols) float32 with each frame's rescale slope/intercept applied."""
    out = np.empty((len(stack.frames), *stack.frames[0].shape), dtype=np.float32)
    cache: dict = {}
    for i, frame in enumerate(stack.frames):
        if frame.path not in cache:
            cache.clear()  # hold one decoded file at a time
            cache[frame.path] = _pixels(frame)
        pixels = cache[frame.path]
        image = pixels[frame.index] if frame.index is not None and pixels.ndim == 3 else pixels
        if image.shape != frame.shape:
            raise DecodeError(frame.rel, f"decoded shape {image.shape} != header {frame.shape}")
        out[i] = image.astype(np.float64) * frame.slope + frame.intercept
    if not np.isfinite(out).all():
        raise DecodeError(stack.frames[0].rel, "non-finite values after rescale")
    return out
