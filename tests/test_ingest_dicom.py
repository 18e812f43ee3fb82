"""DICOM ingest end to end on an export built with pydicom: planes, spacing, rescaled intensities,
multi-frame, RLE, JPEG Lossless / JPEG-LS / JPEG 2000 (the pinned decoder plugins), bad files (one report entry each), no planted PHI byte in any shard, stable
salted keys, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (MPEG2MPML, UID, EnhancedMRImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless,
                         JPEGLosslessSV1, JPEGLSLossless, MediaStorageDirectoryStorage, MRImageStorage, RLELossless,
                         generate_uid)

from shards.config import load_config
from shards.ingest.cli import main as ingest_main
from shards.ingest.config import DicomIngestConfig
from shards.ingest.dicom import ingest_dicom
from shards.ingest import dicom as dicom_mod
from shards.ingest.deid import DeidConfig, Pseudonymizer, deidentify, screen_text
from shards.ingest.dicom_scan import decoder_problem
from shards.ingest.series import Candidate, ChoiceConfig, choose, contrast_from_parameters, contrast_from_text
from shards.manifest import load_manifest, verify_shards
from shards.reader import iter_samples

SALT = "unit-test-salt-1"
PHI = {"PatientName": "DOE^JOHN", "PatientID": "MRN12345678", "PatientBirthDate": "19450307",
       "AccessionNumber": "ACC998877", "InstitutionName": "SAINT EXAMPLE HOSPITAL",
       "InstitutionAddress": "12 ELM STREET SPRINGFIELD", "ReferringPhysicianName": "HOUSE^GREGORY",
       "StationName": "MRSTATION7", "DeviceSerialNumber": "SN445566", "OtherPatientIDs": "OTHERID4242",
       "StudyDate": "20200114", "PatientAddress": "99 PRIVET DRIVE"}
PHI_STRINGS = ["DOE", "JOHN", "MRN12345678", "19450307", "ACC998877", "SAINT EXAMPLE", "ELM STREET",
               "GREGORY", "MRSTATION7", "SN445566", "OTHERID4242", "20200114", "PRIVET", "PRIVATE-NOTE"]
SAG = [0, 1, 0, 0, 0, -1]
COR = [1, 0, 0, 0, 0, -1]
AX = [1, 0, 0, 0, 1, 0]


def _oblique_axial(deg: float) -> list[float]:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return [1, 0, 0, 0, c, s]  # column direction tilted towards z: normal tilts by deg from z


def _base(patient: dict, study_uid: str, series_uid: str, desc: str, vendor: str, field: float,
          body: str, sop_class=MRImageStorage) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = "MR"
    for kw, value in {**PHI, **patient}.items():
        setattr(ds, kw, value)
    ds.SeriesDescription = desc
    ds.StudyDescription = f"MRI {body} {PHI['PatientName']}"
    ds.Manufacturer, ds.MagneticFieldStrength, ds.BodyPartExamined = vendor, field, body
    ds.PatientAge, ds.PatientSex = "045Y", "F"
    ds.add_new(0x00291010, "LO", "PRIVATE-NOTE DOE")  # private tag with PHI
    ds.add_new(0x00290010, "LO", "ACME")
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    return ds


def write_series(folder: Path, patient: dict, study_uid: str, iop, n: int, gap: float, desc: str,
                 rng, vendor="SIEMENS", field=3.0, body="KNEE", slope=1.0, intercept=0.0,
                 thickness=None, compress=False, shape=(16, 16), series_number=1, series_uid=None,
                 jitter=0.0, image_type=("ORIGINAL", "PRIMARY", "M")) -> dict:
    """Single-frame files written in shuffled order; returns the expected (sorted) volume."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    normal = np.cross(iop[:3], iop[3:])
    raw = rng.integers(0, 1000, size=(n, *shape)).astype(np.uint16)
    for i in rng.permutation(n):
        ds = _base(patient, study_uid, series_uid, desc, vendor, field, body)
        ds.SeriesNumber, ds.InstanceNumber = series_number, int(i) + 1
        ds.ImageOrientationPatient = [float(v) + jitter * (i % 2) for v in iop]  # scanner round-off
        ds.ImageType = list(image_type)
        ds.ImagePositionPatient = [float(v) for v in (np.array([-10.0, 5.0, 20.0]) + i * gap * normal)]
        ds.PixelSpacing = [0.5, 0.6]
        ds.SliceThickness = thickness if thickness is not None else gap
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.Rows, ds.Columns = shape
        ds.PixelData = raw[i].tobytes()
        if compress:
            ds.compress(RLELossless)
        ds.save_as(folder / f"IM{i:04d}", enforce_file_format=True)  # no extension
    return {"volume": raw.astype(np.float64) * slope + intercept, "series_uid": series_uid}


