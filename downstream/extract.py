"""Feature extraction on Ray workers: the same cache entries as one process, assembled from parts.

A missing volumes entry is split into one unit per shard (the entry's studies in that shard, streamed
from it by one worker); a missing features entry into units of ``features.chunk_rows`` rows of the
volumes entry, a multiple of ``features.batch_size``, so that every backbone batch holds the same
studies as in one process. Each worker (a Ray actor, on a GPU when the cluster has one per worker)
loads a backbone once and writes each unit as a part under ``<cache_dir>/.parts/<entry>/<unit>/``
(local or ``s3://``; ``checksums.json`` last marks it complete). The driver then writes the entry
from the parts with the one-process writer, row by row in key order, and deletes the parts: the
entry's files are byte-identical to one process's on the same device type and thread count. An
interrupted run leaves its complete parts; the next run computes only the others.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import fsspec
import numpy as np
import torch

from pretrain.publish import load_backbone
from shards.manifest import load_manifest, sha256_of
from shards.schema import NPY_HEADERS

from .errors import FeatureError
from .features import (CHECKSUMS, FeatureCache, _writer, backbone_identity, digest, entry_problem,
                       extract_features, preprocess_plane)
from .inputs import random_copy

log = logging.getLogger(__name__)


@dataclass
class Unit:
    """Rows ``rows`` of an entry (their study ``keys``), written as the part at ``url``."""

    index: int
    rows: list[int]
    keys: list[str]
    url: str


def shard_units(manifest: dict, keys: Sequence[str], base: str) -> list[Unit]:
    """One unit per shard holding any of ``keys``."""
    row_of = {k: i for i, k in enumerate(keys)}
    units = []
    for shard in manifest["shards"]:
        mine = [k for k in shard.get("keys", ()) if k in row_of]
        if mine:
            units.append(Unit(len(units), [row_of[k] for k in mine], mine, f"{base}/{len(units):05d}"))
    return units


def row_units(keys: Sequence[str], chunk: int, base: str) -> list[Unit]:
    """Consecutive rows, ``chunk`` at a time."""
    return [Unit(i, list(range(a, min(a + chunk, len(keys)))), list(keys[a:a + chunk]), f"{base}/{i:05d}")
            for i, a in enumerate(range(0, len(keys), chunk))]


def part_done(url: str) -> bool:
    fs, root = fsspec.core.url_to_fs(url)
    return fs.exists(posixpath.join(root, CHECKSUMS))


def write_part(url: str, keys: list[str], dtype: str, fill: Callable) -> None:
    """``fill(write)`` into a local folder, then upload it to ``url`` with its checksums last."""
    fs, root = fsspec.core.url_to_fs(url)
    with tempfile.TemporaryDirectory(prefix="mskfm-part-") as tmp:
        folder = Path(tmp)
        write, close = _writer(folder, len(keys), dtype)
        fill(write)
        close()
        (folder / "keys.json").write_text(json.dumps(keys))
        sums = {p.name: sha256_of(str(p)) for p in sorted(folder.iterdir())}
        (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1))
        fs.makedirs(root, exist_ok=True)
        for p in sorted(folder.iterdir(), key=lambda p: p.name == CHECKSUMS):
            fs.put_file(str(p), posixpath.join(root, p.name))


def read_rows(url: str, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a stored ``.npy`` (local or remote), reading only their bytes."""
    with fsspec.open(url, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in NPY_HEADERS:
            raise FeatureError(f"{url}: .npy format version {version} is not one the cache writes (1.0 or 2.0)")
        shape, fortran, dtype = NPY_HEADERS[version](f)
        if fortran:
            raise FeatureError(f"{url}: Fortran-ordered array; cache entries are C-ordered")
        row = int(np.prod(shape[1:])) * dtype.itemsize
        f.seek(f.tell() + start * row)
        data = f.read((stop - start) * row)
    return np.frombuffer(data, dtype=dtype).reshape(stop - start, *shape[1:])


class ExtractWorker:
    """A Ray actor: backbones loaded once each, then any number of units."""

    def __init__(self, threads: int):
        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.models: dict[tuple, torch.nn.Module] = {}

    def ready(self) -> str:
        return self.device

    def volumes(self, unit: Unit, job: dict) -> tuple[str, int]:
        write_part(unit.url, unit.keys, job["dtype"], lambda write: preprocess_plane(
            job["shards"], job["joint"], job["plane"], job["spec"], unit.keys, job["with_seg"], write))
        return unit.url, len(unit.keys)

    def features(self, unit: Unit, job: dict) -> tuple[str, int]:
        model = self.backbone(job["url"], job["random_seed"], job["backbone_id"])
        volumes = read_rows(job["volumes"], unit.rows[0], unit.rows[-1] + 1)
        write_part(unit.url, unit.keys, job["dtype"], lambda write: extract_features(
            model, volumes, unit.keys, job["feat"], write, self.device, desc=f"features {unit.index}"))
        return unit.url, len(unit.keys)

    def backbone(self, url: str, random_seed: int | None, expected: str) -> torch.nn.Module:
        if (url, random_seed) not in self.models:
            model = load_backbone(url)[0]
            model = random_copy(model, random_seed) if random_seed is not None else model
            if backbone_identity(model) != expected:
                raise FeatureError(f"backbone {url} loaded on a worker differs from the driver's copy "
                                   "(republished while extracting?)")
            self.models[url, random_seed] = model.to(self.device).eval()
        return self.models[url, random_seed]


class RayExtraction:
    """``features.workers`` Ray actors computing missing cache entries of one :class:`FeatureCache`.

    Actors start on the first missing entry (a run whose entries are all cached starts no Ray) and
    stop on ``close``. ``on_part(url)`` is called after each part is written. ``stats`` counts parts
    computed and skipped (complete from an earlier run), the studies of the parts computed, the
    seconds spent computing them (after the actors started) and the actors' start time.
    """

    def __init__(self, cache: FeatureCache, feat, on_part: Callable[[str], None] | None = None):
        self.cache, self.feat, self.on_part = cache, feat, on_part
        self.actors: list = []
        self.stats = {"computed": 0, "skipped": 0, "studies": 0, "seconds": 0.0, "devices": []}

    def __enter__(self) -> "RayExtraction":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.actors:
            import ray

            for actor in self.actors:
                ray.kill(actor)
        self.actors = []

    def _start(self) -> list:
        if not self.actors:
            import ray

            from pretrain.launchers.ray import connect_ray

            connect_ray(log_to_driver=False)
            n = self.feat.workers
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= n else 0
            env = {"env_vars": dict(self.feat.worker_env)} if self.feat.worker_env else None
            worker = ray.remote(num_cpus=max(1, self.feat.worker_threads), num_gpus=gpus,
                                runtime_env=env)(ExtractWorker)
            t0 = time.perf_counter()
            self.actors = [worker.remote(self.feat.worker_threads) for _ in range(n)]
            self.stats["devices"] = ray.get([a.ready.remote() for a in self.actors])
            self.stats["startup_s"] = time.perf_counter() - t0
        return self.actors

    def _run(self, method: str, units: list[Unit], job: dict) -> None:
        from ray.util import ActorPool

        todo = [u for u in units if not part_done(u.url)]
        self.stats["skipped"] += len(units) - len(todo)
        if not todo:
            return
        pool = ActorPool(self._start())
        t0 = time.perf_counter()
        done = pool.map_unordered(lambda a, u: getattr(a, method).remote(u, job), todo)
        for url, n in done:
            self.stats["computed"] += 1
            self.stats["studies"] += n
            if self.on_part:
                self.on_part(url)
        self.stats["seconds"] += time.perf_counter() - t0

    def _parts_base(self, parts: dict, keys: Sequence[str]) -> str:
        return f"{self.cache.url}/.parts/{digest(parts | {'studies': digest(list(keys))})}"

    def volumes(self, folder: Path, keys: list[str], parts: dict, shards: str, joint: str, plane: str,
                spec: dict, with_seg: bool, dtype: str) -> None:
        base = self._parts_base(parts, keys)
        units = shard_units(load_manifest(shards), keys, base)
        self._run("volumes", units, {"shards": shards, "joint": joint, "plane": plane, "spec": spec,
                                     "with_seg": with_seg, "dtype": dtype})
        assemble(folder, keys, units, dtype, base)

    def features(self, folder: Path, keys: list[str], parts: dict, source: dict, feat, dtype: str) -> None:
        base = self._parts_base(parts, keys)
        units = row_units(keys, self.feat.chunk_rows, base)
        self._run("features", units, {**source, "feat": feat, "dtype": dtype})
        assemble(folder, keys, units, dtype, base)


def assemble(folder: Path, keys: Sequence[str], units: list[Unit], dtype: str, base: str) -> None:
    """Write the entry's arrays into ``folder`` from the parts (checked against their checksums), then
    delete the parts. A damaged part is deleted and named: the next run recomputes it."""
    write, close = _writer(folder, len(keys), dtype)
    for unit in units:
        with tempfile.TemporaryDirectory(prefix="mskfm-part-") as tmp:
            local = Path(tmp) / "part"
            fs, root = fsspec.core.url_to_fs(unit.url)
            fs.get(root.rstrip("/") + "/", str(local), recursive=True)
            stored = json.loads((local / "keys.json").read_text()) if (local / "keys.json").exists() else None
            problem = entry_problem(local) or (None if stored == unit.keys else "other studies than planned")
            if problem:
                fs.rm(root, recursive=True)
                raise FeatureError(f"feature part {unit.url} is damaged ({problem}); it was deleted: run again")
            names = json.loads((local / "names.json").read_text())
            arrays = {name: np.load(local / f"{i}.npy", mmap_mode="r") for i, name in enumerate(names)}
            for i, row in enumerate(unit.rows):
                write(row, {name: arrays[name][i] for name in names})
    close()
    fs, root = fsspec.core.url_to_fs(base)
    fs.rm(root, recursive=True)


def run_features(task, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict:
    """``downstream features``: fill the task's feature cache (volumes, features and, with the
    ``random_backbone`` baseline, its features) for every study of the task; writes ``config.yaml`` and
    ``metrics.json`` (entries per plane, parts computed/skipped, studies/s) to ``runs/features/<task>/``."""
    from shards.config import save_config
    from shards.runs import run_dir as make_run_dir
    from shards.runs import write_metrics

    from .data import check_task, load_studies
    from .finetune import resolve_task
    from .inputs import prepare_planes

    task = resolve_task(task, overrides)
    if task.threads:
        torch.set_num_threads(task.threads)
    manifest = check_task(task)
    keys = list(load_studies(task)["key"])
    out = Path(run_dir) if run_dir else make_run_dir("features", task.run_name or task.name)
    out.mkdir(parents=True, exist_ok=True)
    save_config(task, out / "config.yaml")
    cache = FeatureCache(task.cache_dir)
    t0 = time.perf_counter()
    pool = RayExtraction(cache, task.features)
    planes = prepare_planes(task, keys, manifest, cache, pool)
    seconds = time.perf_counter() - t0
    summary = {"task": task.name, "studies": len(keys), "workers": task.features.workers, "seconds": round(seconds, 3),
               "cache": {p: d.cache for p, d in planes.items()},
               "features": {p: {k: list(v.shape[1:]) for k, v in d.features.items()} for p, d in planes.items()},
               "cache_misses": cache.misses, "parts_written": pool.stats["computed"], "parts_skipped": pool.stats["skipped"],
               "workers_stats": pool.stats,
               "dtypes": {"volumes": task.features.volume_dtype, "features": task.features.feature_dtype}}
    write_metrics(out, summary)
    return summary | {"run_dir": str(out)}
