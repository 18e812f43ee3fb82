"""Shard writing, reading, verification, splits, bad input and interrupted builds."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.build import BuildConfig, build_shards
from shards.config import ConfigError, load_config
from shards.manifest import load_manifest, split_keys, verify_shards
from shards.reader import ShardError, ShardReader, iter_samples
from shards.schema import SchemaError, decode_member
from shards.splits import assign_split

from .conftest import ROOT, TINY_SHARDS_CONFIG


def test_manifest_records_shards_splits_and_stats(tiny_shards):
    m = load_manifest(tiny_shards)
    assert m["schema_version"] == 2 and m["kind"] == "study" and "knee" in m["dataset"]["anatomies"]
    assert sum(s["n_samples"] for s in m["shards"]) == m["stats"]["n_samples"] > 30
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in m["shards"])
    assert {"train", "val", "test"} <= set(m["splits"])
    patients = [set(m["splits"][s]["patients"]) for s in ("train", "val", "test")]
    assert not (patients[0] & patients[1]) and not (patients[0] & patients[2]) and not (patients[1] & patients[2])
    st = m["stats"]
    assert set(st["joint"]) == {"knee", "ankle", "shoulder"}
    assert st["planes"]["sag"]["common_shape"] == [8, 32, 32]
    assert st["planes"]["sag"]["intensity"]["p99.5"] > st["planes"]["sag"]["intensity"]["p50"]
    assert set(st["labels"]["knee"]) == {"acl", "pcl", "medial_meniscus", "lateral_meniscus", "mcl",
                                         "lcl", "cartilage_bml", "effusion"}
    assert set(st["field_strength"]) == {"1.5", "3.0"}
    assert verify_shards(m) == []
    recon = load_manifest(tiny_shards / "recon")
    assert recon["kind"] == "recon" and recon["stats"]["n_samples"] == 2 * m["stats"]["n_samples"]


def test_splits_are_by_patient_and_stable():
    fr = {"train": 0.7, "val": 0.15, "test": 0.15}
    got = [assign_split(f"p{i}", fr, 0) for i in range(2000)]
    assert got == [assign_split(f"p{i}", fr, 0) for i in range(2000)]
    assert abs(got.count("train") / 2000 - 0.7) < 0.04
    assert [assign_split(f"p{i}", fr, 1) for i in range(50)] != got[:50]


def test_reader_decodes_only_requested_fields(tiny_shards):
    sample = next(iter_samples(tiny_shards, "train", ("sag", "labels")))
    assert set(sample) == {"__key__", "sag", "labels"}
    assert sample["sag"].dtype == np.float32 and sample["sag"].shape == (8, 32, 32)
    full = next(iter_samples(tiny_shards, "train"))
    assert {"meta", "labels", "ehr"} <= set(full) and full["meta"]["split"] == "train"
    knees = list(iter_samples(tiny_shards, "train", ("labels",), joints=["knee"]))
    assert knees and all(set(s["labels"]) == {"acl", "pcl", "medial_meniscus", "lateral_meniscus", "mcl",
                                              "lcl", "cartilage_bml", "effusion"} for s in knees)


@pytest.mark.parametrize("world,workers,split_by", [(1, 1, "auto"), (2, 1, "auto"), (3, 2, "auto"),
                                                    (2, 2, "sample"), (2, 1, "shard")])
def test_rank_and_worker_splits_cover_each_sample_exactly_once(tiny_shards, world, workers, split_by):
    expected = sorted(split_keys(load_manifest(tiny_shards), "train"))
    seen = []
    for rank in range(world):
        ds = ShardReader(tiny_shards, "train", ("labels",), rank=rank, world_size=world, split_by=split_by)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers if workers > 1 else 0,
                                             multiprocessing_context="fork" if workers > 1 else None)
        seen += [s["__key__"] for s in loader]
    assert sorted(seen) == expected


def test_seeded_shuffle_and_resampling(tiny_shards):
    def keys(**kw):
        return [s["__key__"] for s in ShardReader(tiny_shards, "train", ("labels",), rank=0, world_size=1, **kw)]

    plain = keys()
    a, b = keys(shuffle=True, seed=3), keys(shuffle=True, seed=3)
    assert a == b and a != plain and sorted(a) == sorted(plain)
    assert keys(shuffle=True, seed=4) != a
    ds = ShardReader(tiny_shards, "train", ("labels",), rank=0, world_size=1, shuffle=True, seed=3)
    ds.set_epoch(1)
    assert [s["__key__"] for s in ds] != a
    r = keys(resample=True, epoch_length=50, seed=1)
    assert len(r) == 50 and set(r) <= set(plain)
    r0 = [s["__key__"] for s in ShardReader(tiny_shards, "train", ("labels",), rank=0, world_size=2,
                                            resample=True, epoch_length=10)]
    r1 = [s["__key__"] for s in ShardReader(tiny_shards, "train", ("labels",), rank=1, world_size=2,
                                            resample=True, epoch_length=10)]
    assert len(r0) == len(r1) == 10 and r0 != r1


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("recon"))
    return dst


def test_truncated_shard_is_named_with_the_sample_key(tiny_shards, tmp_path):
    d = _copy(tiny_shards, tmp_path / "s")
    m = load_manifest(d)
    entry = [s for s in m["shards"] if s["split"] == "train"][1]
    path = d / entry["url"]
    path.write_bytes(path.read_bytes()[: entry["bytes"] // 3])
    with pytest.raises(ShardError) as err:
        list(iter_samples(d, "train"))
    msg = str(err.value)
    assert entry["url"] in msg and "sample '" in msg
    assert any(k in msg for k in entry["keys"])
    reader = ShardReader(d, "train", rank=0, world_size=1, on_error="skip")
    got = [s["__key__"] for s in reader]
    total = sum(s["n_samples"] for s in m["shards"] if s["split"] == "train")
    assert reader.skipped > 0 and len(got) + reader.skipped == total
    assert reader.errors and entry["url"] in reader.errors[0]
    problems = verify_shards(load_manifest(d))
    assert len(problems) == 1 and entry["url"] in problems[0]


def test_corrupt_member_and_sha_mismatch(tiny_shards, tmp_path):
    d = _copy(tiny_shards, tmp_path / "s")
    m = load_manifest(d)
    entry = [s for s in m["shards"] if s["split"] == "val"][0]
    path = d / entry["url"]
    data = bytearray(path.read_bytes())
    pos = data.find(b"\x93NUMPY")  # damage the first .npy header in place (same size)
    data[pos:pos + 6] = b"XXXXXX"
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=entry["keys"][0]):
        list(iter_samples(d, "val"))
    with pytest.raises(ShardError, match="sha256"):
        list(iter_samples(d, "val", verify=True))
    assert any(entry["url"] in p for p in verify_shards(m))


def test_reader_returns_the_written_arrays_and_skips_unread_members(tiny_shards):
    entry = [s for s in load_manifest(tiny_shards)["shards"] if s["split"] == "val"][0]
    with tarfile.open(tiny_shards / entry["url"]) as tar:       # reference: tarfile and np.load
        ref = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    samples = list(iter_samples(tiny_shards, "val", keys=entry["keys"], require=()))
    assert [s["__key__"] for s in samples] == entry["keys"]
    names = set()
    for sample in samples:
        for field, value in sample.items():
            if field == "__key__":
                continue
            name = next(n for n in ref if n in (f"{sample['__key__']}.{field}.npy", f"{sample['__key__']}.{field}.json"))
            names.add(name)
            if name.endswith(".json"):
                assert value == json.loads(ref[name]), name
            else:
                want = np.load(io.BytesIO(ref[name]), allow_pickle=False)
                assert value.dtype == want.dtype and value.flags.writeable, name
                np.testing.assert_array_equal(value, want)
    assert names == set(ref)
    labels = ShardReader(tiny_shards, "val", ("labels",), keys=entry["keys"], rank=0, world_size=1)
    assert len(list(labels)) == len(entry["keys"])
    assert labels.bytes_read < entry["bytes"] / 4                # the volumes were skipped, not read


@pytest.mark.parametrize("arr", [np.zeros((0, 3), np.float32), np.array(3.5, np.float32), np.arange(5, dtype=">i4"),
                                 np.asfortranarray(np.arange(6.0).reshape(2, 3)), np.ones((2, 3, 4), np.complex64)])
def test_npy_members_decode_as_numpy_saved_them(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    for data in (buf.getvalue(), np.frombuffer(buf.getvalue(), np.uint8).copy()):  # bytes, writable buffer
        got = decode_member("x.npy", data)
        assert got.dtype == arr.dtype and got.shape == arr.shape and got.flags.writeable
        np.testing.assert_array_equal(got, arr)


def _replace_member(path: Path, name: str, data: bytes) -> None:
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for m, d in members:
            d = data if m.name == name else d
            m.size = len(d)
            tar.addfile(m, io.BytesIO(d))


class _Planted:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_hostile_npy_members_are_refused_naming_shard_and_member(tiny_shards, tmp_path):
    d = _copy(tiny_shards, tmp_path / "s")
    entry = [s for s in load_manifest(d)["shards"] if s["split"] == "val"][0]
    key, path = entry["keys"][1], d / entry["url"]
    member = f"{key}.sag.npy"
    planted = np.empty(1, dtype=object)
    planted[0] = _Planted(tmp_path / "pickle-ran")
    buf = io.BytesIO()
    np.save(buf, planted, allow_pickle=True)
    _replace_member(path, member, buf.getvalue())
    with pytest.raises(ShardError, match=rf"{entry['url']}: sample '{key}' \(member {member}\).*object array"):
        list(iter_samples(d, "val", ("sag",)))
    assert not (tmp_path / "pickle-ran").exists()
    with tarfile.open(tiny_shards / entry["url"]) as tar:
        good = tar.extractfile(member).read()
    _replace_member(path, member, good[:-100])                      # data shorter than its header says
    with pytest.raises(ShardError, match=rf"{entry['url']}: sample '{key}' \(member {member}\).*data bytes"):
        list(iter_samples(d, "val", ("sag",)))


def test_unknown_schema_version_is_refused(tiny_shards, tmp_path):
    d = _copy(tiny_shards, tmp_path / "s")
    m = json.loads((d / "manifest.json").read_text())
    m["schema_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SchemaError, match="schema version 99 is not supported"):
        ShardReader(d, "train")


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="synth.n_patiens"):
        load_config(BuildConfig, TINY_SHARDS_CONFIG, ["synth.n_patiens=3"])
    with pytest.raises(ConfigError, match="n_patients"):
        load_config(BuildConfig, TINY_SHARDS_CONFIG, ["synth.n_patients=many"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nshard_size: 3\n")
    with pytest.raises(ConfigError, match=f"{bad}.*shard_size"):
        load_config(BuildConfig, bad)
    with pytest.raises(ConfigError, match="unknown joint 'hip'"):
        load_config(BuildConfig, None, ["synth.joints=[hip]", "synth.joint_weights=[1.0]"])
    proc = _shards_cli(["build", "--config", str(TINY_SHARDS_CONFIG), "workerz=2"], tmp_path)
    assert proc.returncode == 2 and "workerz" in proc.stderr and not (tmp_path / "data").exists()


def _shards_cli(args, cwd, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), MSKFM_RUNS=str(cwd / "runs"))
    return subprocess.run([sys.executable, "-m", "shards", "-q", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, **kw)


def test_cli_build_verify_info(tmp_path):
    out = tmp_path / "shards"
    proc = _shards_cli(["build", "--config", str(TINY_SHARDS_CONFIG), f"out={out}", "synth.n_patients=6",
                        "synth.kspace.enabled=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "runs" / "shards-build" / "tiny" / "metrics.json").read_text())
    assert metrics["studies"] == load_manifest(out)["stats"]["n_samples"]
    assert (tmp_path / "runs" / "shards-build" / "tiny" / "config.yaml").exists()
    proc = _shards_cli(["verify", str(out)], tmp_path)
    assert proc.returncode == 0 and "OK" in proc.stdout
    proc = _shards_cli(["info", str(out)], tmp_path)
    assert proc.returncode == 0 and "labels (" in proc.stdout and "planes:" in proc.stdout
    proc = _shards_cli(["synth", "--config", str(TINY_SHARDS_CONFIG), "--out", str(tmp_path / "x"), "--n", "1"],
                       tmp_path)
    assert proc.returncode == 0 and list((tmp_path / "x").glob("*/sag.nii.gz")) and list((tmp_path / "x").glob("*.png"))


def test_killed_build_resumes_to_identical_shards(tmp_path):
    """SIGKILL a build after its first finished shard; the rerun completes it, skips finished
    shards, leaves no partial shard under a final name, and matches a clean build byte for byte."""
    args = ["build", "--config", str(TINY_SHARDS_CONFIG), "synth.kspace.enabled=false",
            "synth.n_patients=24", "shard_max_count=3"]
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT), MSKFM_RUNS=str(tmp_path / "runs"))
    proc = subprocess.Popen([sys.executable, "-m", "shards", "-q", *args, f"out={killed}"], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = killed / "_progress.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (journal.exists() and journal.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists()
    finished_before = journal.read_text().count("\n")
    assert _shards_cli([*args, f"out={killed}"], tmp_path).returncode == 0
    clean = tmp_path / "clean"
    build_shards(load_config(BuildConfig, TINY_SHARDS_CONFIG, ["synth.kspace.enabled=false", "synth.n_patients=24",
                                                               "shard_max_count=3", f"out={clean}"]), progress=False)
    mk, mc = load_manifest(killed), load_manifest(clean)
    assert verify_shards(mk) == [] and not list(killed.glob("*.tmp"))
    assert [(s["url"], s["sha256"]) for s in mk["shards"]] == [(s["url"], s["sha256"]) for s in mc["shards"]]
    assert finished_before >= 2 and len(mk["shards"]) > finished_before


@pytest.mark.integration
def test_reader_streams_from_s3(tiny_shards, s3_endpoint):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(str(tiny_shards) + "/", "mskfm-test/tiny/", recursive=True)
    url = "s3://mskfm-test/tiny"
    m = load_manifest(url)
    assert verify_shards(m, "val") == []
    local = [s["__key__"] for s in iter_samples(tiny_shards, "val", ("sag", "labels"))]
    remote = list(iter_samples(url, "val", ("sag", "labels"), verify=True))
    assert [s["__key__"] for s in remote] == local and remote[0]["sag"].shape == (8, 32, 32)


def test_writer_rejects_a_key_written_twice(tmp_path):
    from shards.writer import ShardWriter

    sample = {"__key__": "s1", "meta": {"joint": "knee", "planes": {}}, "labels": {"acl": 1}}
    with pytest.raises(SchemaError, match="duplicate sample key 's1'"):
        with ShardWriter(tmp_path, max_count=10) as w:
            w.write(sample, "train")
            w.write(sample, "train")
    assert not list(tmp_path.glob("*.tar"))
