"""fastMRI HDF5 ingest on files written here in the fastMRI layout; bad input names file and slice."""

import numpy as np
import pytest

from shards.cli import main as shards_main
from shards.ingest.fastmri import FastMRIError, acquisition_meta, ingest_fastmri
from shards.reader import iter_samples
from tests.recon_data import write_fastmri_file


def test_ingest_fastmri_layout(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MSKFM_DEID_SALT", "recon-test-salt")
    src = tmp_path / "fastmri"
    src.mkdir()
    write_fastmri_file(src / "file1000001.h5", slices=3, coils=4, grid=(40, 32), recon=(32, 32), seed=0)
    write_fastmri_file(src / "file1000002.h5", slices=2, coils=6, grid=(48, 36), recon=(32, 32), seed=5,
                       acquisition="AXT2_FBK", mask=(np.arange(36) % 3 == 0).astype(np.float32))
    assert shards_main(["ingest", "fastmri", str(src), "--out", str(tmp_path / "shards"), "splits={train: 0.5, val: 0.5}"]) == 0
    assert "fastmri ->" in capsys.readouterr().out
    assert (tmp_path / "runs" / "ingest" / "shards" / "metrics.json").is_file()
    samples = list(iter_samples(str(tmp_path / "shards"), None, None))
    assert len(samples) == 5
    by_study = {}
    for s in samples:
        by_study.setdefault(s["meta"]["study"], []).append(s)
        assert s["kspace"].dtype == np.complex64 and s["target"].shape == (32, 32)
        assert s["meta"]["coils"] == s["kspace"].shape[0] and s["meta"]["anatomy"] == "knee"
    a, b = sorted(by_study.values(), key=len, reverse=True)  # 3 and 2 slices; keys are salted hashes
    assert a[0]["kspace"].shape == (4, 40, 32) and b[0]["kspace"].shape == (6, 48, 36)
    assert a[0]["meta"]["contrast"] == "PD" and a[0]["meta"]["orientation"] == "cor"
    assert b[0]["meta"]["orientation"] == "ax" and b[0]["mask"].shape == (48, 36) and "mask" not in a[0]
    assert sorted(s["meta"]["slice"] for s in a) == [0, 1, 2]


@pytest.mark.parametrize("kwargs,match", [
    ({"nan_slice": 1}, r"file_bad\.h5: slice 1: kspace contains NaN"),
    ({"header_grid": (44, 32)}, r"file_bad\.h5: kspace grid \(40, 32\) disagrees with the header"),
    ({"mask": np.ones(31)}, r"file_bad\.h5: mask of 31 columns"),
])
def test_bad_files_name_file_and_slice(tmp_path, kwargs, match, monkeypatch):
    monkeypatch.setenv("MSKFM_DEID_SALT", "recon-test-salt")
    write_fastmri_file(tmp_path / "file_bad.h5", slices=2, **kwargs)
    with pytest.raises(FastMRIError, match=match):
        ingest_fastmri(tmp_path, tmp_path / "out")


def test_acquisition_names():
    assert acquisition_meta("CORPDFS_FBK") == ("PDFS", "cor")
    assert acquisition_meta("SAGT1") == ("T1", "sag") and acquisition_meta(b"AXFLAIR_FBK") == ("FLAIR", "ax")
    assert acquisition_meta("COR DR SMITH 555-0199") == ("unknown", "cor")  # free text is not a contrast
