"""Distributed feature extraction (Ray workers, parts, resume, s3) and float16 storage of the cache."""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pytest

from downstream.data import load_studies
from downstream.errors import FeatureError
from downstream.extract import RayExtraction, read_rows, run_features
from downstream.features import FeatureCache, _writer
from downstream.inputs import prepare_planes
from downstream.tasks import load_task
from shards.config import ConfigError
from shards.manifest import load_manifest

FAST = ["planes=[sag]", "features.timesteps=[10]", "features.blocks=[mid,up.1]", "features.batch_size=2",
        "features.chunk_rows=4", "baselines.names=[random_backbone]"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _args(shards, hub, cache, *extra) -> list[str]:
    return [f"shards={shards}", f"cache_dir={cache}", f"backbones.sag={hub / 'knee-sag'}", *FAST, *extra]


def _entries(root: Path) -> dict[str, Path]:
    return {p.name: p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}


def _same_entries(a: Path, b: Path) -> None:
    ea, eb = _entries(a), _entries(b)
    assert sorted(ea) == sorted(eb) and len(ea) == 3     # volumes, features, random-backbone features
    for name in ea:
        files = sorted(p.name for p in ea[name].iterdir())
        assert files == sorted(p.name for p in eb[name].iterdir())
        assert all(filecmp.cmp(ea[name] / f, eb[name] / f, shallow=False) for f in files), name


@pytest.fixture(scope="module")
def single(tiny_shards, tiny_hub, tmp_path_factory) -> Path:
    """The entries one process writes."""
    cache = tmp_path_factory.mktemp("single") / "cache"
    run_features("knee-dx", _args(tiny_shards, tiny_hub, cache), tmp_path_factory.mktemp("runs"))
    return cache


class Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.integration
def test_two_ray_workers_on_s3_resume_and_match_one_process(single, tiny_shards, tiny_hub, tmp_path, s3_endpoint,
                                                            ray_local, monkeypatch):
    """One test (each Ray actor start costs tens of seconds under load): interrupted, resumed, identical."""
    import s3fs

    monkeypatch.setenv("MSKFM_FEATURE_MIRROR", str(tmp_path / "mirror"))
    env = [f"features.worker_env.{k}={v}" for k, v in                # the workers' S3 endpoint
           {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items()]
    url = "s3://mskfm-test/feature-cache"
    args = _args(tiny_shards, tiny_hub, url, "features.workers=2", *env)
    task = load_task("knee-dx", args)
    keys, manifest = list(load_studies(task)["key"]), load_manifest(str(tiny_shards))
    first: list[str] = []

    def stop_after_two(part: str) -> None:
        first.append(part)
        if len(first) == 2:
            raise Interrupt

    cache = FeatureCache(url)
    with pytest.raises(Interrupt):
        prepare_planes(task, keys, manifest, cache, RayExtraction(cache, task.features, stop_after_two))
    s3 = s3fs.S3FileSystem()
    assert [p.rsplit("/", 1)[-1] for p in s3.ls(url)] == [".parts"]  # nothing assembled yet
    # the other worker may finish a part while the interrupt propagates: count what was kept
    kept = len(s3.glob(f"{url}/.parts/*/*/checksums.json"))
    assert kept >= 2
    summary = run_features("knee-dx", args, tmp_path / "run")
    assert summary["cache_misses"] == 3 and summary["parts_skipped"] == kept  # finished parts were kept
    assert summary["workers_stats"]["devices"] == ["cpu", "cpu"]
    fetched = tmp_path / "fetched"                               # what another machine downloads
    cache = FeatureCache(url, mirror=fetched)
    prepare_planes(task, keys, manifest, cache)
    assert cache.hits == 3 and cache.misses == 0
    _same_entries(single, cache.root)
    assert not s3.exists(f"{url}/.parts/") or not s3.ls(f"{url}/.parts/")  # parts are deleted once assembled


def test_float16_storage_round_trip(single, tiny_shards, tiny_hub, tmp_path):
    half = tmp_path / "cache"
    run_features("knee-dx", _args(tiny_shards, tiny_hub, half, "features.volume_dtype=float16",
                                  "features.feature_dtype=float16"), tmp_path / "run")
    task32 = load_task("knee-dx", _args(tiny_shards, tiny_hub, single))
    task16 = load_task("knee-dx", _args(tiny_shards, tiny_hub, half, "features.volume_dtype=float16",
                                        "features.feature_dtype=float16"))
    keys, manifest = list(load_studies(task32)["key"]), load_manifest(str(tiny_shards))
    c32, c16 = FeatureCache(single), FeatureCache(half)
    p32 = prepare_planes(task32, keys, manifest, c32)["sag"]
    p16 = prepare_planes(task16, keys, manifest, c16)["sag"]
    assert c32.hits == c16.hits == 3                              # float16 entries have their own keys
    v32, v16 = np.asarray(p32.volumes), p16.volumes[:]
    assert v16.dtype == np.float32 and p16.volumes.stored.dtype == np.float16
    # rounding to float16: relative error <= 2**-11 (normal numbers), absolute <= 2**-25 (subnormal)
    assert np.all(np.abs(v16 - v32) <= 2.0 ** -11 * np.abs(v32) + 2.0 ** -25)
    for name, f32 in p32.features.items():                       # end to end: float16 volumes and features
        f32, f16 = np.asarray(f32), p16.features[name][:]
        assert np.abs(f16 - f32).max() <= 1e-2 * f32.std(), name


def test_float16_overflow_and_bad_settings_refused(tmp_path, tiny_shards, tiny_hub):
    write, _ = _writer(tmp_path, 1, "float16")
    with pytest.raises(FeatureError, match="'f' of row 0 exceeds the float16 range"):
        write(0, {"f": np.array([1.0, 7e4], np.float32)})
    with pytest.raises(ConfigError, match="chunk_rows a positive multiple of features.batch_size"):
        load_task("knee-dx", _args(tiny_shards, tiny_hub, tmp_path, "features.chunk_rows=3"))
    with pytest.raises(ConfigError, match="features.feature_dtype 'bfloat16' is unknown"):
        load_task("knee-dx", _args(tiny_shards, tiny_hub, tmp_path, "features.feature_dtype=bfloat16"))


def test_read_rows_reads_a_row_range_of_cache_arrays(tmp_path):
    write, close = _writer(tmp_path, 5, "float16")                # the cache's own files (format 1.0)
    rows = np.arange(5 * 6, dtype=np.float32).reshape(5, 2, 3)
    for i, row in enumerate(rows):
        write(i, {"f": row})
    close()
    np.testing.assert_array_equal(read_rows(str(tmp_path / "0.npy"), 1, 4), rows[1:4].astype(np.float16))
    with open(tmp_path / "v2.npy", "wb") as f:                   # format 2.0 (large headers)
        np.lib.format.write_array(f, rows, version=(2, 0))
    np.testing.assert_array_equal(read_rows(str(tmp_path / "v2.npy"), 4, 5), rows[4:5])
    np.save(tmp_path / "fortran.npy", np.asfortranarray(rows))
    with pytest.raises(FeatureError, match="fortran.npy: Fortran-ordered"):
        read_rows(str(tmp_path / "fortran.npy"), 0, 1)
