"""``shards ingest dicom``: a folder of DICOM files in any layout -> de-identified study shards.

Pass 1 reads every header (no pixels), de-identifies it and groups frames into stacks per study
(:mod:`.dicom_scan`, :mod:`.dicom_stacks`). Pass 2 picks one stack per plane per study with the
configured rule (:mod:`.series`) and decodes only those, and only for studies not yet in a
finished shard.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from .common import FoundStudy, as_float32, run_pipeline
from .config import DicomIngestConfig
from .deid import Pseudonymizer, load_salt, study_date
from .dicom_scan import scan_file, walk
from .dicom_stacks import DecodeError, Stack, build_stacks, decode
from .geometry import dicom_affine
from .report import IngestReport
from .series import body_part_name, choose, joint_from_text, vendor_name

COMMAND = "ingest-dicom"


def key_function(pseudo: Pseudonymizer):
    """Map a table's raw key (StudyInstanceUID, PatientID, accession) to the study's join key."""
    def to_key(kind: str, raw: str) -> str:
        if kind == "study":
            return pseudo.key("s", pseudo.uid(raw))
        if kind == "patient":
            return pseudo.key("p", pseudo.ident("patient", raw))
        return pseudo.key("a", pseudo.ident("accession", raw))
    return to_key


def _field_strength(header) -> float | None:
    """Tesla; also read when an export writes a unit into the value ("1.5T", "15000 G")."""
    value = header.get("MagneticFieldStrength")
    if value in (None, ""):
        return None
    match = re.fullmatch(r"\s*(\d*\.?\d+)\s*(t|tesla|g|gauss)?\s*", str(value), re.IGNORECASE)
    if match is None:
        raise ValueError(f"MagneticFieldStrength {str(value)[:16]!r} is not a field strength")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    gauss = unit.startswith("g") or (not unit and number > 20)  # some exports write gauss
    return round(number / 10000.0 if gauss else number, 1)


def _most_common(values):
    """The study-level value when series disagree (e.g. a vendor's post-processing series)."""
    return Counter(values).most_common(1)[0][0]


def _header_ehr(header) -> dict:
    """Patient characteristics kept by the profile option (absent when the option is off)."""
    ehr: dict = {}
    age = str(header.get("PatientAge", "") or "")
    if age.endswith("Y") and age[:-1].isdigit():
        ehr["age"] = float(age[:-1])
    sex = str(header.get("PatientSex", "") or "").upper()
    if sex in ("F", "M"):
        ehr["sex"] = sex
    if header.get("PatientSize"):
        ehr["height_cm"] = round(float(header.PatientSize) * 100.0, 1)
    if header.get("PatientWeight"):
        ehr["weight_kg"] = round(float(header.PatientWeight), 1)
    return ehr


def _loader(stacks: list[Stack], cfg: DicomIngestConfig):
    """Decode the best stack per plane, falling back to the next one when decoding fails; the
    returned ``origin`` dict gets each decoded plane's source folder and NIfTI affine."""
    origin: dict = {}

    def load(report: IngestReport):
        ranked, rejected = choose([s.candidate() for s in stacks], cfg.choice)
        by_ident = {s.candidate().ident: s for s in stacks}
        for cand, reason in rejected:
            report.warn(by_ident[cand.ident].where, f"{cand.plane} series not used: {reason}")
        volumes, planes = {}, {}
        for plane, cands in ranked.items():
            for cand in cands:
                stack = by_ident[cand.ident]
                try:
                    volume = decode(stack)
                except DecodeError as exc:  # report, fall back to the next-ranked stack
                    report.skip(exc.rel, "decode_error", f"pixel data cannot be decoded: {exc.reason}")
                    continue
                volumes[plane] = as_float32(volume)
                planes[plane] = stack.plane_meta(cfg.deid.keep_free_text, cfg.choice.oblique_threshold_deg)
                origin[plane] = {"source": stack.where, "affine": dicom_affine(
                    stack.frames[0].orientation, stack.frames[0].position, stack.spacing).tolist()}
                break
        return volumes, planes, {}
    return load, origin


def _study(study_uid: str, stacks: list[Stack], cfg: DicomIngestConfig, pseudo: Pseudonymizer,
           report: IngestReport) -> FoundStudy | None:
    header = stacks[0].header
    key = pseudo.key("s", study_uid)
    texts = [header.get("BodyPartExamined", ""), header.get("StudyDescription", "")]
    joint = (cfg.joint or joint_from_text(*texts) or joint_from_text(*(s.description for s in stacks))
             or body_part_name(texts[0]))
    if joint is None:
        report.skip(stacks[0].where, "unknown_joint", "anatomy not found in BodyPartExamined or "
                    "descriptions; set joint=<anatomy> (e.g. knee, hip) for this export", study=key)
        return None
    patient_hash = str(header.get("PatientID", "") or "")
    if not patient_hash:
        report.warn(stacks[0].where, "no PatientID: the study is its own patient for the split")
    patient = pseudo.key("p", patient_hash or study_uid)
    accession = str(header.get("AccessionNumber", "") or "")
    meta = {"site": stacks[0].frames[0].site, "source": "dicom",
            "vendor": _most_common(vendor_name(s.header.get("Manufacturer", "")) for s in stacks),
            "field_strength": _most_common(_field_strength(s.header) for s in stacks),
            "body_part": body_part_name(header.get("BodyPartExamined", "")),
            "study_date": study_date(header, cfg.deid.dates)}
    if cfg.deid.keep_free_text:  # screened by deidentify(); the user opted in
        meta["manufacturer"] = str(header.get("Manufacturer", "") or "") or None
        meta["body_part_text"] = str(header.get("BodyPartExamined", "") or "").lower() or None
    join_keys = {"study": key, "patient": patient, "accession": pseudo.key("a", accession) if accession else ""}
    load, origin = _loader(stacks, cfg)
    return FoundStudy(key, patient, joint, meta, join_keys, len({f.rel for s in stacks for f in s.frames}),
                      load, _header_ehr(header), sorted({s.where for s in stacks}), origin)


def find_studies(cfg: DicomIngestConfig, pseudo: Pseudonymizer, report: IngestReport) -> list[FoundStudy]:
    source = Path(cfg.source)
    files = walk(source)
    report.files_seen = len(files)
    frames = []
    for path in tqdm(files, desc="headers", unit="file", disable=len(files) < 50):
        frames += scan_file(path, path.relative_to(source).as_posix(), cfg.deid, pseudo, cfg.site, report)
    studies = []
    for study_uid, stacks in sorted(build_stacks(frames, cfg.slice_gap_tolerance, report).items()):
        try:
            found = _study(study_uid, stacks, cfg, pseudo, report)
        except (ValueError, TypeError, AttributeError) as exc:  # one malformed value: skip the study
            report.skip(stacks[0].where, "bad_header", f"study not ingested: a header value cannot be "
                        f"read: {exc}", study=pseudo.key("s", study_uid))
            continue
        if found is not None:
            studies.append(found)
    found = {s.key for s in studies}
    blocked = sorted({e["study"] for e in report.skipped
                      if e["code"] == "needs_decoder" and e.get("study") and e["study"] not in found})
    for key in blocked:  # every image of the study needs a decoder: one study-level entry
        reason = next(e["reason"] for e in report.skipped if e.get("study") == key)
        report.skip(key, "study_needs_decoder", f"study not ingested: {reason}", study=key)
    return studies


def ingest_dicom(cfg: DicomIngestConfig) -> int:
    """Run the DICOM ingest; returns the exit code (0, or 1 when nothing usable / strict)."""
    pseudo = Pseudonymizer(load_salt(cfg.deid))
    return run_pipeline(cfg, COMMAND, pseudo, find_studies, key_function(pseudo))
