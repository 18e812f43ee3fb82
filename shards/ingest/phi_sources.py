"""Identifying values of a source export, gathered for :mod:`shards.phi_scan` to look for in shards.

From every DICOM header (recursively, private tags included): person names, IDs, UIDs (not class
UIDs), dates, institution, station, addresses and phone numbers, free text (descriptions, comments,
body part, manufacturer). From fastMRI files: string attributes (``patient_id``...) and the
ISMRMRD header's subject, study and measurement fields. From NIfTI headers: their text fields; from
JSON sidecars (dcm2niix/BIDS): values under DICOM keywords.
From tables (``*.csv``, ``*.tsv``, ``*.parquet`` in the export, and those given): every cell
outside the closed vocabularies. And the names of the export's folders and files (stems).

Free text is also mined for what it embeds: phone numbers, dates in any common format, names after
a title ("Dr. Smith"), numbers of 5+ digits. Every date becomes the set of its common renderings.
Values are kept in memory only; a needle records the *kind* and *field* it came from, which is all
a scan reports.
"""

from __future__ import annotations

import re
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from pydicom.multival import MultiValue

from ..schema import PLANE_NAMES, PLANES, RECON_FIELDS, STUDY_FIELDS
from ..stats import empty_stats
from ..synth.vocab import EHR, JOINTS, LABELS, STRUCTURES
from .deid import _DATE_LIKE, HONORIFIC_NAME, KEEP_UIDS, PHONE
from .series import BODY_PARTS, VENDORS
from .tables import SEXES

MONTHS = ("January February March April May June July August September October November December").split()
ID_KEYWORDS = frozenset("""PatientID OtherPatientIDs AccessionNumber StudyID IssuerOfPatientID AdmissionID
MedicalRecordLocator PerformedProcedureStepID RequestedProcedureID ScheduledProcedureStepID
DeviceSerialNumber FillerOrderNumberImagingServiceRequest PlacerOrderNumberImagingServiceRequest
ServiceEpisodeID PlateID CassetteID GantryID GeneratorID""".split())
PLACE_KEYWORDS = frozenset("""InstitutionName InstitutionAddress InstitutionalDepartmentName StationName
PatientAddress PersonAddress ReferringPhysicianAddress RegionOfResidence CountryOfResidence
CurrentPatientLocation PatientInstitutionResidence""".split())
PHONE_KEYWORDS = frozenset("PatientTelephoneNumbers PersonTelephoneNumbers ReferringPhysicianTelephoneNumbers "
                           "OrderCallbackPhoneNumber".split())
FREE_TEXT_KEYWORDS = frozenset("""StudyDescription SeriesDescription ProtocolName BodyPartExamined Manufacturer
PerformedProcedureStepDescription RequestedProcedureDescription ReasonForStudy AdditionalPatientHistory
DerivationDescription""".split())
TEXT_VRS = ("LT", "ST", "UT", "LO", "SH")
# ISMRMRD header (fastMRI) fields by kind
XML_KINDS = {"patientName": "name", "referringPhysicianName": "name", "patientID": "id", "studyID": "id",
             "accessionNumber": "id", "measurementID": "id", "patientBirthdate": "date", "studyDate": "date",
             "seriesDate": "date", "studyInstanceUID": "uid", "seriesInstanceUIDRoot": "uid",
             "frameOfReferenceUID": "uid", "institutionName": "place", "stationName": "place",
             "studyDescription": "free_text", "seriesDescription": "free_text", "protocolName": "free_text"}
NIFTI_TEXT = ("descrip", "aux_file", "db_name", "intent_name")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
MIN_TEXT = 3        # shortest needle looked for (as a whole word) in text
MIN_DIGITS = 6      # shortest all-digit needle (shorter numbers are counts, sizes, ages)


