"""Label (CSV) and EHR (Parquet) tables joined to ingested studies on keyed hashes, with the
validation report: header typos, duplicate keys, values out of range, rows without studies,
studies without rows."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from shards.ingest.cli import main as ingest_main
from shards.manifest import load_manifest
from shards.reader import iter_samples

SALT = "tables-test-salt"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tables_src")
    rng = np.random.default_rng(2)
    for patient, study in (("MRN001", "S1"), ("MRN001", "S2"), ("MRN002", "S3")):
        (root / patient / study).mkdir(parents=True)
        nib.save(nib.Nifti1Image(rng.random((4, 8, 8)).astype(np.float32), np.diag([3.0, 0.5, 0.5, 1])),
                 root / patient / study / "sag_pd.nii.gz")
    return root


def _run(source: Path, tmp: Path, *overrides: str) -> tuple[int, dict, dict]:
    mp = pytest.MonkeyPatch()
    mp.setenv("MSKFM_DEID_SALT", SALT)
    try:
        code = ingest_main(["nifti", str(source), "--out", str(tmp / "out"), "joint=knee",
                            f"run_dir={tmp / 'run'}", *overrides])
    finally:
        mp.undo()
    report = json.loads((tmp / "run" / "ingest_report.json").read_text())
    splits = load_manifest(tmp / "out")["splits"]
    samples = [s for sp in splits for s in iter_samples(tmp / "out", sp, fields=("meta", "labels", "ehr"),
                                                        require=())]
    return code, report, samples


def _problems(report: dict, kind: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in report["tables"][kind]["problems"]:
        out.setdefault(p["code"], []).append(p)
    return out


def test_labels_and_ehr_join(source, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("study,acl,pcl,aclx,medial_meniscus\n"
                      "MRN001/S1,1,0,1,\n"
                      "MRN001/S2,0,2,0,1\n"
                      "MRN001/S2,1,1,1,1\n"
                      "MRN001/S9,1,1,1,1\n")
    ehr = tmp_path / "ehr.parquet"
    pd.DataFrame({"patient": ["MRN001", "MRN002"], "age": [95.0, 30.0], "sex": ["female", "M"],
                  "weight_kg": [900.0, 70.0], "bmi": [22.0, 23.0]}).to_parquet(ehr)
    code, report, samples = _run(source, tmp_path, f"labels.path={labels}", "labels.key_column=study",
                                 f"ehr.path={ehr}", "ehr.key_column=patient", "ehr.key_kind=patient")
    assert code == 0 and len(samples) == 3
    by_labels = sorted((s["labels"]["acl"] is None, s["labels"]["acl"], s["labels"]["pcl"],
                        s["labels"]["medial_meniscus"]) for s in samples)
    # S1: acl 1 pcl 0 meniscus unknown; S2 (first row wins): acl 0, pcl 2 out of range -> None; S3: no row
    assert by_labels == [(False, 0, None, 1), (False, 1, 0, None), (True, None, None, None)]
    assert all(set(s["labels"]) == {"acl", "pcl", "medial_meniscus", "lateral_meniscus", "mcl", "lcl",
                                    "cartilage_bml", "effusion"} for s in samples)
    lab = _problems(report, "labels")
    assert "did you mean 'acl'" in lab["unknown_column"][0]["message"]
    assert lab["duplicate_key"][0]["row"] == 3 and lab["out_of_range"][0]["row"] == 2
    assert lab["row_without_study"][0]["rows"] == [4]
    assert len(lab["study_without_row"][0]["studies"]) == 1
    ages = sorted((s["ehr"]["age"], s["ehr"]["sex"], s["ehr"].get("weight_kg")) for s in samples)
    assert ages == [(30.0, "M", 70.0), (90.0, "F", None), (90.0, "F", None)]  # age capped at 90
    ehr_problems = _problems(report, "ehr")
    assert ehr_problems["out_of_range"][0]["column"] == "weight_kg"
    # without a declaration, a numeric column the generator does not know is inferred (for the user to confirm)
    assert report["dataset"]["source"] == "inferred" and report["dataset"]["declaration"]["ehr"]["bmi"] == {
        "type": "numeric", "unit": "", "range": [], "values": [], "description": ""}
    assert "unknown_column" not in ehr_problems and {s["ehr"]["bmi"] for s in samples} == {22.0, 23.0}
    patients = {s["meta"]["patient"] for s in samples}
    assert len(patients) == 2  # two studies of MRN001 share one patient key
    blob = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert b"MRN001" not in blob and b"S9" not in blob and b"labels.csv" in blob  # file name only


def test_key_column_typo(source, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("studdy,acl\nMRN001/S1,1\n")
    code, report, samples = _run(source, tmp_path, f"labels.path={labels}", "labels.key_column=study")
    problem = report["tables"]["labels"]["problems"][0]
    assert problem["code"] == "missing_key_column" and "did you mean 'studdy'" in problem["message"]
    assert code == 0 and all(v is None for s in samples for v in s["labels"].values())
    strict, _, _ = _run(source, tmp_path / "strict", f"labels.path={labels}", "labels.key_column=study",
                        "strict=true")
    assert strict == 1
