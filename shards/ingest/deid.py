"""De-identification: DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile.

:func:`deidentify` applies the profile's actions (Table E.1-1) to a header, recursively through
sequences, before anything else reads it. The options in use (PS3.15 E.3) are:

- *Retain Longitudinal Temporal Information, Modified Dates*: dates are shifted by a per-patient
  offset (``dates=shift``) or cut to the year (``dates=year``, default) or removed (``dates=remove``).
- *Retain Patient Characteristics* (``retain_patient_characteristics``): age (capped at 90), sex,
  size and weight stay; everything else about the patient goes.
- *Clean Descriptors*: study/series/protocol descriptions are screened (:func:`screen_text`)
  because contrast and joint are read from them. Shards get only values mapped onto a closed
  vocabulary (contrast, plane, body part, vendor family); screened free text (descriptions,
  manufacturer, body part text, EHR text columns) reaches them only with ``keep_free_text=true``.

Identifiers the platform needs for joins (PatientID, AccessionNumber, StudyID) and every instance
UID are replaced by keyed hashes (HMAC-SHA256 with the user's salt), stable within a dataset, so the
same patient always maps to the same key. The salt comes from the environment or a file and is
never written anywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

from pydicom.dataset import Dataset

from ..config import ConfigError

DEID_METHOD = "PS3.15 basic, clean desc, modified dates, patient chars"  # LO: 64 chars max

# Table E.1-1 attributes (basic profile column), by action. X remove, Z empty, D dummy.
REMOVE = frozenset("""
AcquisitionComments AcquisitionContextSequence AcquisitionDeviceProcessingDescription
AcquisitionProtocolDescription ActualHumanPerformersSequence AdditionalPatientHistory
AdmissionID AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription Allergies Arbitrary
AuthorObserverSequence BranchOfService CassetteID ConfidentialityConstraintOnPatientDataDescription
ContentCreatorIdentificationCodeSequence ContributionDescription CountryOfResidence
CurrentPatientLocation CustodialOrganizationSequence DataSetTrailingPadding DerivationDescription
DeviceSerialNumber DigitalSignaturesSequence DischargeDiagnosisDescription DistributionAddress
DistributionName EthnicGroup FrameComments GantryID GeneratorID HumanPerformerName
HumanPerformerOrganization IconImageSequence IdentifyingComments ImageComments
ImagePresentationComments ImagingServiceRequestComments Impressions InstitutionAddress
InstitutionalDepartmentName InstitutionName InsurancePlanIdentification
IntendedRecipientsOfResultsIdentificationSequence InterpretationApproverSequence
InterpretationAuthor InterpretationDiagnosisDescription InterpretationIDIssuer
InterpretationRecorder InterpretationText InterpretationTranscriber IssuerOfAdmissionID
IssuerOfPatientID IssuerOfServiceEpisodeID LastMenstrualDate MAC MedicalAlerts MedicalRecordLocator
MilitaryRank ModifiedAttributesSequence ModifyingDeviceID ModifyingDeviceManufacturer
NameOfPhysiciansReadingStudy NamesOfIntendedRecipientsOfResults Occupation OperatorsName
OriginalAttributesSequence OrderCallbackPhoneNumber OrderEnteredBy OrdererLocation
OtherPatientIDs OtherPatientIDsSequence OtherPatientNames ParticipantSequence PatientAddress
PatientBirthName PatientBirthTime PatientComments PatientInstitutionResidence PatientInsurancePlanCodeSequence
PatientMotherBirthName PatientPrimaryLanguageCodeSequence PatientPrimaryLanguageModifierCodeSequence
PatientReligiousPreference PatientState PatientTelephoneNumbers PatientTransportArrangements
PerformedLocation PerformedProcedureStepDescription PerformedProcedureStepID
PerformedProcedureStepStartDate PerformedProcedureStepStartTime PerformingPhysicianIdentificationSequence
PerformingPhysicianName PersonAddress PersonTelephoneNumbers PhysicianApprovingInterpretation
PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence PhysiciansReadingStudyIdentificationSequence
PlateID PreMedication PregnancyStatus ReasonForStudy ReasonForTheImagingServiceRequest
ReasonForTheRequestedProcedure ReferencedPatientAliasSequence ReferencedPatientSequence
ReferencedStudySequence ReferringPhysicianAddress ReferringPhysicianIdentificationSequence
ReferringPhysicianTelephoneNumbers RegionOfResidence RequestAttributesSequence
RequestedContrastAgent RequestedProcedureComments RequestedProcedureDescription RequestedProcedureID
RequestedProcedureLocation RequestingPhysician RequestingService ResponsibleOrganization
ResponsiblePerson ResultsComments ResultsDistributionListSequence ResultsIDIssuer
ScheduledHumanPerformersSequence ScheduledPatientInstitutionResidence
ScheduledPerformingPhysicianIdentificationSequence ScheduledPerformingPhysicianName
ScheduledProcedureStepDescription ScheduledProcedureStepLocation ServiceEpisodeDescription
ServiceEpisodeID SmokingStatus SourceImageSequence SpecialNeeds StationName StudyComments
TextComments TopicAuthor TopicKeywords TopicSubject TopicTitle VerifyingObserverIdentificationCodeSequence
VerifyingObserverName VerifyingObserverSequence VisitComments
""".split())
EMPTY = frozenset("""
PatientName PatientBirthDate ReferringPhysicianName ContentCreatorName PatientSexNeutered
FillerOrderNumberImagingServiceRequest PlacerOrderNumberImagingServiceRequest
""".split())
PATIENT_CHARACTERISTICS = frozenset("PatientAge PatientSex PatientSize PatientWeight".split())
# Free text that later stages read (contrast, joint, vendor, body part): screened, not removed
DESCRIPTORS = frozenset("StudyDescription SeriesDescription ProtocolName BodyPartExamined Manufacturer".split())
# Identifiers kept as keyed hashes so label/EHR tables keyed by them can still be joined.
HASHED_IDS = {"PatientID": "patient", "AccessionNumber": "accession", "StudyID": "studyid"}
# UIDs that identify a class or syntax, not a patient or instance: kept as they are.
KEEP_UIDS = frozenset("""
SOPClassUID MediaStorageSOPClassUID TransferSyntaxUID ReferencedSOPClassUID
ImplementationClassUID ReferencedSOPClassUIDInFile CodingSchemeUID
""".split())
MAX_AGE_YEARS = 90  # ages above 89 are a direct identifier (HIPAA safe harbour); report 90


class DeidError(ConfigError):
    """De-identification cannot proceed (no salt, bad date policy)."""


@dataclass
class DeidConfig:
    salt_env: str = "MSKFM_DEID_SALT"   # environment variable holding the salt
    salt_file: str = ""                  # or a file whose content is the salt (wins when set)
    dates: str = "year"                  # year | shift | remove
    max_shift_days: int = 365
    retain_patient_characteristics: bool = True
    # Screened free text (descriptions, manufacturer, body part text, EHR text columns) into shards.
    # Off: only closed-vocabulary values. Screening cannot find every name in free text.
    keep_free_text: bool = False

    def validate(self) -> None:
        if self.dates not in ("year", "shift", "remove"):
            raise DeidError(f"deid.dates must be year, shift or remove, got '{self.dates}'")


def load_salt(cfg: DeidConfig) -> bytes:
    """The secret salt: from ``salt_file`` if set, else the ``salt_env`` variable."""
    if cfg.salt_file:
        path = Path(cfg.salt_file).expanduser()
        if not path.is_file():
            raise DeidError(f"deid.salt_file '{path}' does not exist")
        salt = path.read_bytes().strip()
    else:
        salt = os.environ.get(cfg.salt_env, "").encode()
    if len(salt) < 8:
        raise DeidError(f"a de-identification salt of at least 8 characters is required: set "
                        f"${cfg.salt_env} or deid.salt_file (keep it secret and keep it the same "
                        "for every ingest of one dataset)")
    return salt


@dataclass
class Pseudonymizer:
    """Keyed hashes of identifiers; one per dataset (one salt)."""

    salt: bytes = field(repr=False)

    def digest(self, kind: str, value: str) -> str:
        return hmac.new(self.salt, f"{kind}:{value.strip()}".encode(), hashlib.sha256).hexdigest()

    def ident(self, kind: str, value: str) -> str:
        """A 16-character pseudonym (fits SH/LO identifiers such as PatientID, AccessionNumber)."""
        return self.digest(kind, value)[:16]

    def uid(self, value: str) -> str:
        """A valid replacement UID (2.25 + decimal of 120 hash bits)."""
        return "2.25." + str(int(self.digest("uid", value)[:30], 16))

    def key(self, prefix: str, hashed: str) -> str:
        """A shard key (``s-…`` study, ``p-…`` patient) from an already hashed identifier."""
        return f"{prefix}-" + hashlib.sha256(hashed.encode()).hexdigest()[:24]

    def shift_days(self, patient: str, max_days: int) -> int:
        return int(self.digest("dateshift", patient)[:8], 16) % (2 * max_days + 1) - max_days


def phi_tokens(ds: Dataset) -> set[str]:
    """Identifying values of a header, for screening free text that may repeat them."""
    tokens: set[str] = set()
    for kw in ("PatientName", "OtherPatientNames", "PatientBirthName", "ReferringPhysicianName",
               "PerformingPhysicianName", "OperatorsName", "PatientMotherBirthName"):
        for part in re.split(r"[\^=\s,]+", str(ds.get(kw, "") or "")):
            if len(part) >= 2:
                tokens.add(part.upper())
    for kw in ("PatientID", "OtherPatientIDs", "AccessionNumber", "StudyID", "PatientBirthDate",
               "InstitutionName", "StationName", "DeviceSerialNumber", "PatientAddress"):
        value = str(ds.get(kw, "") or "").strip()
        if len(value) >= 2:
            tokens.add(value.upper())
    return tokens


_MONTHS = (r"(?:JAN(?:UARY)?|FEB(?:RUARY)?|MAR(?:CH)?|APR(?:IL)?|MAY|JUNE?|JULY?|AUG(?:UST)?|"
           r"SEP(?:T(?:EMBER)?)?|OCT(?:OBER)?|NOV(?:EMBER)?|DEC(?:EMBER)?)")
DATE_PATTERNS = (
    r"\b\d{4}[-./]?\d{2}[-./]?\d{2}\b",                        # 19450307, 1945-03-07, 1945/03/07
    r"\b\d{1,2}[-./]\d{1,2}[-./]\d{2,4}\b",                     # 07/03/1945, 3.7.45, 03-07-45
    rf"\b\d{{1,2}}(?:ST|ND|RD|TH)?[\s.-]*{_MONTHS}\.?[\s.,-]*\d{{2,4}}\b",   # 7 Mar 1945, 7-MAR-45
    rf"\b{_MONTHS}\.?\s*\d{{1,2}}(?:ST|ND|RD|TH)?,?\s*\d{{2,4}}\b",         # March 7, 1945
)
_DATE_LIKE = re.compile("|".join(DATE_PATTERNS), re.IGNORECASE)
# Phone numbers: 7+ digits in groups (555-867-5309, (0161) 496 0000, +44 20 7946 0018)
PHONE = re.compile(r"(?<![\w])\+?\(?\d[\d\s().-]{5,}\d(?![\w])")
# A word after a title is a name even when no header field holds it ("Dr. Smith")
HONORIFIC_NAME = re.compile(r"\b(?:DR|DOCTOR|PROF|PROFESSOR|MRS|MS|MISS|NURSE|SISTER)\b\.?\s*([A-Z][A-Z'-]+)",
                            re.IGNORECASE)
_LONG_NUMBER = re.compile(r"\d{5,}")
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9 _+\-*/().,:]")


def screen_text(text: str, tokens: set[str]) -> str:
    """Free text with identifying values, titled names, dates, phone and long numbers removed."""
    out = HONORIFIC_NAME.sub(" ", str(text or ""))
    out = _DATE_LIKE.sub(" ", out)
    out = PHONE.sub(lambda m: " " if sum(c.isdigit() for c in m.group(0)) >= 7 else m.group(0), out)
    out = _SAFE_CHARS.sub(" ", out)
    for token in sorted(tokens, key=len, reverse=True):
        # short tokens only as whole words ("AX" in a name must not eat "AX T2" mid-word elsewhere)
        pattern = re.escape(token) if len(token) >= 3 else rf"(?<![A-Za-z0-9]){re.escape(token)}(?![A-Za-z0-9])"
        out = re.sub(pattern, " ", out, flags=re.IGNORECASE)
    out = _DATE_LIKE.sub(" ", out)
    out = _LONG_NUMBER.sub(" ", out)
    return " ".join(out.split())


def _shifted_date(value: str, policy: str, shift: int) -> str:
    text = str(value or "").strip()
    if len(text) < 8 or not text[:8].isdigit():
        return ""
    if policy == "year":
        return text[:4] + "0101"
    if policy == "shift":
        try:
            day = date(int(text[:4]), int(text[4:6]), int(text[6:8])) + timedelta(days=shift)
        except ValueError:
            return ""
        return day.strftime("%Y%m%d")
    return ""


def _age_capped(value: str) -> str:
    match = re.fullmatch(r"(\d{3})([DWMY])", str(value or "").strip())
    if not match:
        return ""
    if match.group(2) == "Y" and int(match.group(1)) >= MAX_AGE_YEARS:
        return f"{MAX_AGE_YEARS:03d}Y"
    return match.group(0)


def _clean(ds: Dataset, ctx: "_Context") -> None:
    for elem in list(ds):
        kw, vr = elem.keyword, elem.VR
        if elem.tag.is_private or (elem.tag.group & 0xFF00) in (0x5000, 0x6000):
            del ds[elem.tag]  # private attributes, curves and overlays
        elif kw in REMOVE or (kw in PATIENT_CHARACTERISTICS and not ctx.cfg.retain_patient_characteristics):
            del ds[elem.tag]
        elif kw in EMPTY or vr in ("PN", "TM"):
            elem.value = ""
        elif kw == "PatientAge":
            elem.value = _age_capped(elem.value)
        elif kw in HASHED_IDS:
            elem.value = ctx.pseudo.ident(HASHED_IDS[kw], str(elem.value)) if elem.value else ""
        elif kw in DESCRIPTORS:
            elem.value = screen_text(elem.value, ctx.tokens)
        elif vr == "UI" and kw not in KEEP_UIDS and elem.value:
            elem.value = ctx.pseudo.uid(str(elem.value))
        elif vr in ("DA", "DT") and elem.value:
            elem.value = _shifted_date(str(elem.value), ctx.cfg.dates, ctx.shift)
        elif vr == "SQ":
            for item in elem.value:
                _clean(item, ctx)


@dataclass
class _Context:
    cfg: DeidConfig
    pseudo: Pseudonymizer
    tokens: set[str]
    shift: int


def deidentify(ds: Dataset, cfg: DeidConfig, pseudo: Pseudonymizer) -> Dataset:
    """Apply the basic profile to ``ds`` in place (file meta included) and return it."""
    patient = str(ds.get("PatientID", "") or ds.get("PatientName", "") or "")
    ctx = _Context(cfg, pseudo, phi_tokens(ds), pseudo.shift_days(patient, cfg.max_shift_days))
    _clean(ds, ctx)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("MediaStorageSOPInstanceUID"):
        meta.MediaStorageSOPInstanceUID = pseudo.uid(str(meta.MediaStorageSOPInstanceUID))
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEID_METHOD
    return ds


def study_date(ds: Dataset, policy: str) -> str | None:
    """The de-identified study date for meta: ``YYYY`` (year), ``YYYY-MM-DD`` (shift) or None."""
    value = str(ds.get("StudyDate", "") or ds.get("SeriesDate", "") or "")
    if len(value) < 8 or policy == "remove":
        return None
    return value[:4] if policy == "year" else f"{value[:4]}-{value[4:6]}-{value[6:8]}"
