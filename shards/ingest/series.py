"""Contrast, joint and vendor from (screened) descriptions and sequence parameters, and the rule
that picks one stack per plane per study.

Contrast vocabulary (as in the synthetic generator): ``T1``, ``T2``, ``PD``, ``STIR``, ``GRE``
with ``_FS`` appended when fat is suppressed, or ``unknown``. Vendors are upper-case family names
(``SIEMENS``, ``GE``, ``PHILIPS``..., ``OTHER``), as in the synthetic data; body parts are DICOM
defined terms. These closed vocabularies are what reaches a shard by default. Descriptions win when they name a weighting (technologists name
series reliably); otherwise TR/TE/TI decide.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_FS = re.compile(r"(?<![A-Z])(FS|FAT ?SAT|FATSAT|SPAIR|SPIR|CHESS|FSAT|DIXON ?W|WATER)(?![A-Z])")
_WEIGHTING = (
    ("STIR", re.compile(r"STIR|TIRM")),
    ("PD", re.compile(r"(?<![A-Z])(PD|PDW|PROTON ?DENSITY|INTERMEDIATE)(?![A-Z])")),
    ("GRE", re.compile(r"(?<![A-Z])T2\*|(?<![A-Z])T2 ?STAR")),
    ("T2", re.compile(r"(?<![A-Z])T2")),
    ("T1", re.compile(r"(?<![A-Z])T1")),
    ("GRE", re.compile(r"(?<![A-Z])(GRE|MEDIC|MERGE|FFE|DESS|FLASH|SPGR|3D ?GE)(?![A-Z])")),
)
VENDORS = (("SIEMENS", "siemens"), ("GE", "ge "), ("GE", "general electric"), ("GE", "gems"),
           ("PHILIPS", "philips"), ("CANON", "canon"), ("CANON", "toshiba"), ("HITACHI", "hitachi"),
           ("FUJIFILM", "fujifilm"), ("UNITED-IMAGING", "united imaging"), ("ESAOTE", "esaote"))
JOINT_WORDS = {"knee": ("KNEE", "GENU"), "ankle": ("ANKLE", "FOOT", "TALUS", "ACHILL"),
               "shoulder": ("SHOULDER", "SHLDR", "HUMER", "ROTATOR")}


def contrast_from_text(text: str) -> str | None:
    """Weighting named in a description (``PD_FS``...), or None when it names none."""
    up = f" {str(text or '').upper().replace('_', ' ')} "
    for name, pattern in _WEIGHTING:
        if pattern.search(up):
            fat_sat = name != "STIR" and bool(_FS.search(up))
            return name + ("_FS" if fat_sat else "")
    return None


def contrast_from_parameters(tr: float | None, te: float | None, ti: float | None,
                             scanning_sequence: str = "", scan_options: str = "") -> str:
    """Weighting from timing: IR with short TI is STIR, short TR/TE T1, long TR short TE PD."""
    seq, opts = str(scanning_sequence).upper(), str(scan_options).upper()
    fs = "_FS" if re.search(r"(?<![A-Z])(FS|SFS|FAT)", opts) else ""
    if "IR" in seq and ti and 80 <= ti <= 250:
        return "STIR"
    if not tr or not te:
        return "GRE" + fs if "GR" in seq else "unknown"
    if "GR" in seq and tr < 100:
        return "GRE" + fs
    if tr < 900 and te < 30:
        return "T1" + fs
    if tr >= 1500 and te < 50:
        return "PD" + fs
    if tr >= 1500 and te >= 60:
        return "T2" + fs
    return "unknown"


# DICOM BodyPartExamined defined terms (PS3.16 Annex L) of the limbs; anything else is free text
BODY_PARTS = ("KNEE", "ANKLE", "SHOULDER", "FOOT", "HIP", "ELBOW", "WRIST", "HAND", "LEG", "ARM",
              "THIGH", "FOREARM", "UPPER ARM", "LOWER LEG", "LOWER LIMB", "UPPER LIMB", "EXTREMITY",
              "FINGER", "TOE", "HEEL", "PELVIS", "SPINE")


def vendor_name(manufacturer: str) -> str:
    """The vendor family (closed vocabulary of :data:`VENDORS`), ``OTHER`` or ``unknown``."""
    text = f"{str(manufacturer or '').lower()} "
    for name, needle in VENDORS:
        if needle in text:
            return name
    return "OTHER" if text.strip() else "unknown"


def body_part_name(text: str) -> str | None:
    """The first :data:`BODY_PARTS` term named in a BodyPartExamined value (lower case), else None."""
    up = " ".join(re.sub(r"[^A-Z]+", " ", str(text or "").upper()).split())
    hits = [(m.start(), term) for term in BODY_PARTS for m in re.finditer(rf"\b{term}\b", up)]
    return min(hits)[1].lower() if hits else None


def joint_from_text(*texts: str) -> str | None:
    up = " ".join(str(t or "").upper() for t in texts)
    for joint, words in JOINT_WORDS.items():
        if any(w in up for w in words):
            return joint
    return None


@dataclass
class ChoiceConfig:
    """Which stack to keep when a study has several for a plane (first rule that separates wins)."""

    contrast_order: list[str] = field(default_factory=lambda: [
        "PD_FS", "T2_FS", "STIR", "PD", "T2", "T1", "T1_FS", "GRE", "GRE_FS", "unknown"])
    prefer_non_oblique: bool = True
    oblique_threshold_deg: float = 10.0  # obliquity above this marks a stack oblique
    max_obliquity_deg: float = 40.0      # stacks tilted more than this are not used at all
    min_slices: int = 1
    # Series never used (regex on the screened description, or ImageType LOCALIZER)
    exclude_descriptions: list[str] = field(default_factory=lambda: [
        r"LOCALI[SZ]ER", r"SCOUT", r"SURVEY", r"\bLOC\b", r"CALIBRATION", r"3[- ]?PLANE"])
    prefer_original: bool = True  # ImageType ORIGINAL before DERIVED (reformats, subtractions)


@dataclass
class Candidate:
    """One stack offered for a plane: what the choice rule compares."""

    plane: str
    contrast: str
    n_slices: int
    obliquity_deg: float
    inplane_mm: float
    series_number: int
    ident: str  # stable tie-break (hashed series UID or file path)
    description: str = ""
    derived: bool = False
    localizer: bool = False


def rank(cand: Candidate, cfg: ChoiceConfig) -> tuple:
    """Sort key: contrast preference, not oblique, more slices, finer pixels, lower series number."""
    order = cfg.contrast_order
    contrast_rank = order.index(cand.contrast) if cand.contrast in order else len(order)
    oblique = cfg.prefer_non_oblique and cand.obliquity_deg > cfg.oblique_threshold_deg
    derived = cfg.prefer_original and cand.derived
    return (derived, contrast_rank, oblique, -cand.n_slices, cand.inplane_mm, cand.series_number,
            cand.ident)


def excluded(cand: Candidate, cfg: ChoiceConfig) -> str | None:
    if cand.localizer:
        return "ImageType LOCALIZER"
    for pattern in cfg.exclude_descriptions:
        if re.search(pattern, cand.description.upper()):
            return f"description matches exclude pattern '{pattern}'"
    return None


def choose(cands: list[Candidate], cfg: ChoiceConfig) -> tuple[dict[str, list[Candidate]], list[tuple[Candidate, str]]]:
    """Usable candidates per plane, best first (the first that decodes is used), and the
    unusable ones with the reason.

    Rule: drop localizers/excluded descriptions, stacks tilted past ``max_obliquity_deg`` and
    those under ``min_slices``; then rank by original before derived, ``contrast_order``,
    non-oblique first, more slices, finer in-plane pixels, lower series number."""
    ranked: dict[str, list[Candidate]] = {}
    rejected: list[tuple[Candidate, str]] = []
    for cand in sorted(cands, key=lambda c: rank(c, cfg)):
        why = excluded(cand, cfg)
        if why:
            rejected.append((cand, why))
        elif cand.obliquity_deg > cfg.max_obliquity_deg:
            rejected.append((cand, f"obliquity {cand.obliquity_deg} deg > max_obliquity_deg"))
        elif cand.n_slices < cfg.min_slices:
            rejected.append((cand, f"{cand.n_slices} slices < min_slices {cfg.min_slices}"))
        else:
            ranked.setdefault(cand.plane, []).append(cand)
    return ranked, rejected
