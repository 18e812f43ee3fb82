"""Integrity and safety (issue 15, items 5-13): cut shards, empty selections, malformed headers,
concurrent writers, resumes with changed configurations, altered cache entries, unpickled
checkpoints, deterministic failures under Ray and `cluster down` on stale records."""

from __future__ import annotations

import json
import shutil
import signal
import tarfile
from pathlib import Path

import pytest

from shards.config import ConfigError, load_config
from shards.manifest import load_manifest
from shards.reader import ShardError, ShardReader, iter_samples

from .conftest import ROOT

TINY = str(ROOT / "configs" / "pretrain" / "tiny.yaml")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("recon"))
    return dst


def _cut_at_sample_boundary(path: Path, keep: int) -> None:
    """Keep the first ``keep`` samples of a shard and end the archive cleanly (as a copy cut at a
    member boundary reads: the tar reader sees a normal end of archive)."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members))
    first_dropped = next(m for m in members if m.name.split(".", 1)[0] == keys[keep])
    data = path.read_bytes()[: first_dropped.offset]
    path.write_bytes(data + b"\0" * 1024)


@pytest.fixture
def alarm():
    """Fail a test that would hang (instead of hanging the suite)."""
    def timeout(signum, frame):
        raise TimeoutError("still running after the alarm")

    old = signal.signal(signal.SIGALRM, timeout)
    yield signal.alarm
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# -- 5: a shard cut at a member boundary --------------------------------------------------------

def test_shard_cut_at_member_boundary_is_named_or_counted(tiny_shards, tmp_path):
    d = _copy(tiny_shards, tmp_path / "s")
    m = load_manifest(d)
    entry = [s for s in m["shards"] if s["split"] == "train"][1]
    _cut_at_sample_boundary(d / entry["url"], keep=2)
    with pytest.raises(ShardError, match=rf"{entry['url']}: sample count: .* 2 of the {entry['n_samples']} samples"):
        list(iter_samples(d, "train", ("sag",)))
    reader = ShardReader(d, "train", ("labels",), rank=0, world_size=1, on_error="skip")
    got = [s["__key__"] for s in reader]
    total = sum(s["n_samples"] for s in m["shards"] if s["split"] == "train")
    assert reader.skipped == entry["n_samples"] - 2 and len(got) + reader.skipped == total
    assert entry["url"] in reader.errors[0]


def _loader(shards: Path, tmp: Path, *overrides: str):
    from pretrain.config import PretrainConfig
    from pretrain.loop import build_loader
    from pretrain.objectives import build_objective

    cfg = load_config(PretrainConfig, TINY, [f"data.source={shards}", f"run_root={tmp}/runs",
                                             f"storage_path={tmp}/ckpt", *overrides])
    objective = build_objective(cfg, cfg.planes[0], load_manifest(shards))
    return build_loader(cfg, objective, 0, 1, epoch=0)


def test_pretraining_reader_refuses_a_cut_shard(tiny_shards, tmp_path, alarm):
    """The pretraining loader (resampled, seeded) raises on the cut shard instead of training on less."""
    d = _copy(tiny_shards, tmp_path / "s")
    for entry in load_manifest(d)["shards"]:
        if entry["split"] == "train":
            _cut_at_sample_boundary(d / entry["url"], keep=1)
    alarm(60)
    with pytest.raises(ShardError, match=r"corrupt shard .*train-\d+\.tar: sample count"):
        for _ in zip(range(200), _loader(d, tmp_path)):
            pass


# -- 12: an anatomy or plane without studies in the split fails in seconds -----------------------

def test_pretraining_without_studies_of_the_anatomy_fails_fast(study_shards, tmp_path, alarm):
    alarm(60)  # study_shards hold knee and ankle only: shoulder/sag/train has no study
    with pytest.raises(ShardError, match=r"split 'train' .* joint shoulder with field\(s\) sag"):
        next(iter(_loader(study_shards, tmp_path, "joint=shoulder", "planes=[sag]")))


# -- 9: feature-cache entries carry checksums ----------------------------------------------------

def test_damaged_feature_cache_entry_is_recomputed(tmp_path, caplog):
    import numpy as np

    from downstream.features import FeatureCache

    cache = FeatureCache(tmp_path / "cache")
    values = np.arange(2 * 64, dtype=np.float32).reshape(2, 64)

    def compute(folder, keys):
        np.save(folder / "0.npy", values)
        (folder / "names.json").write_text(json.dumps(["f"]))

    def get():
        return np.array(cache.get_or_create({"kind": "test"}, ["s-a", "s-b"], compute)["f"])

    assert np.array_equal(get(), values) and cache.misses == 1
    entry = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    npy = entry / "0.npy"
    npy.write_bytes(npy.read_bytes()[:-40])                        # truncated
    assert np.array_equal(get(), values) and cache.recomputed == 1
    data = bytearray(npy.read_bytes())
    data[-4:] = np.float32(1e6).tobytes()                          # altered in place, same size
    npy.write_bytes(bytes(data))
    assert np.array_equal(get(), values) and cache.recomputed == 2 and cache.misses == 3
    assert f"feature cache entry {entry} is damaged (file 0.npy does not match" in caplog.text
    assert np.array_equal(get(), values) and cache.hits == 1      # intact entries are hits


# -- 13: `cluster down` signals only processes it can show it started ------------------------------

def test_cluster_down_leaves_a_reused_process_group_alone(tmp_path):
    """A node record whose processes are gone (a reboot, a crash) while its group id now belongs
    to another program: `cluster down` removes the record and signals nothing."""
    import subprocess
    import sys

    import psutil

    from cluster.config import load_local_config
    from cluster.local import exposure_warnings, read_nodes, stop

    cfg = load_local_config(None, [f"state_dir={tmp_path / 'state'}"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        record = {"role": "head", "pgid": other.pid, "temp_dir": str(tmp_path / "mskfm-ray-head-gone"),
                  "address": "127.0.0.1:1", "dashboard_url": "", "log": ""}
        nodes = cfg.state_path / "nodes"
        nodes.mkdir(parents=True)
        (nodes / f"head-{other.pid}.json").write_text(json.dumps(record))
        assert stop(cfg, grace_s=0.5) == 0
        assert other.poll() is None and not read_nodes(cfg)      # alive, record gone
        # the same with a record of this boot whose process had another start time
        started = psutil.Process(other.pid).create_time()
        record |= {"boot_time": psutil.boot_time(), "processes": [[other.pid, round(started - 3600, 2)]]}
        (nodes / f"head-{other.pid}.json").write_text(json.dumps(record))
        assert stop(cfg, grace_s=0.5) == 0
        assert other.poll() is None and not read_nodes(cfg)      # alive, record gone
    finally:
        other.kill()
        other.wait()
    assert exposure_warnings(cfg) == []
    off = load_local_config(None, ["auth=disabled"])
    assert any("authentication is OFF" in note for note in exposure_warnings(off))


# -- 7: one writer per output folder -------------------------------------------------------------

SALT = "integrity-test-salt"


def _build_cfg(out: Path, *overrides: str):
    from shards.build import BuildConfig

    from .conftest import TINY_SHARDS_CONFIG

    return load_config(BuildConfig, TINY_SHARDS_CONFIG, [f"out={out}", "synth.n_patients=4",
                                                         "synth.kspace.enabled=false", *overrides])


def test_second_writer_into_a_folder_is_refused_naming_the_holder(tmp_path, monkeypatch, capsys):
    import socket
    import subprocess
    import sys

    from shards.build import build_shards
    from shards.ingest.cli import main as ingest_main
    from shards.lock import FolderLockedError

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from shards import lock; "
                               f"lock.acquire({str(out)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        who = f"pid {holder.pid} on {socket.gethostname()}"
        with pytest.raises(FolderLockedError, match=f"{out} is being written by {who}"):
            build_shards(_build_cfg(out), progress=False)
        monkeypatch.setenv("MSKFM_DEID_SALT", SALT)
        (tmp_path / "src").mkdir()
        assert ingest_main(["nifti", str(tmp_path / "src"), "--out", str(out), f"run_dir={tmp_path / 'r'}"]) == 2
        assert who in capsys.readouterr().err and not (tmp_path / "r").exists()
    finally:
        holder.kill()
        holder.wait()
    build_shards(_build_cfg(out), progress=False)  # the holder is gone: its lock went with it
    assert load_manifest(out)["stats"]["n_samples"] > 0 and not (out / ".lock").exists()


# -- 8: a resume with another configuration is refused, naming the changed keys -------------------

def _nifti_source(root: Path, n: int = 2) -> Path:
    from shards.export import export_study
    from shards.synth import generate_study, iter_study_refs

    cfg = _build_cfg(root / "unused")
    for i, (plan, visit, key) in enumerate(iter_study_refs(cfg.synth)):
        if i >= n:
            break
        folder = export_study(generate_study(cfg.synth, plan, visit, key)[0], root / "src", "nifti")
        for f in folder.glob("*.json"):  # sidecars are not NIfTI
            f.unlink()
        for plane, name in (("sag", "series_one"), ("cor", "series_two"), ("ax", "series_three")):
            for suffix in ("", "_seg"):  # file names of an export, not words the shards use
                (folder / f"{plane}{suffix}.nii.gz").rename(folder / f"{name}{suffix}.nii.gz")
    return root / "src"


def test_shard_resume_with_other_config_or_source_is_refused(tmp_path, monkeypatch, capsys):
    from shards.build import build_shards
    from shards.ingest.cli import main as ingest_main

    built = tmp_path / "built"
    build_shards(_build_cfg(built), progress=False)
    with pytest.raises(ConfigError, match=r"holds a shard set with other config\.splits\.train "
                                          r"\(config\.splits\.train: 0\.6 -> 0\.5\)"):
        build_shards(_build_cfg(built, "splits.train=0.5"), progress=False)
    before = (built / "manifest.json").read_text()
    build_shards(_build_cfg(built), progress=False)  # the same config resumes (nothing to do)
    assert json.loads((built / "manifest.json").read_text())["shards"] == json.loads(before)["shards"]

    src, ingested = _nifti_source(tmp_path), tmp_path / "ingested"
    monkeypatch.setenv("MSKFM_DEID_SALT", SALT)
    argv = ["nifti", str(src), "--out", str(ingested), "joint=knee"]
    assert ingest_main([*argv, f"run_dir={tmp_path / 'r1'}"]) == 0
    with pytest.raises(ConfigError, match=r"holds a shard set with other .*source"):
        build_shards(_build_cfg(ingested), progress=False)  # never relabel an ingest as synthetic
    capsys.readouterr()
    assert ingest_main([*argv, f"run_dir={tmp_path / 'r2'}", "splits.train=0.9"]) == 2
    assert "ingest_config.splits.train (ingest_config.splits.train: 0.7 -> 0.9)" in capsys.readouterr().err
    monkeypatch.setenv("MSKFM_DEID_SALT", SALT + "-other")
    assert ingest_main([*argv, f"run_dir={tmp_path / 'r3'}"]) == 2
    assert "other deid_key_check" in capsys.readouterr().err
    monkeypatch.setenv("MSKFM_DEID_SALT", SALT)
    assert ingest_main([*argv, f"run_dir={tmp_path / 'r4'}"]) == 0  # the same settings resume
    report = json.loads((tmp_path / "r4" / "ingest_report.json").read_text())
    assert report["counts"]["studies_resumed"] == 2 and report["counts"]["studies_ingested"] == 0


def test_pretrain_sweep_and_study_resume_with_other_config_is_refused(tiny_shards, tmp_path, capsys):
    from downstream.studies import run_study
    from downstream.studies.config import load_study
    from downstream.sweep import load_sweep, run_sweep
    from pretrain.cli import main
    from pretrain.config import PretrainConfig, run_dir
    from pretrain.run import resolve_paths
    from shards.config import save_config

    args = [f"data.source={tiny_shards}", f"run_root={tmp_path}/runs", f"storage_path={tmp_path}/ckpt",
            "launcher=local", "name=r"]
    cfg = resolve_paths(load_config(PretrainConfig, TINY, args))
    save_config(cfg, run_dir(cfg) / "config.yaml")  # as a first `pretrain run` leaves it
    assert main(["run", "--config", TINY, *args, "optim.lr=0.5", "seed=3"]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir(cfg)} holds a pretraining run with other optim.lr, seed (optim.lr: 0.002 -> 0.5; seed: 0 -> 3)" in err

    sweep = load_sweep(ROOT / "configs" / "sweeps" / "knee-dx-head.yaml", "knee-dx")
    save_config(sweep, tmp_path / "sweep" / "config.yaml")
    sweep.num_samples += 1
    with pytest.raises(ConfigError, match=r"holds a sweep with other num_samples"):
        run_sweep(sweep, tmp_path / "sweep")

    study = load_study("label-efficiency", ROOT / "configs" / "sweeps" / "label-efficiency.yaml")
    save_config(study, tmp_path / "study" / "config.yaml")
    study.seeds = [*study.seeds, 99]
    with pytest.raises(ConfigError, match=r"holds a study with other seeds"):
        run_study(study, tmp_path / "study")


# -- 6: a malformed header value costs one study (with a reason), never the ingest or its report ----

def test_malformed_header_value_skips_one_study_with_a_reason(tmp_path, monkeypatch):
    import numpy as np
    from pydicom.uid import generate_uid

    from shards.ingest.cli import main as ingest_main

    from .test_ingest_dicom import SAG, write_series

    rng = np.random.default_rng(0)
    fields = {"unit": "1.5T", "garbage": "high", "plain": "3.0"}  # same length: 4 bytes
    for i, (name, value) in enumerate(fields.items()):
        patient = {"PatientName": f"P^{name.upper()}", "PatientID": f"ID{i}"}
        write_series(tmp_path / "src" / name, patient, generate_uid(), SAG, 3, 3.0, "SAG PD", rng)
        for f in (tmp_path / "src" / name).iterdir():  # what a misbehaving export writes
            raw = f.read_bytes().replace(b"\x18\x00\x87\x00DS\x04\x003.0 ", b"\x18\x00\x87\x00DS\x04\x00"
                                         + value.ljust(4).encode())
            assert raw != f.read_bytes() or value == "3.0"
            f.write_bytes(raw)
    monkeypatch.setenv("MSKFM_DEID_SALT", SALT)
    code = ingest_main(["dicom", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                        f"run_dir={tmp_path / 'run'}"])
    report = json.loads((tmp_path / "run" / "ingest_report.json").read_text())
    assert code == 0 and report["counts"]["studies_ingested"] == 2
    bad = [e for e in report["skipped"] if e["code"] == "bad_header"]
    assert len(bad) == 1 and bad[0]["path"] == "garbage" and "MagneticFieldStrength" in bad[0]["reason"]
    strengths = sorted(s["meta"]["field_strength"] for s in iter_samples(tmp_path / "out", None, ("meta",), require=()))
    assert strengths == [1.5, 3.0]


def test_an_ingest_that_stops_still_writes_its_report(tmp_path, monkeypatch):
    from shards.ingest import dicom as dicom_mod
    from shards.ingest.cli import main as ingest_main

    def broken(*args, **kwargs):
        raise RuntimeError("disk went away")
    monkeypatch.setattr(dicom_mod, "build_stacks", broken)
    monkeypatch.setenv("MSKFM_DEID_SALT", SALT)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("not dicom")
    with pytest.raises(RuntimeError, match="disk went away"):
        ingest_main(["dicom", str(tmp_path / "src"), "--out", str(tmp_path / "out"), f"run_dir={tmp_path / 'run'}"])
    report = json.loads((tmp_path / "run" / "ingest_report.json").read_text())
    assert [e["code"] for e in report["skipped"]] == ["not_dicom", "aborted"]
    assert "disk went away" in report["skipped"][-1]["reason"]


# -- 10: nothing in a checkpoint is unpickled -----------------------------------------------------

class _Planted:
    """What an attacker with write access to the checkpoint storage plants: code run on unpickling."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _plant(ckpt: Path, relative: str, marker: Path) -> None:
    """Replace one checkpoint file with a malicious pickle and record its sha256, as the attacker would."""
    import hashlib

    import torch

    torch.save({"module": _Planted(marker)}, ckpt / relative)
    state = json.loads((ckpt / "loop_state.json").read_text())
    state["files"][relative] = hashlib.sha256((ckpt / relative).read_bytes()).hexdigest()
    (ckpt / "loop_state.json").write_text(json.dumps(state))


