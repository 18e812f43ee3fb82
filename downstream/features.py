"""Frozen-backbone features, computed once and cached on disk.

A cache entry is a folder ``<cache_dir>/<key>/`` where ``key`` is the sha256 of a JSON of its key
parts: backbone identity (sha256 of config + weights), preprocessing spec, timesteps, blocks, noise
draws, noise seed, shard manifest identity, joint, plane and the list of studies. It holds
``keys.json`` (study order), ``parts.json`` and one ``.npy`` per feature map, read back memory-mapped. Writers build the entry in
a temporary folder and ``os.replace`` it into place, under an ``fcntl`` lock so that concurrent
processes compute it once; readers only ever see complete entries. ``checksums.json`` holds the
sha256 of every other file of the entry: an entry that no longer matches (truncated, altered, or
written before checksums existed) is recomputed with a warning naming it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pretrain.preprocess import preprocess_volume
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

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self.recomputed = 0

    def path(self, parts: dict) -> Path:
        return self.root / digest(parts)

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
        return self.load(final, keys)

    @staticmethod
    def load(folder: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
        stored = json.loads((folder / "keys.json").read_text())
        if stored != list(keys):
            raise FeatureError(f"cache entry {folder} holds other studies than requested; delete it")
        names = json.loads((folder / "names.json").read_text())
        return {name: np.load(folder / f"{i}.npy", mmap_mode="r") for i, name in enumerate(names)}


def _writer(folder: Path, n: int):
    """Lazily opened memmaps, one per array name, created on the first row."""
    arrays: dict[str, np.memmap] = {}
    rows: set[int] = set()

    def write(row: int, named: dict[str, np.ndarray]) -> None:
        rows.add(row)
        for name, arr in named.items():
            if name not in arrays:
                arrays[name] = np.lib.format.open_memmap(folder / f"{len(arrays)}.npy", mode="w+",
                                                         dtype=np.float32, shape=(n, *arr.shape))
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
    """(row, sample) for every study in ``keys`` that has ``plane``, all splits."""
    row_of = {k: i for i, k in enumerate(keys)}
    reader = ShardReader(shards, split=None, fields=(plane, *fields), require=(plane,), joints=[joint],
                         rank=0, world_size=1)
    for sample in reader:
        if sample["__key__"] in row_of:
            yield row_of[sample["__key__"]], sample


def volume_parts(manifest_id: str, joint: str, plane: str, spec: dict, with_seg: bool) -> dict:
    return {"kind": "volumes", "manifest": manifest_id, "joint": joint, "plane": plane,
            "preprocess": spec, "seg": with_seg}


def cached_volumes(cache: FeatureCache, shards: str, manifest_id: str, joint: str, plane: str,
                   spec: dict, keys: Sequence[str], with_seg: bool = False) -> dict[str, np.ndarray]:
    """Preprocessed volumes ``{"image": (N, 1, *shape)}`` (and ``"seg"`` resampled nearest)."""
    def compute(folder: Path, keys: list[str]) -> None:
        write, close = _writer(folder, len(keys))
        fields = (f"{plane}.seg",) if with_seg else ()
        for row, sample in tqdm(iter_plane(shards, joint, plane, keys, fields), total=len(keys),
                                desc=f"preprocess {plane}", leave=False):
            named = {"image": preprocess_volume(sample[plane], spec).numpy()}
            if with_seg:
                named["seg"] = resample_labels(sample[f"{plane}.seg"], spec["shape"])[None]
            write(row, named)
        close()

    return cache.get_or_create(volume_parts(manifest_id, joint, plane, spec, with_seg), keys, compute)


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
    """Run the frozen backbone over preprocessed ``volumes`` in batches; refuses NaN/inf features."""
    model.eval().to(device)
    for start in tqdm(range(0, len(keys), feat.batch_size), desc=desc, leave=False):
        stop = min(start + feat.batch_size, len(keys))
        x = torch.from_numpy(np.array(volumes[start:stop])).to(device)
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
                    device: str = "cpu") -> dict[str, np.ndarray]:
    """``{f"t{t}/{block}": (N, C, d, h, w)}`` memory-mapped, computed on the first call only."""
    def compute(folder: Path, keys: list[str]) -> None:
        write, close = _writer(folder, len(keys))
        extract_features(model, volumes, keys, feat, write, device, desc=f"features {plane}")
        close()

    parts = feature_parts(backbone_id, spec, feat, manifest_id, joint, plane)
    return cache.get_or_create(parts, keys, compute)
