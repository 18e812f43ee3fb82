"""Atomic, resumable WebDataset shard writer.

Each split gets its own sequence of shards ``<split>-NNNNNN.tar``. A shard is written under
``<name>.tar.tmp`` and renamed only once complete; its record (samples, bytes, sha256, keys, stats)
is then appended to ``_progress.jsonl``. A rerun after a crash deletes stray ``.tmp`` files, reads
the journal, skips every key already in a finished shard and carries on numbering. ``close()``
writes ``manifest.json`` atomically from the journal.

A writer holds an exclusive lock on its folder (:mod:`shards.lock`) from construction to
``close()``, so a second build or ingest into the folder is refused naming the first. What the
folder holds is described by ``info`` (kind, name, source, config), saved in ``_info.json`` with the
first finished shard: a rerun whose ``info`` differs (other than in ``resume_ignore``) is refused,
naming the changed keys (see :mod:`shards.resume`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import webdataset as wds

from . import lock
from . import stats as stats_mod
from .manifest import MANIFEST_NAME
from .resume import check_resume
from .schema import SCHEMA_VERSION, SchemaError, encode_sample

JOURNAL_NAME = "_progress.jsonl"
INFO_NAME = "_info.json"
MANIFEST_OWN_KEYS = ("schema_version", "created", "splits", "shards", "stats")


def saved_info(out_dir: str | Path) -> dict | None:
    """What a shard folder was written with: ``_info.json``, else a finished manifest's info."""
    out_dir = Path(out_dir)
    for name in (INFO_NAME, MANIFEST_NAME):
        if (out_dir / name).is_file():
            saved = json.loads((out_dir / name).read_text())
            return {k: v for k, v in saved.items() if k not in MANIFEST_OWN_KEYS}
    return None


def check_resumable(out_dir: str | Path, kind: str, info: dict, ignore=()) -> None:
    """Refuse to add to a shard folder written with another kind, source or configuration."""
    check_resume(saved_info(out_dir), {"kind": kind, **info}, out_dir, "shard set", ignore=ignore,
                 fix="write to another folder or remove this one")


class _HashingFile:
    """A write-only file wrapper that hashes and counts bytes as they go to disk."""

    def __init__(self, path: Path):
        self._f = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


class _OpenShard:
    def __init__(self, out_dir: Path, split: str, index: int):
        self.name = f"{split}-{index:06d}.tar"
        self.final = out_dir / self.name
        self.tmp = out_dir / (self.name + ".tmp")
        self.file = _HashingFile(self.tmp)
        self.tar = wds.TarWriter(self.file, encoder=False, mtime=0.0)
        self.split = split
        self.keys: list[str] = []
        self.patients: set[str] = set()
        self.stats = stats_mod.empty_stats()

    def finish(self) -> dict:
        self.tar.close()  # closes self.file too
        os.replace(self.tmp, self.final)
        return {"url": self.name, "split": self.split, "n_samples": len(self.keys),
                "bytes": self.file.bytes, "sha256": self.file.sha256.hexdigest(),
                "keys": self.keys, "patients": sorted(self.patients), "stats": self.stats}