def _vocabulary() -> frozenset[str]:
    """Words that shards carry by design (schema fields and names, closed vocabularies, export
    file names such as ``labels.json`` or ``sag_seg.nii.gz``): never needles on their own."""
    schema = {*STUDY_FIELDS, *RECON_FIELDS, *PLANE_NAMES.values(), *empty_stats(), "manifest",
              *(f"{p}_seg" for p in PLANES), *(n for names in (*LABELS.values(), *STRUCTURES.values()) for n in names)}
    words = {*schema, *PLANES, *JOINTS, *(b.lower() for b in BODY_PARTS), *(v[0].lower() for v in VENDORS),
             *(w for spec in EHR.values() for w in spec.values), *SEXES, "other", "unknown", "none",
             "null", "true", "false", "yes", "no", "train", "val", "test", "dicom", "nifti", "fastmri",
             "study", "recon", "knee", "brain", "prostate", "breast", "t1", "t2", "pd", "stir", "gre",
             "fs", "flair", "post", "pre", "fbk", "dicomdir", "image", "images", "series", "export"}
    return frozenset(w.lower() for w in words)


VOCABULARY = _vocabulary()


@dataclass(frozen=True)
class Needle:
    value: str   # never printed or written
    kind: str    # name | id | uid | date | place | phone | free_text | file_name | table
    field: str   # the attribute, column or XML tag it came from


class Needles:
    """A de-duplicated set of identifying values with their kinds. ``declared``: the words of the shard
    set's dataset declaration (anatomy, label, class, structure and EHR names), carried by design."""

    def __init__(self, declared=frozenset()):
        self.items: dict[str, Needle] = {}
        self.vocabulary = VOCABULARY | {w.lower() for w in declared}

    def add(self, value, kind: str, field: str) -> None:
        text = " ".join(str(value or "").split()).strip(" ,.;:^=-_/")
        digits = sum(c.isdigit() for c in text)
        if len(text) < MIN_TEXT or text.lower() in self.vocabulary:
            return
        if digits == len(text.replace(".", "").replace("-", "")) and digits < MIN_DIGITS and kind != "date":
            return  # a short number: counts and sizes look the same
        self.items.setdefault(text.lower(), Needle(text, kind, field))

    def name(self, value, field: str) -> None:
        parts = [p for p in re.split(r"[\^=\s,]+", str(value or "")) if p]
        if not parts:
            return
        for form in ("^".join(parts), " ".join(parts), " ".join(parts[1:2] + parts[:1]),
                     ", ".join(parts[:2]), "_".join(parts), "_".join(parts[1:2] + parts[:1])):
            self.add(form, "name", field)
        for part in parts:
            self.add(part, "name", field)

    def date(self, y: int, m: int, d: int, field: str) -> None:
        try:
            date(y, m, d)
        except ValueError:
            return
        mon, month, yy = MONTHS[m - 1][:3], MONTHS[m - 1], y % 100
        for form in (f"{y:04d}{m:02d}{d:02d}", f"{y}-{m:02d}-{d:02d}", f"{y}/{m:02d}/{d:02d}",
                     f"{y}.{m:02d}.{d:02d}", f"{d:02d}/{m:02d}/{y}", f"{m:02d}/{d:02d}/{y}",
                     f"{d:02d}.{m:02d}.{y}", f"{d:02d}-{m:02d}-{y}", f"{m:02d}-{d:02d}-{y}", f"{d}/{m}/{y}",
                     f"{m}/{d}/{y}", f"{d}.{m}.{y}", f"{d}/{m}/{yy:02d}", f"{m}/{d}/{yy:02d}",
                     f"{d:02d}/{m:02d}/{yy:02d}", f"{m:02d}/{d:02d}/{yy:02d}", f"{d}.{m}.{yy:02d}",
                     f"{d} {mon} {y}", f"{d}-{mon}-{y}", f"{d:02d}-{mon}-{y}", f"{d}-{mon}-{yy:02d}",
                     f"{month} {d}, {y}", f"{month} {d} {y}", f"{d} {month} {y}", f"{mon} {d}, {y}"):
            self.add(form, "date", field)

    def date_text(self, text: str, field: str) -> None:
        """A date written in any of the common formats; ambiguous d/m orders give both dates. The
        text as written is kept too when it is a valid date (else it is a number, not a date)."""
        text = str(text or "").strip()
        before = len(self.items)
        digits = re.findall(r"\d+", text)
        month = next((i + 1 for i, name in enumerate(MONTHS) if re.search(name[:3], text, re.I)), None)
        if month and len(digits) == 2:
            day, year = (int(digits[0]), int(digits[1])) if int(digits[0]) <= 31 else (int(digits[1]), int(digits[0]))
            self.date(_year(year), month, day, field)
        elif len(digits) == 1 and len(digits[0]) == 8:
            self.date(int(digits[0][:4]), int(digits[0][4:6]), int(digits[0][6:]), field)
        elif len(digits) == 3:
            a, b, c = digits
            if len(a) == 4:
                self.date(int(a), int(b), int(c), field)
            else:
                self.date(_year(int(c)), int(b), int(a), field)
                self.date(_year(int(c)), int(a), int(b), field)
        if len(self.items) > before:
            self.add(text, "date", field)

    def free_text(self, text, field: str, whole: bool = True) -> None:
        """Free text: the whole value (8+ characters), and what it embeds."""
        text = " ".join(str(text or "").split())
        if whole and len(text) >= 8:
            self.add(text, "free_text", field)
        for m in _DATE_LIKE.finditer(text):
            self.date_text(m.group(0), field)
        for m in re.finditer(r"\d{5,}", text):
            self.add(m.group(0), "id", field)
        for m in PHONE.finditer(text):
            self.phone(m.group(0), field)
        for m in HONORIFIC_NAME.finditer(text):
            self.name(m.group(1), field)

    def phone(self, text: str, field: str) -> None:
        digits = re.sub(r"\D", "", text)
        if len(digits) >= 7:
            self.add(text.strip(), "phone", field)
            self.add(digits, "phone", field)

    def __len__(self) -> int:
        return len(self.items)