def write_enhanced(path: Path, patient: dict, study_uid: str, rng) -> np.ndarray:
    """Enhanced MR multi-frame, coronal, per-frame rescale; contrast only from TR/TE (T1)."""
    ds = _base(patient, study_uid, generate_uid(), "COR 3D", "SIEMENS", 3.0, "KNEE",
               sop_class=EnhancedMRImageStorage)
    n = 5
    raw = rng.integers(0, 1000, size=(n, 16, 16)).astype(np.uint16)
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = COR
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = [0.4, 0.4]
    shared.PixelMeasuresSequence[0].SliceThickness = 3.5
    shared.MRTimingAndRelatedParametersSequence = Sequence([Dataset()])
    shared.MRTimingAndRelatedParametersSequence[0].RepetitionTime = 500
    shared.MREchoSequence = Sequence([Dataset()])
    shared.MREchoSequence[0].EffectiveEchoTime = 12
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame, expected = [], []
    for i in range(n):
        fg = Dataset()
        fg.PlanePositionSequence = Sequence([Dataset()])
        fg.PlanePositionSequence[0].ImagePositionPatient = [0.0, 30.0 - 3.5 * i, 0.0]  # reversed
        fg.PixelValueTransformationSequence = Sequence([Dataset()])
        fg.PixelValueTransformationSequence[0].RescaleSlope = 1.0 + i
        fg.PixelValueTransformationSequence[0].RescaleIntercept = -5.0 * i
        per_frame.append(fg)
        expected.append(raw[i] * (1.0 + i) - 5.0 * i)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.NumberOfFrames = n
    ds.PixelData = raw.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return np.stack(expected[::-1])  # cor normal is +y (LPS): ascending y = reversed frame order