class ShardWriter:
    """Write samples to per-split shards in ``out_dir``; resumable and atomic per shard.

    ``max_bytes`` and ``max_count`` bound each shard (whichever comes first). Use as a context
    manager or call :meth:`close` to write the manifest. ``info`` (name, config, source...) is stored
    in the manifest as is; ``resume_ignore`` names its keys that may change between runs.
    """

    def __init__(self, out_dir: str | Path, *, kind: str = "study", max_bytes: int = 1_000_000_000,
                 max_count: int = 100_000, info: dict | None = None, resume_ignore=()):
        if kind not in ("study", "recon"):
            raise ValueError(f"unknown shard kind '{kind}'; known: study, recon")
        self.out_dir = Path(out_dir)
        lock.acquire(self.out_dir)
        try:
            check_resumable(self.out_dir, kind, info or {}, resume_ignore)
        except BaseException:
            lock.release(self.out_dir)
            raise
        self.kind, self.max_bytes, self.max_count = kind, int(max_bytes), int(max_count)
        self.info = info or {}
        self.journal_path = self.out_dir / JOURNAL_NAME
        self._open: dict[str, _OpenShard] = {}
        self._written: set[str] = set()
        for stray in self.out_dir.glob("*.tar.tmp"):
            stray.unlink()
        self.finished: list[dict] = self._read_journal()
        self.done_keys = {k for rec in self.finished for k in rec["keys"]}
        self._next_index = {}
        for rec in self.finished:
            split, idx = rec["url"][: -len(".tar")].rsplit("-", 1)
            self._next_index[split] = max(self._next_index.get(split, 0), int(idx) + 1)
        self.resumed_samples = len(self.done_keys)

    def _read_journal(self) -> list[dict]:
        if not self.journal_path.exists():
            return []
        records = []
        for line in self.journal_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a crash mid-append: that shard is rewritten
            if (self.out_dir / rec["url"]).exists():
                records.append(rec)
        return records

    def done(self, key: str) -> bool:
        """True when ``key`` is already in a finished shard (skip it on resume)."""
        return key in self.done_keys

    def write(self, sample: dict[str, Any], split: str) -> None:
        """Add a sample; keys already in finished shards are skipped (resume), a key written twice
        in this run is an error (two samples under one key would corrupt the shard)."""
        key = sample["__key__"]
        if key in self.done_keys:
            return
        if key in self._written:
            raise SchemaError(f"duplicate sample key '{key}' in {self.out_dir}")
        self._written.add(key)
        shard = self._open.get(split)
        if shard is None:
            shard = self._open[split] = _OpenShard(self.out_dir, split, self._next_index.get(split, 0))
            self._next_index[split] = self._next_index.get(split, 0) + 1
        shard.tar.write(encode_sample(sample))
        shard.keys.append(key)
        if "patient" in sample.get("meta", {}):
            shard.patients.add(str(sample["meta"]["patient"]))
        stats_mod.add_sample(shard.stats, sample, split)
        if len(shard.keys) >= self.max_count or shard.file.bytes >= self.max_bytes:
            self._finish(split)

    def _finish(self, split: str) -> None:
        record = self._open.pop(split).finish()
        if not (self.out_dir / INFO_NAME).is_file():
            tmp = self.out_dir / (INFO_NAME + ".tmp")
            tmp.write_text(json.dumps({"kind": self.kind, **self.info}, indent=1))
            os.replace(tmp, self.out_dir / INFO_NAME)
        with open(self.journal_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.finished.append(record)
        self.done_keys.update(record["keys"])

    def close(self) -> dict:
        """Finish open shards and write ``manifest.json`` (atomically); returns the manifest."""
        for split in list(self._open):
            self._finish(split)
        total = stats_mod.empty_stats()
        for rec in self.finished:
            total = stats_mod.merge(total, rec["stats"])
        shards = sorted(({k: v for k, v in rec.items() if k not in ("stats", "patients")}
                         for rec in self.finished), key=lambda r: r["url"])
        splits: dict[str, dict] = {}
        for rec in self.finished:
            s = splits.setdefault(rec["split"], {"n_samples": 0, "n_shards": 0, "patients": set()})
            s["n_samples"] += rec["n_samples"]
            s["n_shards"] += 1
            s["patients"].update(rec.get("patients", []))
        for s in splits.values():
            s["patients"] = sorted(s["patients"])
        manifest = {"schema_version": SCHEMA_VERSION, "kind": self.kind,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    **self.info, "splits": splits, "shards": shards,
                    "stats": stats_mod.summarize(total)}
        tmp = self.out_dir / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self.out_dir / MANIFEST_NAME)
        self.release()
        return manifest

    def release(self) -> None:
        """Drop this writer's lock on the folder (``close()`` and an exception do it too)."""
        if not getattr(self, "_released", False):
            self._released = True
            lock.release(self.out_dir)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # leave finished shards and the journal for the rerun; drop the partial ones
            for shard in self._open.values():
                shard.tar.close()
                shard.tmp.unlink(missing_ok=True)
            self._open.clear()
            self.release()