def _year(y: int) -> int:
    return y if y >= 100 else (1900 + y if y > date.today().year % 100 else 2000 + y)


def _dicom(path: Path, needles: Needles) -> bool:
    from .dicom_scan import read_dicom

    try:
        ds = read_dicom(path, stop_before_pixels=True)
    except Exception:  # not DICOM, or damaged: nothing to gather
        return False
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("MediaStorageSOPInstanceUID"):
        needles.add(str(meta.MediaStorageSOPInstanceUID), "uid", "MediaStorageSOPInstanceUID")
    for elem in ds.iterall():
        kw, vr = elem.keyword or str(elem.tag), elem.VR
        if vr == "SQ" or elem.value is None:
            continue
        values = list(elem.value) if isinstance(elem.value, (list, tuple, MultiValue)) else [elem.value]
        for value in values:
            if isinstance(value, bytes):
                value = value.decode("latin-1", "ignore")
            text = str(value or "").strip()
            if not text:
                continue
            if vr == "PN":
                needles.name(text, kw)
            elif vr == "UI":
                if kw not in KEEP_UIDS:
                    needles.add(text, "uid", kw)
            elif vr in ("DA", "DT"):
                needles.date_text(text[:8], kw)
            elif kw in ID_KEYWORDS:
                needles.add(text, "id", kw)
            elif kw in PHONE_KEYWORDS:
                needles.phone(text, kw)
            elif kw in PLACE_KEYWORDS:
                needles.add(text, "place", kw)
                for word in re.split(r"[\s,^]+", text):
                    if len(word) >= 4 and not word.isdigit():
                        needles.add(word, "place", kw)
            elif kw in FREE_TEXT_KEYWORDS or elem.tag.is_private or vr in ("LT", "ST", "UT"):
                needles.free_text(text, kw)
    return True


def _fastmri(path: Path, needles: Needles) -> bool:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError:
        return False
    with f:
        for name, value in f.attrs.items():
            if name != "acquisition" and isinstance(value, (str, bytes)):
                text = value.decode("latin-1", "ignore") if isinstance(value, bytes) else value
                needles.add(text, "id" if "id" in name.lower() else "free_text", name)
                needles.free_text(text, name, whole=False)
        if "ismrmrd_header" in f:
            try:
                root = ET.fromstring(f["ismrmrd_header"][()])
            except ET.ParseError:
                return True
            for node in root.iter():
                tag, text = node.tag.rsplit("}", 1)[-1], (node.text or "").strip()
                kind = XML_KINDS.get(tag)
                if not text or kind is None:
                    continue
                if kind == "name":
                    needles.name(text, tag)
                elif kind == "date":
                    needles.date_text(text, tag)
                elif kind == "free_text":
                    needles.free_text(text, tag)
                else:
                    needles.add(text, kind, tag)
    return True


