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
