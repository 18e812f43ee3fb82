"""Frozen-backbone features, computed once and cached on disk.

A cache entry is a folder ``<cache_dir>/<key>/`` where ``key`` is the sha256 of a JSON of its key
parts: backbone identity (sha256 of config + weights), preprocessing spec, timesteps, blocks, noise
draws, noise seed, shard manifest identity, joint, plane and the list of studies. It holds
``keys.json`` (study order), ``parts.json`` and one ``.npy`` per feature map, read back memory-mapped. Writers build the entry in
a temporary folder and ``os.replace`` it into place, under an ``fcntl`` lock so that concurrent
processes compute it once; readers only ever see complete entries. ``checksums.json`` holds the
sha256 of every other file of the entry: an entry that no longer matches (truncated, altered, or
written before checksums existed) is recomputed with a warning naming it.

``cache_dir`` may be an ``s3://`` (any fsspec) URL: entries are then built in a local mirror
(``~/.cache/mskfm/features/<hash of the URL>/``, read memory-mapped from there) and uploaded file by
file with ``checksums.json`` last, which marks an entry complete; another machine downloads a
complete entry instead of computing it. Arrays are stored as float32, or as float16 where the task
asks for it (``features.volume_dtype`` / ``features.feature_dtype``, part of the entry's key); float16
arrays are read back widened to float32 row by row (:class:`Float32Rows`).
"""

from __future__ import annotations

import fcntl
import posixpath
import hashlib
import json
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import fsspec
import numpy as np
import torch
from tqdm import tqdm

from pretrain.preprocess import preprocess_volume
from pretrain.hub import is_local
from shards.manifest import sha256_of
from shards.reader import ShardReader

from .errors import FeatureError

log = logging.getLogger(__name__)


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def manifest_identity(manifest: dict) -> str:
    """Identity of a shard set: its shards' names, counts and sha256 (not where they are stored)."""
    return digest([{k: s.get(k) for k in ("url", "split", "count", "sha256")} for s in manifest["shards"]])