@pytest.mark.integration
def test_planted_pickle_in_a_checkpoint_never_runs(tiny_shards, tmp_path, capsys):
    from pretrain.cli import main

    args = ["run", "--config", TINY, f"data.source={tiny_shards}", f"run_root={tmp_path}/runs",
            f"storage_path={tmp_path}/ckpt", "name=p", "launcher=local", "optim.total_steps=2", "checkpoint_every=2"]
    assert main(args) == 0
    ckpt = tmp_path / "ckpt" / "p" / "sag" / "checkpoint_00000002"
    publish = ["publish", "p", "--run-root", f"{tmp_path}/runs", "--to", f"{tmp_path}/hub"]
    marker = tmp_path / "owned"
    _plant(ckpt, "state/mp_rank_00_model_states.pt", marker)
    capsys.readouterr()
    rc = main(args[:-2] + ["optim.total_steps=4", "checkpoint_every=2"])  # resume
    assert not marker.exists() and rc == 2 and "corrupt checkpoint" in capsys.readouterr().err
    assert {"weights.safetensors", "ema.safetensors"} <= {p.name for p in ckpt.iterdir()}
    assert main(publish) == 0 and not marker.exists()  # publishing reads safetensors only
    (ckpt / "weights.safetensors").unlink()            # a checkpoint without full weights
    _plant(ckpt, "ema.pt", marker)
    (ckpt / "ema.safetensors").unlink()
    state = json.loads((ckpt / "loop_state.json").read_text())
    state["files"] = {k: v for k, v in state["files"].items() if not k.endswith(".safetensors")}
    (ckpt / "loop_state.json").write_text(json.dumps(state))
    assert main([*publish, "--overwrite"]) == 2 and not marker.exists()
    assert "corrupt checkpoint" in capsys.readouterr().err