def _nifti(path: Path, needles: Needles) -> bool:
    import nibabel as nib

    try:
        header = nib.load(path).header
    except Exception:  # damaged: nothing to gather
        return False
    for key in NIFTI_TEXT:
        if key in header:
            needles.free_text(header[key].item().decode("latin-1", "ignore").strip("\x00 "), key)
    return True


NAME_KEYWORDS = frozenset("""PatientName OtherPatientNames PatientBirthName PatientMotherBirthName
ReferringPhysicianName PerformingPhysicianName OperatorsName NameOfPhysiciansReadingStudy
PhysiciansOfRecord RequestingPhysician""".split())


def _sidecar(path: Path, needles: Needles) -> bool:
    """A JSON sidecar (dcm2niix/BIDS): values under DICOM keywords, by the keyword's kind."""
    import json

    try:
        data = json.loads(path.read_text(errors="replace"))
    except (OSError, ValueError):
        return False
    stack = [data]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            if isinstance(value, (dict, list)):
                stack.append(value)
                continue
            key, text = str(key), str(value if value is not None else "")
            if key in NAME_KEYWORDS:
                needles.name(text, key)
            elif key.endswith(("Date", "DateTime")) or key == "PatientBirthDate":
                needles.date_text(re.sub(r"[T ].*$", "", text), key)
            elif key in ID_KEYWORDS or key.endswith("UID"):
                needles.add(text, "uid" if key.endswith("UID") else "id", key)
            elif key in PLACE_KEYWORDS:
                needles.add(text, "place", key)
            elif key in PHONE_KEYWORDS:
                needles.phone(text, key)
            elif key in FREE_TEXT_KEYWORDS or key.endswith("Comments"):
                needles.free_text(text, key)
    return True


def gather_table(path: Path, needles: Needles) -> None:
    """Every cell of a label or EHR table outside the closed vocabularies (dates in any format)."""
    from .tables import TableError, read_table

    try:
        frame = read_table(path)
    except TableError:
        return
    for column in frame.columns:
        for value in frame[column].tolist():
            text = " ".join(str(value if value is not None else "").split())
            if not text or text.lower() in needles.vocabulary:
                continue
            try:
                float(text)
                needles.add(text, "table", str(column))  # kept only when 6+ digits (an ID)
                continue
            except ValueError:
                pass
            needles.add(text, "table", str(column))
            needles.free_text(text, str(column), whole=False)


def gather(source: str | Path | None, tables: list[str | Path] = (), declared=frozenset()) -> tuple[Needles, dict]:
    """Needles from every file under ``source`` and the given tables; and what was read (counts)."""
    needles, counts = Needles(declared), {"dicom": 0, "fastmri": 0, "nifti": 0, "sidecars": 0, "tables": 0,
                                      "other": 0}
    if source:
        from .dicom_scan import walk

        root = Path(source)
        files = walk(root) if root.is_dir() else []
        for path in files:
            rel = path.relative_to(root)
            for part in (*rel.parent.parts, re.sub(r"(\.nii)?\.[A-Za-z0-9]+$", "", rel.name)):
                if len(part) >= 6 and re.search(r"[A-Za-z]", part):  # not 000123: numbering, not a name
                    needles.add(part, "file_name", "path")
            name = path.name.lower()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name.endswith((".h5", ".hdf5")) and _fastmri(path, needles):
                    counts["fastmri"] += 1
                elif name.endswith((".nii", ".nii.gz")) and _nifti(path, needles):
                    counts["nifti"] += 1
                elif name.endswith(".json") and _sidecar(path, needles):
                    counts["sidecars"] += 1
                elif name.endswith(TABLE_SUFFIXES):
                    gather_table(path, needles)
                    counts["tables"] += 1
                elif _dicom(path, needles):
                    counts["dicom"] += 1
                else:
                    counts["other"] += 1
    for table in tables:
        if table and Path(table).is_file():
            gather_table(Path(table), needles)
            counts["tables"] += 1
    return needles, counts