def backbone_identity(model: torch.nn.Module) -> str:
    """sha256 of the model config and every weight tensor: two loads of one backbone agree."""
    h = hashlib.sha256(json.dumps(dict(getattr(model, "config", {})), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


CHECKSUMS = "checksums.json"
DTYPES = {"float32": np.float32, "float16": np.float16}
MIRROR = "~/.cache/mskfm/features"  # local copies of remote entries; $MSKFM_FEATURE_MIRROR moves it

def entry_problem(folder: Path) -> str | None:
    """Why the cache entry ``folder`` cannot be trusted, or None when every file matches its sha256."""
    try:
        recorded = json.loads((folder / CHECKSUMS).read_text())
    except FileNotFoundError:
        return f"no {CHECKSUMS} (written by an older mskfm or cut short)"
    except ValueError as exc:
        return f"{CHECKSUMS} is unreadable: {exc}"
    present = {p.name for p in folder.iterdir() if p.name != CHECKSUMS}
    if missing := sorted(set(recorded) - present):
        return f"file(s) {', '.join(missing)} missing"
    for name, digest in sorted(recorded.items()):
        if sha256_of(str(folder / name)) != digest:
            return f"file {name} does not match the sha256 recorded when it was written"
    return None


class FeatureCache:
    """Content-addressed on-disk store of per-study arrays. ``hits``/``misses`` count lookups;
    ``recomputed`` counts damaged entries that were rebuilt."""

    def __init__(self, root: str | Path, mirror: str | Path | None = None):
        self.url = str(root).rstrip("/")
        self.remote = not is_local(self.url)
        if self.remote:
            mirror = mirror or os.environ.get("MSKFM_FEATURE_MIRROR") or MIRROR
            self.root = Path(mirror).expanduser() / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        else:
            self.root = Path(self.url.removeprefix("file://"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self.recomputed = 0

    def path(self, parts: dict) -> Path:
        return self.root / digest(parts)

    def entry_url(self, parts: dict, keys: Sequence[str]) -> str:
        """Where the entry for ``parts`` and ``keys`` is stored (the remote URL, or the local folder)."""
        return f"{self.url}/{digest(parts | {'studies': digest(list(keys))})}"

    def _pull(self, final: Path) -> bool:
        """Download a complete remote entry into the mirror; False when there is none (or it is damaged)."""
        fs, root = fsspec.core.url_to_fs(f"{self.url}/{final.name}")
        if not fs.exists(posixpath.join(root, CHECKSUMS)):
            return False
        tmp = self.root / f".{final.name}.pull-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            fs.get(root.rstrip("/") + "/", str(tmp), recursive=True)
            if (problem := entry_problem(tmp)) is not None:
                log.warning("remote feature cache entry %s/%s is damaged (%s): recomputing it", self.url, final.name,
                            problem)
                return False
            os.replace(tmp, final)
            return True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _push(self, final: Path) -> None:
        """Upload an entry; its ``checksums.json`` goes last, so a remote entry without it is incomplete."""
        fs, root = fsspec.core.url_to_fs(f"{self.url}/{final.name}")
        for p in sorted(final.iterdir(), key=lambda p: p.name == CHECKSUMS):
            fs.put_file(str(p), posixpath.join(root, p.name))

    @contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        with open(self.root / f"{key}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def get_or_create(self, parts: dict, keys: Sequence[str],
                      compute: Callable[[Path, list[str]], None]) -> dict[str, np.ndarray]:
        """Arrays of the entry for ``parts`` and the study ``keys`` (their digest joins the key);
        ``compute(tmp_dir, keys)`` fills a missing entry."""
        parts = parts | {"studies": digest(list(keys))}
        final = self.path(parts)
        if final.is_dir() and entry_problem(final) is None:
            self.hits += 1
            return self.load(final, keys)
        with self._lock(final.name):
            if final.is_dir():
                problem = entry_problem(final)
                if problem is None:  # another process has just written it
                    self.hits += 1
                    return self.load(final, keys)
                log.warning("feature cache entry %s is damaged (%s): recomputing it", final, problem)
                self.recomputed += 1
                shutil.rmtree(final)
            if self.remote and self._pull(final):
                self.hits += 1
                return self.load(final, keys)
            self.misses += 1
            tmp = self.root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                compute(tmp, list(keys))
                (tmp / "keys.json").write_text(json.dumps(list(keys)))
                (tmp / "parts.json").write_text(json.dumps(parts, sort_keys=True, default=str, indent=1))
                sums = {p.name: sha256_of(str(p)) for p in sorted(tmp.iterdir())}
                (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            if self.remote:
                self._push(final)
        return self.load(final, keys)

    @staticmethod
    def load(folder: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
        stored = json.loads((folder / "keys.json").read_text())
        if stored != list(keys):
            raise FeatureError(f"cache entry {folder} holds other studies than requested; delete it")
        names = json.loads((folder / "names.json").read_text())
        return {name: widened(np.load(folder / f"{i}.npy", mmap_mode="r")) for i, name in enumerate(names)}


class Float32Rows:
    """A float16 memory-mapped array read as float32: ``a[rows]`` widens only the rows asked for."""

    dtype = np.dtype(np.float32)

    def __init__(self, stored: np.ndarray):
        self.stored = stored
        self.shape, self.ndim = stored.shape, stored.ndim

    def __len__(self) -> int:
        return len(self.stored)

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(self.stored[index], dtype=np.float32)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self.stored, dtype=dtype or np.float32)


def widened(arr: np.ndarray):
    return Float32Rows(arr) if arr.dtype == np.float16 else arr


def stored_parts(parts: dict, dtype: str) -> dict:
    """The key parts of an entry stored as ``dtype`` (float32 entries keep their historic key)."""
    return parts if dtype == "float32" else parts | {"dtype": dtype}


def _writer(folder: Path, n: int, dtype: str = "float32"):
    """Lazily opened memmaps, one per array name, created on the first row. Float16 storage refuses
    values outside its range (they would become inf)."""
    arrays: dict[str, np.memmap] = {}
    rows: set[int] = set()
    kind = DTYPES[dtype]

    def write(row: int, named: dict[str, np.ndarray]) -> None:
        rows.add(row)
        for name, arr in named.items():
            if name not in arrays:
                arrays[name] = np.lib.format.open_memmap(folder / f"{len(arrays)}.npy", mode="w+",
                                                         dtype=kind, shape=(n, *arr.shape))
            if kind is np.float16 and np.abs(arr).max(initial=0) > np.finfo(np.float16).max:
                raise FeatureError(f"'{name}' of row {row} exceeds the float16 range (|x| up to "
                                   f"{np.abs(arr).max():.4g}); store it as float32")
            arrays[name][row] = arr

    def close() -> None:
        if len(rows) != n:
            raise FeatureError(f"{n - len(rows)} of {n} studies were not found in the shards while caching")
        for arr in arrays.values():
            arr.flush()
        (folder / "names.json").write_text(json.dumps(list(arrays)))

    return write, close


def iter_plane(shards: str, joint: str, plane: str, keys: Sequence[str],
               fields: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """(row, sample) for every study in ``keys`` that has ``plane``, all splits (only shards holding
    one of ``keys`` are read)."""
    row_of = {k: i for i, k in enumerate(keys)}
    reader = ShardReader(shards, split=None, fields=(plane, *fields), require=(plane,), joints=[joint],
                         keys=row_of, rank=0, world_size=1)
    for sample in reader:
        if sample["__key__"] in row_of:
            yield row_of[sample["__key__"]], sample


def volume_parts(manifest_id: str, joint: str, plane: str, spec: dict, with_seg: bool) -> dict:
    return {"kind": "volumes", "manifest": manifest_id, "joint": joint, "plane": plane,
            "preprocess": spec, "seg": with_seg}


def preprocess_plane(shards: str, joint: str, plane: str, spec: dict, keys: Sequence[str], with_seg: bool,
                     write) -> None:
    """``write(row, {"image": (1, *shape)[, "seg": ...]})`` for every study of ``keys``, streamed from the shards."""
    fields = (f"{plane}.seg",) if with_seg else ()
    for row, sample in tqdm(iter_plane(shards, joint, plane, keys, fields), total=len(keys),
                            desc=f"preprocess {plane}", leave=False):
        named = {"image": preprocess_volume(sample[plane], spec).numpy()}
        if with_seg:
            named["seg"] = resample_labels(sample[f"{plane}.seg"], spec["shape"])[None]
        write(row, named)


def cached_volumes(cache: FeatureCache, shards: str, manifest_id: str, joint: str, plane: str,
                   spec: dict, keys: Sequence[str], with_seg: bool = False, dtype: str = "float32",
                   workers=None) -> dict[str, np.ndarray]:
    """Preprocessed volumes ``{"image": (N, 1, *shape)}`` (and ``"seg"`` resampled nearest), stored as
    ``dtype``; a missing entry is computed here, or from parts by ``workers`` (:class:`downstream.extract.RayExtraction`)."""
    parts = stored_parts(volume_parts(manifest_id, joint, plane, spec, with_seg), dtype)

    def compute(folder: Path, keys: list[str]) -> None:
        if workers is not None:
            return workers.volumes(folder, keys, parts, shards, joint, plane, spec, with_seg, dtype)
        write, close = _writer(folder, len(keys), dtype)
        preprocess_plane(shards, joint, plane, spec, keys, with_seg, write)
        close()

    return cache.get_or_create(parts, keys, compute)


def resample_labels(seg: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling of a label map to ``shape`` (keeps label values, incl. ignore)."""
    t = torch.as_tensor(seg.astype(np.float32))[None, None]
    out = torch.nn.functional.interpolate(t, size=tuple(int(s) for s in shape), mode="nearest")
    return out[0, 0].numpy().astype(np.float32)


def feature_parts(backbone_id: str, spec: dict, feat, manifest_id: str, joint: str, plane: str) -> dict:
    return {"kind": "features", "backbone": backbone_id, "preprocess": spec,
            "timesteps": [int(t) for t in feat.timesteps], "blocks": list(feat.blocks),
            "noise_draws": int(feat.noise_draws), "seed": int(feat.seed), "manifest": manifest_id,
            "joint": joint, "plane": plane}


@torch.no_grad()
def extract_features(model, volumes: np.ndarray, keys: Sequence[str], feat, write, device: str = "cpu",
                     desc: str = "features") -> None:
    """Run the frozen backbone over preprocessed ``volumes`` in batches of ``feat.batch_size`` rows
    (from row 0); refuses NaN/inf features."""
    model.eval().to(device)
    for start in tqdm(range(0, len(keys), feat.batch_size), desc=desc, leave=False):
        stop = min(start + feat.batch_size, len(keys))
        x = torch.from_numpy(np.array(volumes[start:stop], dtype=np.float32)).to(device)
        maps = model.features(x, list(feat.timesteps), list(feat.blocks), feat.noise_draws, feat.seed)
        for name, t in maps.items():
            bad = (~torch.isfinite(t)).flatten(1).any(dim=1)
            if bad.any():
                key = keys[start + int(bad.nonzero()[0, 0])]
                raise FeatureError(f"backbone features '{name}' are NaN or infinite for study {key}")
        for i in range(stop - start):
            write(start + i, {name: t[i].float().cpu().numpy() for name, t in sorted(maps.items())})


def cached_features(cache: FeatureCache, model, backbone_id: str, volumes: np.ndarray, spec: dict, feat,
                    manifest_id: str, joint: str, plane: str, keys: Sequence[str],
                    device: str = "cpu", workers=None, source: dict | None = None) -> dict[str, np.ndarray]:
    """``{f"t{t}/{block}": (N, C, d, h, w)}`` memory-mapped, computed on the first call only: here, or
    by ``workers`` from ``source`` (``{"url", "random_seed", "volumes"}``: the backbone to load, the
    seed of a random copy or None, the volumes entry's URL)."""
    dtype = feat.feature_dtype
    parts = stored_parts(feature_parts(backbone_id, spec, feat, manifest_id, joint, plane), dtype)

    def compute(folder: Path, keys: list[str]) -> None:
        if workers is not None:
            return workers.features(folder, keys, parts, source | {"backbone_id": backbone_id}, feat, dtype)
        write, close = _writer(folder, len(keys), dtype)
        extract_features(model, volumes, keys, feat, write, device, desc=f"features {plane}")
        close()

    return cache.get_or_create(parts, keys, compute)