def test_no_unrestricted_unpickling_in_library_code():
    offenders = [str(p.relative_to(ROOT)) for pkg in ("shards", "pretrain", "downstream", "cluster")
                 for p in (ROOT / pkg).rglob("*.py") if "weights_only=False" in p.read_text()]
    assert offenders == []


# -- 11: under Ray, a failure that would recur stops at once, as under the local launcher ---------

@pytest.mark.integration
def test_nonfinite_loss_under_ray_stops_without_retry(tiny_shards, ray_local, tmp_path, capsys):
    from pretrain.cli import main

    args = ["run", "--config", TINY, f"data.source={tiny_shards}", f"run_root={tmp_path}/runs",
            f"storage_path={tmp_path}/ckpt", "name=nan", "launcher=ray", "ray.num_workers=1",
            "ray.max_failures=2", "optim.total_steps=6", "optim.lr=1e30", "optim.clip=0",
            "optim.warmup_steps=1", "checkpoint_every=1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("pretrain run: error:")] == [err[-1]]
    assert "sag: non-finite loss" in err[-1] and "(rank 0); samples:" in err[-1]
    events = [json.loads(line).get("event") for line in
              (tmp_path / "runs" / "nan" / "sag" / "metrics.jsonl").read_text().splitlines()]
    assert events.count("start") + events.count("resume") == 1  # one attempt, no retry