def _non_image(path: Path, sop_class: str) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = PHI["PatientName"], PHI["PatientID"]
    if sop_class == MediaStorageDirectoryStorage:
        ds.DirectoryRecordSequence = Sequence([])
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    p1 = {"PatientName": "DOE^JOHN", "PatientID": "MRN12345678"}
    p2 = {"PatientName": "ROE^JANE", "PatientID": "MRN87654321"}
    a, b, c, d = (generate_uid() for _ in range(4))
    e = {"uids": [a, b, c, d], "studies": {}}
    base = root / "DOE_JOHN_export"  # PHI in a folder name: must not reach the shards
    # study A: knee, sag PD FS (rescale, thickness != gap), a T1 sag (loses), enhanced cor, RLE oblique ax
    e["sag"] = write_series(base / "A" / "s1", p1, a, SAG, 6, 3.0, f"SAG PD FS {PHI['PatientID']} DOE",
                            rng, slope=2.0, intercept=-100.0, thickness=2.5, series_number=1, jitter=6e-4)
    loc_uid = generate_uid()  # a three-plane localizer: one series, three orientations
    for k, iop in enumerate((SAG, COR, AX)):
        write_series(base / "A" / f"loc{k}", p1, a, iop, 3, 8.0, "3-PL LOC", rng, series_number=9,
                     series_uid=loc_uid, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    write_series(base / "A" / "s2", p1, a, SAG, 8, 3.0, "SAG T1", rng, series_number=2)
    e["cor"] = write_enhanced(base / "A" / "s3" / "MF0001.dcm", p1, a, rng)
    e["ax"] = write_series(base / "A" / "s4", p1, a, _oblique_axial(15.0), 4, 4.0, "AX T2 FS", rng,
                           compress=True, series_number=4)
    _non_image(base / "A" / "SR0001", "1.2.840.10008.5.1.4.1.1.88.22")      # Enhanced SR
    _non_image(base / "A" / "PS0001", "1.2.840.10008.5.1.4.1.1.11.1")       # grayscale presentation state
    _non_image(root / "DICOMDIR", MediaStorageDirectoryStorage)
    (root / "notes.txt").write_text("export notes")
    # study B: same patient, ankle, GE: mixed sizes, a duplicate, a truncated slice, single-slice sag
    write_series(base / "B" / "ax", p1, b, AX, 5, 2.0, "AX PD", rng, vendor="GE MEDICAL SYSTEMS",
                 field=1.5, body="ANKLE", series_number=1)
    write_series(base / "B" / "ax_big", p1, b, AX, 1, 2.0, "AX PD", rng, vendor="GE MEDICAL SYSTEMS",
                 field=1.5, body="ANKLE", series_number=1, shape=(20, 20))
    # same series UID as B/ax for the 20x20 slice: rewrite it into the first series
    big = pydicom.dcmread(base / "B" / "ax_big" / "IM0000")
    big.SeriesInstanceUID = pydicom.dcmread(next((base / "B" / "ax").iterdir())).SeriesInstanceUID
    big.ImagePositionPatient = [-10.0, 5.0, 40.0]
    big.save_as(base / "B" / "ax" / "IMBIG")
    shutil.rmtree(base / "B" / "ax_big")
    shutil.copy(base / "B" / "ax" / "IM0002", base / "B" / "ax" / "IM0002_copy")
    e["single"] = write_series(base / "B" / "sag1", p1, b, SAG, 1, 4.0, "SAG T2", rng,
                               vendor="GE MEDICAL SYSTEMS", field=1.5, body="ANKLE", series_number=2)
    bare = pydicom.dcmread(base / "B" / "sag1" / "IM0000")  # old-PACS style: no preamble, no meta
    bare.file_meta, bare.preamble = FileMetaDataset(), None
    bare.save_as(base / "B" / "sag1" / "IM0000", implicit_vr=True, little_endian=True)
    assert (base / "B" / "sag1" / "IM0000").read_bytes()[:2] == b"\x08\x00"
    write_series(base / "B" / "trunc", p1, b, COR, 4, 3.0, "COR T1", rng, vendor="GE", field=1.5, body="ANKLE",
                 series_number=3)
    blob = (base / "B" / "trunc" / "IM0001").read_bytes()
    (base / "B" / "trunc" / "IM0001").write_bytes(blob[: len(blob) - 100])
    # study C: other patient, shoulder; one file without orientation
    write_series(root / "p2" / "C", p2, c, COR, 4, 3.0, "COR T2 FS", rng, vendor="Philips", body="SHOULDER")
    # a preferred PD FS series whose RLE data is cut short: decoding fails, T2 FS is used instead
    write_series(root / "p2" / "C_pd", p2, c, COR, 3, 3.0, "COR PD FS", rng, vendor="Philips",
                 body="SHOULDER", compress=True, series_number=2)
    blob = bytearray((root / "p2" / "C_pd" / "IM0002").read_bytes())
    fragment = blob.index(b"\xfe\xff\x00\xe0", blob.index(b"\xfe\xff\x00\xe0") + 8) + 8
    blob[fragment:fragment + 4] = (15).to_bytes(4, "little")  # RLE header: 15 segments, not 2
    (root / "p2" / "C_pd" / "IM0002").write_bytes(bytes(blob))
    cut = pydicom.dcmread(root / "p2" / "C_pd" / "IM0001")  # RLE file cut short: truncated
    cut.SOPInstanceUID = generate_uid()
    cut.save_as(root / "p2" / "C_pd" / "IMCUT")
    (root / "p2" / "C_pd" / "IMCUT").write_bytes((root / "p2" / "C_pd" / "IMCUT").read_bytes()[:-60])
    noori = pydicom.dcmread(root / "p2" / "C" / "IM0000")
    del noori.ImageOrientationPatient
    noori.SOPInstanceUID = generate_uid()
    noori.save_as(root / "p2" / "C" / "IMNOORI")
    # study D: MPEG-2 video only (no pydicom decoder for it) -> needs a decoder
    ds = _base(p2, d, generate_uid(), "SAG PD", "SIEMENS", 3.0, "KNEE")
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.ImageOrientationPatient, ds.ImagePositionPatient, ds.PixelSpacing = SAG, [0, 0, 0], [0.5, 0.5]
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xc3" + bytes(60)])
    ds["PixelData"].VR = "OB"
    (root / "p2" / "D").mkdir()
    ds.save_as(root / "p2" / "D" / "JL0001", enforce_file_format=True)
    e["root"] = root
    return e


@pytest.fixture(scope="module")
def ingested(export, tmp_path_factory, monkeypatch_module) -> dict:
    out = tmp_path_factory.mktemp("shards")
    run = tmp_path_factory.mktemp("run")
    monkeypatch_module.setenv("MSKFM_DEID_SALT", SALT)
    a, b = export["uids"][:2]
    (run / "labels.csv").write_text(f"study_uid,acl,effusion,atfl\n{a},1,0,\n{b},,,1\n")
    (run / "ehr.csv").write_text(f"patient_id,height_cm,patient_type\n{PHI['PatientID']},172,outpatient\n")
    code = ingest_main(["dicom", str(export["root"]), "--out", str(out), f"run_dir={run}",
                        "--config", str(Path(__file__).parents[1] / "configs/shards/ingest-dicom.yaml"),
                        "deid.dates=shift", "shard_max_count=2", f"labels.path={run / 'labels.csv'}",
                        f"ehr.path={run / 'ehr.csv'}"])
    report = json.loads((run / "ingest_report.json").read_text())
    samples = {s["__key__"]: s for s in read_all(out, ("meta", "sag", "cor", "ax", "ehr", "labels"))}
    return {"out": out, "run": run, "code": code, "report": report, "samples": samples}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def read_all(out: Path, fields=("meta",)) -> list[dict]:
    splits = load_manifest(out)["splits"]
    return [s for split in splits for s in iter_samples(out, split, fields=fields, require=())]


def _by_body(samples: dict, joint: str) -> dict:
    return next(s for s in samples.values() if s["meta"]["joint"] == joint)


def test_planes_spacing_intensities(export, ingested):
    assert ingested["code"] == 0
    knee = _by_body(ingested["samples"], "knee")
    planes = knee["meta"]["planes"]
    assert set(planes) == {"sag", "cor", "ax"}
    assert planes["sag"]["spacing"] == [3.0, 0.5, 0.6]           # positions win over thickness 2.5
    assert planes["sag"]["contrast"] == "PD_FS"
    np.testing.assert_allclose(knee["sag"], export["sag"]["volume"])  # rescale 2x-100, sorted
    assert planes["cor"]["spacing"] == [3.5, 0.4, 0.4] and planes["cor"]["contrast"] == "T1"
    assert planes["cor"]["contrast_source"] == "parameters"
    np.testing.assert_allclose(knee["cor"], export["cor"])            # per-frame rescale
    assert planes["ax"]["contrast"] == "T2_FS" and planes["ax"]["spacing"][0] == 4.0
    assert abs(planes["ax"]["obliquity_deg"] - 15.0) < 0.01
    np.testing.assert_allclose(knee["ax"], export["ax"]["volume"])    # RLE decoded losslessly
    assert knee["meta"]["vendor"] == "SIEMENS" and knee["meta"]["field_strength"] == 3.0
    # header characteristics + the EHR table joined on the keyed hash of PatientID
    assert knee["ehr"] == {"age": 45.0, "sex": "F", "height_cm": 172.0, "patient_type": "outpatient"}
    assert knee["labels"]["acl"] == 1 and knee["labels"]["effusion"] == 0 and knee["labels"]["pcl"] is None
    shoulder = _by_body(ingested["samples"], "shoulder")
    assert shoulder["meta"]["planes"]["cor"]["contrast"] == "T2_FS"  # fell back after decode_error
    ankle = _by_body(ingested["samples"], "ankle")
    assert ankle["meta"]["planes"]["ax"]["shape"] == [5, 16, 16]
    assert ankle["meta"]["planes"]["sag"]["shape"] == [1, 16, 16]     # single-slice series
    assert ankle["meta"]["planes"]["sag"]["spacing"][0] == 4.0
    np.testing.assert_allclose(ankle["sag"], export["single"]["volume"])  # bare dataset decoded
    assert "cor" not in ankle  # its only cor series lost a truncated slice -> irregular gaps
    assert ankle["meta"]["vendor"] == "GE" and ankle["meta"]["field_strength"] == 1.5
    assert ankle["labels"]["atfl"] == 1 and ankle["labels"]["cfl"] is None  # joined by StudyInstanceUID


def test_report_entries(ingested):
    report = ingested["report"]
    counts = report["counts"]
    assert counts["studies_found"] == 3 and counts["studies_ingested"] == 3
    by_code = counts["skipped_by_code"]
    assert by_code["not_dicom"] == 1 and by_code["dicomdir"] == 1 and by_code["not_image"] == 2
    assert by_code["size_mismatch"] == 1 and by_code["duplicate"] == 1 and by_code["truncated"] == 2
    assert by_code["missing_geometry"] == 1 and by_code["needs_decoder"] == 1
    assert by_code["study_needs_decoder"] == 1 and by_code["bad_geometry"] == 3
    assert by_code["decode_error"] == 1
    paths = {e["path"]: e for e in report["skipped"]}
    assert "Enhanced SR" in paths["DOE_JOHN_export/A/SR0001"]["reason"]
    assert "IMNOORI" in next(p for p, e in paths.items() if e["code"] == "missing_geometry")
    needs = next(e for e in report["skipped"] if e["code"] == "needs_decoder")
    assert "MPEG2" in needs["reason"] and "no pixel decoder" in needs["reason"]
    assert any("positions win" in w["message"] for w in report["warnings"])
    localizer = [w for w in report["warnings"] if "LOCALIZER" in w["message"]]
    assert sorted(w["message"][:3] for w in localizer) == ["ax ", "cor", "sag"]
    labels = {p["code"]: p for p in report["tables"]["labels"]["problems"]}
    assert "atfl" not in str(labels) and len(labels["study_without_row"]["studies"]) == 1  # shoulder


def test_no_phi_in_shards(export, ingested):
    files = [p for p in ingested["out"].rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in files) and any(p.suffix == ".tar" for p in files)
    needles = PHI_STRINGS + ["DOE_JOHN", SALT] + export["uids"] + \
        [export["sag"]["series_uid"], export["ax"]["series_uid"]]
    for path in files:
        blob = path.read_bytes()
        for needle in needles:
            for variant in {needle, needle.lower(), needle.title()}:
                assert variant.encode() not in blob, f"{needle!r} found in {path.name}"
    assert (ingested["run"] / "ingest_report.json").exists()
    assert not (ingested["out"] / "ingest_report.json").exists()
    for path in ingested["run"].rglob("*"):  # the salt is in no log, report or config either
        assert not path.is_file() or SALT.encode() not in path.read_bytes()
    assert verify_shards(load_manifest(ingested["out"])) == []


def test_keys_stable_and_salted(export, ingested, tmp_path, monkeypatch):
    samples = ingested["samples"]
    knee, ankle = _by_body(samples, "knee"), _by_body(samples, "ankle")
    assert knee["meta"]["patient"] == ankle["meta"]["patient"]  # same PatientID, same key
    assert knee["meta"]["split"] == ankle["meta"]["split"]
    shoulder = _by_body(samples, "shoulder")
    assert shoulder["meta"]["patient"] != knee["meta"]["patient"]
    # date shift: one offset per patient; never the true date
    assert knee["meta"]["study_date"] != "2020-01-14" and knee["meta"]["study_date"] == ankle["meta"]["study_date"]
    monkeypatch.setenv("MSKFM_DEID_SALT", "another-salt-99")
    cfg = load_config(DicomIngestConfig, None, [f"source={export['root'] / 'p2'}", f"out={tmp_path / 'o'}",
                                                f"run_dir={tmp_path / 'r'}"])
    assert ingest_dicom(cfg) == 0
    other = {s["meta"]["joint"]: s["__key__"] for s in read_all(tmp_path / "o")}
    assert other["shoulder"] != shoulder["__key__"]
    monkeypatch.setenv("MSKFM_DEID_SALT", SALT)
    cfg = load_config(DicomIngestConfig, None, [f"source={export['root'] / 'p2'}", f"out={tmp_path / 'o2'}",
                                                f"run_dir={tmp_path / 'r2'}"])
    assert ingest_dicom(cfg) == 0
    again = [s["__key__"] for s in read_all(tmp_path / "o2")]
    assert again == [shoulder["__key__"]]


def test_resume_skips_done_studies(export, ingested, monkeypatch):
    monkeypatch.setenv("MSKFM_DEID_SALT", SALT)

    def no_decoding(stack):
        raise AssertionError("a finished study was decoded again")
    monkeypatch.setattr(dicom_mod, "decode", no_decoding)
    before = load_manifest(ingested["out"])
    run2 = ingested["run"] / "again"
    run = ingested["run"]  # the same settings as the first ingest (other ones are refused)
    code = ingest_main(["dicom", str(export["root"]), "--out", str(ingested["out"]), f"run_dir={run2}",
                        "--config", str(Path(__file__).parents[1] / "configs/shards/ingest-dicom.yaml"),
                        "deid.dates=shift", "shard_max_count=2", f"labels.path={run / 'labels.csv'}",
                        f"ehr.path={run / 'ehr.csv'}"])
    report = json.loads((run2 / "ingest_report.json").read_text())
    assert code == 0 and report["counts"]["studies_resumed"] == 3 and report["counts"]["studies_ingested"] == 0
    after = load_manifest(ingested["out"])
    assert [s["sha256"] for s in after["shards"]] == [s["sha256"] for s in before["shards"]]


def test_strict_empty_and_missing_salt(tmp_path, monkeypatch, export):
    monkeypatch.setenv("MSKFM_DEID_SALT", SALT)
    (tmp_path / "empty").mkdir()
    code = ingest_main(["dicom", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), f"run_dir={tmp_path / 'r'}"])
    report = json.loads((tmp_path / "r" / "ingest_report.json").read_text())
    assert code == 1 and report["skipped"][0]["code"] == "empty" and not (tmp_path / "o").exists()
    code = ingest_main(["dicom", str(export["root"] / "p2"), "--out", str(tmp_path / "o3"),
                        f"run_dir={tmp_path / 'r3'}", "strict=true"])
    assert code == 1  # something usable came out, but strict and files were skipped
    monkeypatch.delenv("MSKFM_DEID_SALT")
    assert ingest_main(["dicom", str(export["root"]), "--out", str(tmp_path / "o4")]) == 2


