"""Privacy (issue 15, items 1-4): PHI planted in headers, free text, file names, tables and configs
must not reach shards, manifests or published backbones; ``shards scan-phi`` finds it when it does."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from shards.cli import main as shards_main
from shards.ingest.cli import main as ingest_main
from shards.manifest import load_manifest
from shards.reader import iter_samples
from shards.writer import ShardWriter
from tests.recon_data import write_fastmri_file
from tests.test_ingest_dicom import AX, COR, SAG, write_series

SALT = "privacy-test-salt"
PATIENT = {"PatientName": "ROE^JANE", "PatientID": "PRIV-55443322", "PatientBirthDate": "19450307"}
# Free text with what header screening alone used to miss: a name that is in no name field, phone
# numbers, dates written in other formats
DESCRIPTION = "SAG PD FS per Dr. Smithers call 555-867-5309 on March 7, 1945"
STUDY_TEXT = "MRI KNEE 3/7/45 ask Dr Watsonia (0161) 496-0000"
COMMENTS = "pt JANE ROE tel +44 20 7946 0018 dob 07.03.1945"
EVENT = "slipped outside 12 Juniper Close, phone 0161 496 0000 on 7-Mar-2021"
PLANTED = ["Smithers", "867-5309", "5558675309", "March 7", "3/7/45", "Watsonia", "496-0000", "7946 0018",
           "07.03.1945", "Juniper", "0161 496", "7-Mar-2021", "Acme Imaging", "ROE_JANE", "PRIV-55443322",
           "19450307", SALT]


def _rewrite(folder: Path, **attrs) -> None:
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        for key, value in attrs.items():
            setattr(ds, key, value)
        if "SOPClassUID" in attrs:
            ds.file_meta.MediaStorageSOPClassUID = attrs["SOPClassUID"]
        ds.save_as(path)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """One knee study (sag PD FS is the only usable series) and four image series that show text."""
    root = tmp_path_factory.mktemp("privacy-export")
    base = root / "ROE_JANE_export"
    rng = np.random.default_rng(1)
    study = generate_uid()
    write_series(base / "sag", PATIENT, study, SAG, 4, 3.0, DESCRIPTION, rng, vendor="Acme Imaging Works",
                 body="LEFT KNEE ROE")
    _rewrite(base / "sag", StudyDescription=STUDY_TEXT, ImageComments=COMMENTS)
    write_series(base / "burned", PATIENT, study, COR, 3, 3.0, "COR PD", rng, series_number=2)
    _rewrite(base / "burned", BurnedInAnnotation="YES")
    write_series(base / "sc", PATIENT, study, AX, 2, 3.0, "AX T2", rng, series_number=3)
    _rewrite(base / "sc", SOPClassUID=SecondaryCaptureImageStorage)
    write_series(base / "shot", PATIENT, study, AX, 2, 3.0, "AX PD", rng, series_number=4,
                 image_type=("DERIVED", "PRIMARY", "SCREEN SHOT"))
    write_series(base / "secondary", PATIENT, study, COR, 2, 3.0, "COR T1", rng, series_number=5,
                 image_type=("DERIVED", "SECONDARY"))
    (root / "ehr.csv").write_text(f'patient_id,patient_type,injury_event\n{PATIENT["PatientID"]},inpatient,"{EVENT}"\n')
    return root


def _ingest(export: Path, tmp: Path, *extra: str) -> tuple[int, Path, dict]:
    out, run = tmp / "shards", tmp / "run"
    code = ingest_main(["dicom", str(export / "ROE_JANE_export"), "--out", str(out), f"run_dir={run}",
                        f"ehr.path={export / 'ehr.csv'}", *extra])
    return code, out, json.loads((run / "ingest_report.json").read_text())


def _all_bytes(folder: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def _assert_absent(blob: bytes, needles) -> None:
    for needle in needles:
        for variant in {needle, needle.lower(), needle.upper()}:
            assert variant.encode() not in blob, f"{needle!r} reached the shards"


@pytest.fixture(scope="module")
def default_ingest(export, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MSKFM_DEID_SALT", SALT)
    try:
        yield _ingest(export, tmp_path_factory.mktemp("default"))
    finally:
        mp.undo()


def test_images_that_may_show_text_are_refused(default_ingest):
    code, out, report = default_ingest
    assert code == 0
    by_code = report["counts"]["skipped_by_code"]
    assert by_code == {"burned_in": 3, "secondary_capture": 4, "screen_capture": 2}
    reasons = {e["path"].split("/")[0]: e["reason"] for e in report["skipped"]}
    assert "BurnedInAnnotation" in reasons["burned"] and "Secondary Capture" in reasons["sc"]
    assert "SCREEN SHOT" in reasons["shot"] and "SECONDARY" in reasons["secondary"]
    [sample] = [s for split in load_manifest(out)["splits"] for s in iter_samples(out, split, fields=("meta",), require=())]
    assert set(sample["meta"]["planes"]) == {"sag"}  # none of the refused series became a plane


def test_only_closed_vocabulary_by_default(default_ingest):
    code, out, report = default_ingest
    [sample] = [s for split in load_manifest(out)["splits"]
                for s in iter_samples(out, split, fields=("meta", "ehr"), require=())]
    meta = sample["meta"]
    assert meta["vendor"] == "OTHER" and meta["body_part"] == "knee" and meta["joint"] == "knee"
    assert meta["planes"]["sag"]["contrast"] == "PD_FS" and "description" not in meta["planes"]["sag"]
    assert "manufacturer" not in meta and "body_part_text" not in meta
    assert sample["ehr"]["patient_type"] == "inpatient" and "injury_event" not in sample["ehr"]
    problems = report["tables"]["ehr"]["problems"]
    assert [p["column"] for p in problems if p["code"] == "free_text"] == ["injury_event"]
    assert "Juniper" not in json.dumps(report["tables"])  # the report names the row, not the text
    _assert_absent(_all_bytes(out), PLANTED)
    scan = report["phi_scan"]
    assert scan["n_hits"] == 0 and report["counts"]["phi_hits"] == 0
    assert scan["needles_by_kind"]["name"] > 0 and scan["needles_by_kind"]["phone"] >= 4
    assert scan["needles_by_kind"]["date"] > 20 and scan["members"] >= 2


def test_free_text_only_when_opted_in_and_screened(export, tmp_path, monkeypatch):
    monkeypatch.setenv("MSKFM_DEID_SALT", SALT)
    code, out, report = _ingest(export, tmp_path, "deid.keep_free_text=true")
    assert code == 0 and report["phi_scan"]["n_hits"] == 0 and report["phi_scan"]["skipped_kinds"] == ["free_text"]
    [sample] = [s for split in load_manifest(out)["splits"]
                for s in iter_samples(out, split, fields=("meta", "ehr"), require=())]
    description = sample["meta"]["planes"]["sag"]["description"]
    assert description.startswith("SAG PD FS") and sample["meta"]["manufacturer"] == "Acme Imaging Works"
    assert sample["meta"]["body_part_text"] == "left knee"       # the patient's name screened out
    assert sample["ehr"]["injury_event"].startswith("slipped outside")
    # titled names, phone numbers and dates are screened out; an address written in free text is not
    # (no header field names it): the reason free text stays out by default
    assert "juniper close" in sample["ehr"]["injury_event"]
    _assert_absent(_all_bytes(out), [p for p in PLANTED if p not in ("Acme Imaging", "Juniper")])


def test_scan_phi_reports_planted_values_by_shard_and_member(export, default_ingest, tmp_path, capsys):
    _, out, _ = default_ingest
    source = str(export / "ROE_JANE_export")
    assert shards_main(["scan-phi", str(out), "--source", source, "--table", str(export / "ehr.csv")]) == 0
    assert "no PHI found" in capsys.readouterr().out
    leaky = tmp_path / "leaky"
    with ShardWriter(leaky, kind="study", info={"name": "leaky", "input": "sag/IM0003"}) as writer:
        writer.write({"__key__": "s-0001", "meta": {"joint": "knee", "patient": "p-1", "planes": {},
                                                     "note": "seen by dr. smithers", "dob": "1945-03-07"},
                      "extra": np.frombuffer(b"\x00\x01PRIV-55443322\x00\x02", dtype=np.uint8)}, "train")
    report = tmp_path / "scan.json"
    code = shards_main(["scan-phi", str(leaky), "--source", source, "--table", str(export / "ehr.csv"),
                        "--json", str(report)])
    printed = capsys.readouterr().out
    assert code == 1 and "PHI FOUND" in printed
    hits = {(h["file"], h["member"], h["kind"]) for h in json.loads(report.read_text())["hits"]}
    assert ("train-000000.tar", "s-0001.meta.json", "name") in hits      # "Dr. Smithers" in free text
    assert ("train-000000.tar", "s-0001.meta.json", "date") in hits      # March 7, 1945 in ISO form
    assert ("train-000000.tar", "s-0001.extra.npy", "id") in hits        # PatientID inside array bytes
    assert ("manifest.json", None, "file_name") in hits                  # a source file name
    _assert_absent(printed.encode() + report.read_bytes(), ["Smithers", "1945-03-07", "PRIV-55443322", "IM0003"])
    assert shards_main(["scan-phi", str(leaky)]) == 2  # nothing to gather from: a usage error


def _fastmri_with_phi(path: Path, seed: int, patient: str) -> None:
    write_fastmri_file(path, slices=2, coils=2, grid=(24, 16), recon=(16, 16), seed=seed)
    import h5py

    with h5py.File(path, "a") as f:
        header = f["ismrmrd_header"][()].decode()
        subject = ("<subjectInformation><patientName>ROE^JANE</patientName><patientID>" + patient
                   + "</patientID><patientBirthdate>1945-03-07</patientBirthdate></subjectInformation>"
                   "<acquisitionSystemInformation><institutionName>Saint Juniper Clinic</institutionName>"
                   "</acquisitionSystemInformation>")
        del f["ismrmrd_header"]
        f["ismrmrd_header"] = header.replace("<encoding>", subject + "<encoding>", 1).encode()
        f.attrs["patient_id"] = patient


def test_fastmri_ingest_deidentifies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "ROE_JANE_scans"
    src.mkdir()
    _fastmri_with_phi(src / "file_knee_roejane_0042.h5", 0, "PRIV-55443322")
    _fastmri_with_phi(src / "file_knee_roejane_0043.h5", 3, "PRIV-55443322")
    monkeypatch.setenv("MSKFM_DEID_SALT", SALT)
    assert shards_main(["ingest", "fastmri", str(src), "--out", "fm"]) == 0
    blob = _all_bytes(tmp_path / "fm")
    _assert_absent(blob, ["roejane", "file_knee", "ROE_JANE", str(src), str(tmp_path), "PRIV-55443322",
                          "Juniper", "1945-03-07", "ROE^JANE", SALT])
    manifest = load_manifest(tmp_path / "fm")
    assert "input" not in manifest and manifest["ingest_config"]["deid"]["salt_env"] == "MSKFM_DEID_SALT"
    samples = list(iter_samples(str(tmp_path / "fm"), None, ("meta",), require=()))
    assert len(samples) == 4 and all("file" not in s["meta"] for s in samples)
    assert {s["meta"]["patient"] for s in samples} == {samples[0]["meta"]["patient"]}  # one patient, salted
    assert len({s["meta"]["study"] for s in samples}) == 2 and samples[0]["meta"]["study"].startswith("s-")
    report = json.loads((tmp_path / "runs" / "ingest" / "fm" / "ingest_report.json").read_text())
    assert report["phi_scan"]["n_hits"] == 0 and report["phi_scan"]["needles_by_kind"]["file_name"] == 2  # the two stems
    # a resume with another salt or other split fractions would mix two key spaces or splits: refused
    assert shards_main(["ingest", "fastmri", str(src), "--out", "fm", "splits.train=0.5", "splits.val=0.5"]) == 2
    monkeypatch.setenv("MSKFM_DEID_SALT", "another-salt-77")
    assert shards_main(["ingest", "fastmri", str(src), "--out", "fm"]) == 2
    assert len(list(iter_samples(str(tmp_path / "fm"), None, ("meta",), require=()))) == 4  # nothing lost
    assert shards_main(["ingest", "fastmri", str(src), "--out", "fm2"]) == 0
    other = {s["__key__"] for s in iter_samples(str(tmp_path / "fm2"), None, ("meta",), require=())}
    assert other.isdisjoint({s["__key__"] for s in samples})  # another salt, other keys
    monkeypatch.delenv("MSKFM_DEID_SALT")
    assert shards_main(["ingest", "fastmri", str(src), "--out", "fm3"]) == 2  # no salt: refused


def _publish_inputs(tmp_path: Path, monkeypatch, kind: str) -> tuple[dict, dict]:
    home = tmp_path / "home" / "alicew"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USER", "alicew")
    with ShardWriter(home / "data" / "shards-knee", kind=kind, info={"name": "knee", "source": "dicom"}) as w:
        w.write({"__key__": "s-1", "meta": {"joint": "knee", "patient": "p-1", "planes": {}}}, "train")
    manifest = load_manifest(str(home / "data" / "shards-knee"))
    train_config = {"data": {"source": str(home / "data" / "shards-knee")}, "storage_path": "file:///scratch/alicew/ckpt",
                    "run_root": "runs/pretrain", "hub": "s3://alicew:s3cr3t@bucket/backbones",
                    "note": "launched by alicew from ~/mskfm", "windows": "C:\\Users\\alicew\\runs"}
    return train_config, manifest


def _published_text(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file() and p.suffix != ".safetensors")


@pytest.mark.parametrize("kind", ["diffusion", "recon"])
def test_published_backbones_carry_no_paths_or_user_names(kind, tmp_path, monkeypatch):
    import torch

    train_config, manifest = _publish_inputs(tmp_path, monkeypatch, "recon" if kind == "recon" else "study")
    metrics = {"steps": 3, "final_loss": 0.5, "weights": "ema", "run": "tiny"}
    out = tmp_path / "hub" / kind
    torch.manual_seed(0)
    if kind == "diffusion":
        from pretrain.models import DiffusionBackbone
        from pretrain.publish import publish_backbone

        model = DiffusionBackbone(channels=(4, 8), attention_levels=(False, False), num_res_blocks=1,
                                  num_head_channels=8, norm_num_groups=4, plane="sag")
        publish_backbone(model, model.make_scheduler(), str(out), train_config, manifest, metrics)
    else:
        from pretrain.models import BACKBONES
        from pretrain.recon.publish import publish_recon_backbone

        publish_recon_backbone(BACKBONES["unet-recon"](chans=4, pools=2), str(out), train_config, manifest, metrics)
    text = _published_text(out)
    for needle in (str(tmp_path), "alicew", "s3cr3t", "/scratch", "Users"):
        assert needle not in text, needle
    published = (out / "training_config.yaml").read_text()
    assert "<local>/shards-knee" in published and "s3://bucket/backbones" in published
    assert "runs/pretrain" in published and "<user>" in published


def test_scan_phi_reads_sidecars_and_nifti_headers(tmp_path):
    import nibabel as nib

    from shards.phi_scan import scan_phi

    src = tmp_path / "nifti_export" / "sub-01"
    src.mkdir(parents=True)
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    img.header["descrip"] = b"seen by Dr Smithers 07.03.1945"
    nib.save(img, src / "sag_pd.nii.gz")
    (src / "sag_pd.json").write_text(json.dumps({"InstitutionName": "Saint Juniper Clinic", "EchoTime": 0.03,
                                                 "AcquisitionDateTime": "2021-03-07T10:00:00"}))
    clean, leaky = tmp_path / "clean", tmp_path / "leaky"
    for folder, note in ((clean, "sag pd fs"), (leaky, "saint juniper clinic, smithers, 07/03/2021")):
        with ShardWriter(folder, kind="study", info={"name": folder.name}) as writer:
            writer.write({"__key__": "s-1", "meta": {"joint": "knee", "patient": "p-1", "planes": {},
                                                     "note": note, "echo": 0.03}}, "train")
    assert scan_phi(clean, tmp_path / "nifti_export")["n_hits"] == 0
    result = scan_phi(leaky, tmp_path / "nifti_export")
    assert result["source_files"]["nifti"] == 1 and result["source_files"]["sidecars"] == 1
    assert {(h["kind"], h["field"]) for h in result["hits"]} == {
        ("place", "InstitutionName"), ("name", "descrip"), ("date", "AcquisitionDateTime")}


def test_scan_phi_does_not_flag_what_the_platform_generates(tmp_path):
    """Zero-padded source numbers vs shard names, and a (shifted) study_date equal to another
    study's real date, are not hits; the same values elsewhere are."""
    from shards.phi_scan import scan_phi

    (tmp_path / "src").mkdir()
    today = time.strftime("%Y-%m-%d", time.gmtime())  # the manifest's "created" day
    (tmp_path / "src" / "tables.csv").write_text(f"accession,visit,seen\n000001,2020-01-14,{today}\n")
    for name, extra in (("ok", {}), ("leak", {"note": "acc 000001 on 2020-01-14"})):
        with ShardWriter(tmp_path / name, kind="study", max_count=1, info={"name": name}) as writer:
            for i in range(2):
                writer.write({"__key__": f"s-{i}", "meta": {"joint": "knee", "patient": f"p-{i}", "planes": {},
                                                             "study_date": "2020-01-14", **extra}}, "train")
    assert "train-000001.tar" in (tmp_path / "ok" / "manifest.json").read_text()
    assert scan_phi(tmp_path / "ok", tmp_path / "src")["n_hits"] == 0
    assert {h["kind"] for h in scan_phi(tmp_path / "leak", tmp_path / "src")["hits"]} == {"table"}


def test_a_scan_that_cannot_run_fails_the_ingest_but_keeps_the_report(export, tmp_path, monkeypatch):
    import shards.phi_scan

    def broken(*args, **kwargs):
        raise OSError("disk gone")
    monkeypatch.setenv("MSKFM_DEID_SALT", SALT)
    monkeypatch.setattr(shards.phi_scan, "scan_phi", broken)
    code, out, report = _ingest(export, tmp_path)
    assert code == 1 and report["phi_scan"]["error"] == "OSError: disk gone"
    assert report["counts"]["studies_ingested"] == 1 and (out / "manifest.json").is_file()
