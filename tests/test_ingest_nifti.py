"""NIfTI ingest: plane, obliquity and spacing from the affine, DICOM-like slice layout, label maps,
NaN volumes and bad label maps reported per file, no file names in the shards."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from shards.ingest.cli import main as ingest_main
from shards.manifest import load_manifest
from shards.reader import iter_samples

SALT = "nifti-test-salt"


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)


def rot_x(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def read_all(out: Path, fields) -> dict:
    splits = load_manifest(out)["splits"]
    return {s["__key__"]: s for sp in splits for s in iter_samples(out, sp, fields=fields, require=())}


@pytest.fixture(scope="module")
def nifti_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("nifti")
    rng = np.random.default_rng(1)
    exp = {}
    # sagittal by voxel size (3 mm along x), with a label map
    sag = rng.random((4, 12, 10)).astype(np.float32)
    save(root / "SMITH_ALICE" / "studyA" / "sag_pd_fs.nii.gz", sag, np.diag([3.0, 0.5, 0.6, 1.0]))
    seg = rng.integers(0, 4, size=sag.shape).astype(np.uint8)
    save(root / "SMITH_ALICE" / "studyA" / "sag_pd_fs_seg.nii.gz", seg, np.diag([3.0, 0.5, 0.6, 1.0]))
    exp["sag"], exp["sag_seg"] = sag, seg
    # axial, x flipped in the affine (LPS-like storage): marker voxel must land where RAS puts it
    ax = np.zeros((10, 12, 4), dtype=np.float32)
    ax[1, 2, 3] = 999.0
    save(root / "SMITH_ALICE" / "studyA" / "ax_t2.nii.gz", ax, np.diag([-0.5, 0.6, 4.0, 1.0]))
    # coronal tilted 20 degrees about x, 3 mm along y
    aff = np.eye(4)
    aff[:3, :3] = rot_x(20.0) @ np.diag([0.5, 3.0, 0.5])
    save(root / "SMITH_ALICE" / "studyA" / "cor_t1.nii.gz", rng.random((10, 5, 12)).astype(np.float32), aff)
    # study B: a NaN volume (skipped), a good one with a label map of the wrong shape
    nan = rng.random((10, 12, 4)).astype(np.float32)
    nan[0, 0, 0] = np.nan
    save(root / "p2" / "studyB" / "ax_pd.nii.gz", nan, np.diag([0.5, 0.5, 3.0, 1.0]))
    save(root / "p2" / "studyB" / "sag_t2.nii.gz", rng.random((4, 12, 10)).astype(np.float32),
         np.diag([3.0, 0.5, 0.5, 1.0]))
    save(root / "p2" / "studyB" / "sag_t2_seg.nii.gz", np.zeros((4, 12, 9), np.uint8),
         np.diag([3.0, 0.5, 0.5, 1.0]))
    # study C: only a NaN volume -> no usable stack
    save(root / "p3" / "studyC" / "cor.nii.gz", np.full((10, 4, 12), np.nan, np.float32),
         np.diag([0.5, 3.0, 0.5, 1.0]))
    (root / "readme.txt").write_text("not an image")
    out, run = root.parent / (root.name + "_shards"), root.parent / (root.name + "_run")
    mp = pytest.MonkeyPatch()
    mp.setenv("MSKFM_DEID_SALT", SALT)
    code = ingest_main(["nifti", str(root), "--out", str(out), "joint=knee", f"run_dir={run}",
                        "--config", str(Path(__file__).parents[1] / "configs/shards/ingest-nifti.yaml")])
    mp.undo()
    report = json.loads((run / "ingest_report.json").read_text())
    return {"code": code, "out": out, "report": report, "exp": exp,
            "samples": read_all(out, ("meta", "sag", "cor", "ax", "sag.seg"))}


def _study_with(samples: dict, plane: str, n_planes: int) -> dict:
    return next(s for s in samples.values() if plane in s["meta"]["planes"]
                and len(s["meta"]["planes"]) == n_planes)


def test_geometry_and_layout(nifti_run):
    assert nifti_run["code"] == 0
    a = _study_with(nifti_run["samples"], "cor", 3)
    planes = a["meta"]["planes"]
    assert planes["sag"]["spacing"] == [3.0, 0.6, 0.5] and planes["sag"]["contrast"] == "PD_FS"
    sag = nifti_run["exp"]["sag"]
    # sagittal display: rows superior->inferior, columns anterior->posterior
    np.testing.assert_array_equal(a["sag"], sag.transpose(0, 2, 1)[:, ::-1, ::-1])
    np.testing.assert_array_equal(a["sag.seg"], nifti_run["exp"]["sag_seg"].transpose(0, 2, 1)[:, ::-1, ::-1])
    assert a["sag.seg"].dtype == np.uint8
    assert planes["ax"]["spacing"] == [4.0, 0.6, 0.5] and planes["ax"]["shape"] == [4, 12, 10]
    assert a["ax"][3, 9, 1] == 999.0 and a["ax"].sum() == 999.0  # x flip honoured
    assert planes["cor"]["spacing"][0] == 3.0 and abs(planes["cor"]["obliquity_deg"] - 20.0) < 0.01
    assert a["meta"]["joint"] == "knee" and a["meta"]["source"] == "nifti"


def test_bad_inputs_reported(nifti_run):
    report = nifti_run["report"]
    codes = {(e["path"], e["code"]) for e in report["skipped"]}
    assert ("p2/studyB/ax_pd.nii.gz", "nan") in codes
    assert ("p3/studyC/cor.nii.gz", "nan") in codes
    assert ("p2/studyB/sag_t2_seg.nii.gz", "bad_seg") in codes
    assert ("readme.txt", "not_nifti") in codes
    assert report["counts"]["studies_ingested"] == 2
    assert sum(e["code"] == "no_series" for e in report["skipped"]) == 1
    b = _study_with(nifti_run["samples"], "sag", 1)
    assert "sag.seg" not in b  # bad label map dropped, image kept


def test_no_names_in_shards(nifti_run):
    for path in nifti_run["out"].rglob("*"):
        blob = path.read_bytes() if path.is_file() else b""
        for needle in (b"SMITH", b"ALICE", b"studyA", b"sag_pd_fs", SALT.encode()):
            assert needle not in blob, f"{needle!r} in {path.name}"


def test_mapping_file_and_plane_override(tmp_path, monkeypatch):
    monkeypatch.setenv("MSKFM_DEID_SALT", SALT)
    src = tmp_path / "flat"
    iso = np.arange(6 * 6 * 6, dtype=np.float32).reshape(6, 6, 6)
    save(src / "case_one.nii.gz", iso, np.eye(4))
    save(src / "case_one_labels.nii.gz", (iso % 3).astype(np.uint8), np.eye(4))
    save(src / "case_two.nii.gz", iso, np.eye(4))
    (tmp_path / "map.csv").write_text("image,study,patient,seg,joint,plane\n"
                                      "case_one.nii.gz,X1,P1,case_one_labels.nii.gz,ankle,cor\n"
                                      "case_two.nii.gz,X1,P1,,ankle,sag\n")
    out = tmp_path / "out"
    code = ingest_main(["nifti", str(src), "--out", str(out), f"mapping={tmp_path / 'map.csv'}",
                        f"run_dir={tmp_path / 'run'}"])
    samples = list(read_all(out, ("meta", "sag", "cor", "cor.seg")).values())
    assert code == 0 and len(samples) == 1  # both files map to study X1
    sample = samples[0]
    assert sample["meta"]["joint"] == "ankle" and set(sample["meta"]["planes"]) == {"sag", "cor"}
    np.testing.assert_array_equal(sample["cor.seg"], (sample["cor"] % 3).astype(np.uint8))
    report = json.loads((tmp_path / "run" / "ingest_report.json").read_text())
    assert not report["skipped"]  # the label map named in the mapping is not an image of its own


def test_canonical_geometry_matches_nibabel():
    from scipy.spatial.transform import Rotation

    from shards.ingest.nifti import canonical_geometry

    rng = np.random.default_rng(3)
    for seed in range(12):
        affine = np.eye(4)
        affine[:3, :3] = Rotation.random(random_state=seed).as_matrix() @ np.diag(rng.uniform(0.3, 4, 3))
        img = nib.Nifti1Image(np.zeros(tuple(rng.integers(2, 9, 3)), np.float32), affine)
        canon = nib.as_closest_canonical(img)
        shape, zooms, aff = canonical_geometry(img)
        assert shape == canon.shape and np.allclose(zooms, canon.header.get_zooms())
        np.testing.assert_allclose(aff, canon.affine)
