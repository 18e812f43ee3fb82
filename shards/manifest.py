"""The manifest beside the shards: schema version, shards with counts/bytes/sha256, splits, stats."""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Iterable, TypedDict

import fsspec

from .schema import KNOWN_SCHEMA_VERSIONS, SchemaError

MANIFEST_NAME = "manifest.json"


class ShardEntry(TypedDict):
    """One shard of a manifest (``shard_entries`` adds its absolute ``path``)."""

    url: str                 # relative to the manifest's folder
    split: str
    n_samples: int
    bytes: int
    sha256: str
    keys: list[str]          # sample keys, in order
    patients: list[str]      # de-identified patient ids
    stats: dict


class SplitSummary(TypedDict):
    n_samples: int
    n_shards: int
    patients: list[str]


class Manifest(TypedDict, total=False):
    """``manifest.json``: what the writer records and every reader relies on."""

    schema_version: int      # refused unless in KNOWN_SCHEMA_VERSIONS
    kind: str                # "study" or "recon"
    dataset: dict            # v2 study shards: the dataset declaration (shards.dataset.dataset_of reads it)
    created: str
    name: str                # plus the builder's info keys (source, ingest config, ...)
    splits: dict[str, SplitSummary]
    shards: list[ShardEntry]
    stats: dict              # shards.stats.summarize: counts per joint/site/..., per plane shape/spacing/intensity
    _base: str               # set on load: the folder or URL the manifest came from


def manifest_url(source: str) -> str:
    """Accept a manifest path/URL or the folder that holds it."""
    source = str(source)
    return source if source.endswith(".json") else posixpath.join(source.rstrip("/"), MANIFEST_NAME)


def load_manifest(source: str) -> Manifest:
    """Read and check a manifest; refuses a schema version this code does not know."""
    url = manifest_url(source)
    try:
        with fsspec.open(url, "rt") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no shard manifest at {url} (build shards first: `shards build`)") from None
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{url}: manifest is not valid JSON: {exc}") from exc
    version = manifest.get("schema_version")
    if version not in KNOWN_SCHEMA_VERSIONS:
        raise SchemaError(
            f"{url}: shard schema version {version!r} is not supported by this mskfm "
            f"(it reads {', '.join(map(str, KNOWN_SCHEMA_VERSIONS))}); upgrade mskfm or rebuild the shards"
        )
    manifest["_base"] = posixpath.dirname(url)
    return manifest


def shard_entries(manifest: Manifest, split: str | None = None) -> list[ShardEntry]:
    """Shard records (with absolute ``path``) for one split, or all splits when ``split`` is None."""
    entries = [s for s in manifest["shards"] if split is None or s["split"] == split]
    if split is not None and not entries:
        known = sorted({s["split"] for s in manifest["shards"]})
        raise ValueError(f"no shards for split '{split}' in {manifest['_base']}; splits present: {known}")
    base = manifest["_base"]
    return [{**s, "path": posixpath.join(base, s["url"])} for s in entries]


def sha256_of(url: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with fsspec.open(url, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_shards(manifest: dict, split: str | None = None) -> list[str]:
    """Check every shard's size and sha256 against the manifest; returns a list of problems."""
    problems = []
    for entry in shard_entries(manifest, split):
        path = entry["path"]
        try:
            fs, p = fsspec.core.url_to_fs(path)
            size = fs.size(p)
        except FileNotFoundError:
            problems.append(f"{path}: missing")
            continue
        if size != entry["bytes"]:
            problems.append(f"{path}: {size} bytes, manifest says {entry['bytes']}")
            continue
        digest = sha256_of(path)
        if digest != entry["sha256"]:
            problems.append(f"{path}: sha256 {digest[:12]}… != manifest {entry['sha256'][:12]}…")
    return problems


def split_keys(manifest: dict, split: str | None = None) -> list[str]:
    return [k for s in shard_entries(manifest, split) for k in s["keys"]]


def count_samples(entries: Iterable[dict]) -> int:
    return sum(e["n_samples"] for e in entries)