def test_decoder_problem_names_package():
    assert decoder_problem(UID(ExplicitVRLittleEndian)) is None
    assert decoder_problem(UID(RLELossless)) is None
    for syntax in (JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless):  # the pinned plugins decode them
        assert decoder_problem(UID(syntax)) is None, syntax.name
    assert "has no pixel decoder in pydicom" in decoder_problem(UID(MPEG2MPML))


def _bits(value: int, n: int) -> str:
    return format(value, f"0{n}b") if n else ""


def jpeg_lossless_sv1(image: np.ndarray) -> bytes:
    """A JPEG Lossless (process 14, selection value 1) codestream of a 16-bit image (ITU T.81 annex H):
    pydicom has no encoder for this transfer syntax, so the test writes one as a PACS would."""
    rows, cols = image.shape
    img = image.astype(np.int64)
    bits = []
    for r in range(rows):
        for c in range(cols):
            pred = 1 << 15 if r == c == 0 else img[r, c - 1] if r == 0 or c > 0 else img[r - 1, c]
            diff = int(img[r, c] - pred) % 65536
            diff = diff - 65536 if diff >= 32768 else diff
            ssss = abs(diff).bit_length()
            extra = "" if ssss in (0, 16) else _bits(diff if diff > 0 else diff + (1 << ssss) - 1, ssss)
            bits.append(_bits(ssss, 5) + extra)  # Huffman table: every category a 5-bit code
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    data = bytes(int(stream[i:i + 8], 2) for i in range(0, len(stream), 8)).replace(b"\xff", b"\xff\x00")
    dht = bytes([0x00] + [0] * 4 + [17] + [0] * 11 + list(range(17)))
    sof = bytes([16]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # one component, table 0, predictor 1, Se 0, point transform 0

    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body

    return b"\xff\xd8" + segment(0xC4, dht) + segment(0xC3, sof) + segment(0xDA, sos) + data + b"\xff\xd9"


def test_compressed_exports_decode(tmp_path, monkeypatch):
    """Clinical exports are often JPEG Lossless, JPEG-LS or JPEG 2000: each series decodes bit-exactly."""
    monkeypatch.setenv("MSKFM_DEID_SALT", SALT)
    rng = np.random.default_rng(7)
    expected = {}
    for body, syntax in (("KNEE", JPEGLosslessSV1), ("ANKLE", JPEGLSLossless), ("SHOULDER", JPEG2000Lossless)):
        study, series = generate_uid(), generate_uid()
        folder = tmp_path / "src" / body
        folder.mkdir(parents=True)
        raw = rng.integers(0, 4000, size=(4, 32, 32)).astype(np.uint16)  # OpenJPEG's default needs >= 32
        raw[0, 0, :4] = [0, 65535, 0, 65535]  # the largest differences (category 16)
        for i in range(4):
            ds = _base({"PatientID": f"P{body}"}, study, series, "SAG PD FS", "SIEMENS", 3.0, body)
            ds.SeriesNumber, ds.InstanceNumber, ds.ImageType = 1, i + 1, ["ORIGINAL", "PRIMARY", "M"]
            ds.ImageOrientationPatient, ds.PixelSpacing, ds.SliceThickness = SAG, [0.5, 0.5], 3.0
            ds.Rows = ds.Columns = 32
            ds.ImagePositionPatient = [-3.0 * i, 0.0, 0.0]  # along the normal (-x) of SAG
            if syntax == JPEGLosslessSV1:
                ds.PixelData = pydicom.encaps.encapsulate([jpeg_lossless_sv1(raw[i])])
                ds["PixelData"].VR = "OB"
                ds.file_meta.TransferSyntaxUID = syntax
            else:
                ds.PixelData = raw[i].tobytes()
                ds.compress(syntax)
            assert ds.file_meta.TransferSyntaxUID == syntax
            ds.save_as(folder / f"IM{i}", enforce_file_format=True)
        expected[body.lower()] = raw.astype(np.float64)
    code = ingest_main(["dicom", str(tmp_path / "src"), "--out", str(tmp_path / "out"), f"run_dir={tmp_path / 'run'}"])
    report = json.loads((tmp_path / "run" / "ingest_report.json").read_text())
    assert code == 0 and report["counts"]["skipped"] == 0, report["skipped"]
    samples = {s["meta"]["joint"]: s for s in read_all(tmp_path / "out", ("meta", "sag"))}
    assert set(samples) == set(expected)
    for joint, raw in expected.items():
        np.testing.assert_array_equal(samples[joint]["sag"], raw, err_msg=joint)


def test_deidentify_header():
    pseudo = Pseudonymizer(b"0123456789abcdef")
    ds = _base({}, "1.2.3.4", "1.2.3.5", "SAG PD DOE 19450307 MRN12345678", "SIEMENS", 3.0, "KNEE")
    ds.StudyTime = "101500"
    study_uid, sop = ds.StudyInstanceUID, ds.SOPInstanceUID
    deidentify(ds, DeidConfig(dates="year"), pseudo)
    assert ds.PatientName == "" and ds.PatientBirthDate == "" and ds.StudyTime == ""
    for kw in ("InstitutionName", "InstitutionAddress", "StationName", "DeviceSerialNumber",
               "OtherPatientIDs", "PatientAddress"):
        assert kw not in ds, kw
    assert not any(elem.tag.is_private for elem in ds)
    assert ds.StudyInstanceUID.startswith("2.25.") and len(ds.StudyInstanceUID) <= 64
    assert ds.StudyInstanceUID != study_uid and ds.SOPInstanceUID != sop
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.StudyInstanceUID == pseudo.uid(study_uid)  # stable: same salt, same UID
    assert ds.PatientID == pseudo.ident("patient", PHI["PatientID"]) and ds.StudyDate == "20200101"
    assert ds.SeriesDescription == "SAG PD" and ds.PatientIdentityRemoved == "YES"
    assert ds.PatientAge == "045Y" and ds.Manufacturer == "SIEMENS"
    assert screen_text("AX T2 12/03/1999 JOHN doe", {"DOE", "JOHN"}) == "AX T2"


def test_contrast_and_choice_rule():
    assert contrast_from_text("SAG PD FS") == "PD_FS" and contrast_from_text("COR T2 FSE") == "T2"
    assert contrast_from_text("AX T2* MEDIC") == "GRE" and contrast_from_text("STIR COR") == "STIR"
    assert contrast_from_parameters(3000, 30, None) == "PD" and contrast_from_parameters(500, 10, None) == "T1"
    assert contrast_from_parameters(4000, 80, None, "SE", "FS") == "T2_FS"
    assert contrast_from_parameters(5000, 40, 150, "IR") == "STIR"
    cands = [Candidate("sag", "T1", 20, 0.0, 0.5, 1, "a"),
             Candidate("sag", "PD_FS", 18, 0.0, 0.5, 2, "b"),
             Candidate("sag", "PD_FS", 18, 25.0, 0.5, 3, "c"),
             Candidate("sag", "PD_FS", 30, 0.0, 0.5, 4, "d", derived=True),
             Candidate("ax", "GRE", 3, 0.0, 1.0, 5, "loc", description="3-PLANE LOC"),
             Candidate("cor", "T2", 20, 45.0, 0.5, 6, "tilted")]
    ranked, rejected = choose(cands, ChoiceConfig())
    assert {p: [c.ident for c in cs] for p, cs in ranked.items()} == {"sag": ["b", "c", "a", "d"]}
    reasons = {c.ident: why for c, why in rejected}
    assert "exclude" in reasons["loc"] and "obliquity" in reasons["tilted"]
    ranked, _ = choose(cands, ChoiceConfig(contrast_order=["T1"], prefer_original=False))
    assert ranked["sag"][0].ident == "a"


def test_crash_then_resume(export, tmp_path, monkeypatch):
    monkeypatch.setenv("MSKFM_DEID_SALT", SALT)
    real_decode, calls = dicom_mod.decode, []

    def crashing(stack):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # the process dies mid-study
        return real_decode(stack)
    monkeypatch.setattr(dicom_mod, "decode", crashing)
    argv = ["dicom", str(export["root"]), "--out", str(tmp_path / "o"), "shard_max_count=1"]
    with pytest.raises(KeyboardInterrupt):
        ingest_main(argv + [f"run_dir={tmp_path / 'r1'}"])
    assert not list((tmp_path / "o").glob("*.tmp")) and not (tmp_path / "o" / "manifest.json").exists()
    monkeypatch.setattr(dicom_mod, "decode", real_decode)
    assert ingest_main(argv + [f"run_dir={tmp_path / 'r2'}"]) == 0
    counts = json.loads((tmp_path / "r2" / "ingest_report.json").read_text())["counts"]
    assert counts["studies_resumed"] >= 1 and counts["studies_resumed"] + counts["studies_ingested"] == 3
    manifest = load_manifest(tmp_path / "o")
    assert manifest["stats"]["n_samples"] == 3 and verify_shards(manifest) == []


def test_salt_sources(tmp_path, monkeypatch):
    from shards.ingest.deid import DeidError, load_salt

    (tmp_path / "salt").write_text("file-salt-123\n")
    monkeypatch.setenv("MSKFM_DEID_SALT", "env-salt-456")
    assert load_salt(DeidConfig(salt_file=str(tmp_path / "salt"))) == b"file-salt-123"  # file wins
    assert load_salt(DeidConfig()) == b"env-salt-456"
    monkeypatch.setenv("OTHER_SALT", "short")
    with pytest.raises(DeidError, match="OTHER_SALT"):
        load_salt(DeidConfig(salt_env="OTHER_SALT"))
    with pytest.raises(DeidError, match="does not exist"):
        load_salt(DeidConfig(salt_file=str(tmp_path / "missing")))
