"""``shards scan-phi <shards> --source <export dir>``: look for the export's identifying values in
every byte of every shard member and of every file that travels with the shards.

Needles come from :func:`shards.ingest.phi_sources.gather`. Each file of the shard folder (tars,
``manifest.json``, the writer's journal, anything else) and each ``--include`` path is read whole:
a tar member by member (name, owner and pax headers, content). Text (JSON, YAML, npy headers...) is
searched case-insensitively for every needle as a whole word; binary content (array data) for the
needles of 6+ characters, so random pixel bytes do not raise false alarms. A hit names the file, the
member, the needle's kind and the field it came from — never the value.
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np

MIN_BINARY = 6
PREFIX = 8
TEXT_SUFFIXES = (".json", ".jsonl", ".txt", ".cls", ".yaml", ".yml", ".csv", ".md", ".html")
_TOKEN = re.compile(rb"[a-z0-9]+")
# Values the platform generates that may look like a source value: shard names (``train-000123.tar``
# vs a zero-padded StudyID or file name), ``study_date`` (under ``deid.dates=shift`` a shifted
# date can equal another study's real one; the shift has its own test) and the manifest's
# ``created`` time (today may be a study date of the export). Blanked before matching.
GENERATED = re.compile(rb'[A-Za-z0-9_]+-\d{6}\.tar(?:\.tmp)?|"(?:study_date|created)":\s*"[^"]*"')


class Matcher:
    """Needles looked up by hash, not by one huge regex (an export gives 10^5 UIDs). Text: at the
    start of every word, by the needle's first (up to) 8 characters. Binary: within runs of 6+ bytes
    drawn from the needles' own alphabet (array data has few), by the needle's first 6 bytes."""

    def __init__(self, needles, skip_kinds=()):
        self.by_value: dict[bytes, object] = {}
        for n in needles.items.values():
            value = n.value.lower().encode("utf-8", "replace").strip(b" ()+[]{}'\"")
            if n.kind not in skip_kinds and _TOKEN.match(value):
                self.by_value.setdefault(value, n)
        self.by_prefix: dict[bytes, list[bytes]] = {}
        self.by_head: dict[bytes, list[bytes]] = {}
        for value in sorted(self.by_value, key=len, reverse=True):
            self.by_prefix.setdefault(value[:PREFIX], []).append(value)
            if len(value) >= MIN_BINARY:
                self.by_head.setdefault(value[:MIN_BINARY], []).append(value)
        self.prefix_lengths = sorted({len(k) for k in self.by_prefix}, reverse=True)
        self.starts = {v[:3] for v in self.by_value}  # most words start no needle: one lookup
        alphabet = set(b"".join(v for vs in self.by_head.values() for v in vs))
        self.alphabet = np.zeros(256, bool)  # bytes that occur in a needle, in either case
        for c in alphabet:
            self.alphabet[[c, ord(chr(c).upper()) if chr(c).upper().isascii() else c]] = True

    def find(self, blob: bytes, binary: bool) -> Counter:
        if binary:
            return Counter(self._binary(blob)) if self.by_head else Counter()
        return Counter(self._text(blob.lower()))

    def _text(self, low: bytes):
        """The longest whole-word needle at the start of each word."""
        for token in _TOKEN.finditer(low):
            i = token.start()
            if low[i:i + 3] not in self.starts:
                continue
            for value in (v for n in self.prefix_lengths for v in self.by_prefix.get(low[i:i + n], ())):
                end = i + len(value)
                if low.startswith(value, i) and not low[end:end + 1].isalnum():
                    yield value
                    break

    def _binary(self, blob: bytes):
        """Needles of 6+ bytes anywhere, searched only in runs of needle-alphabet bytes (numpy finds them)."""
        ok = self.alphabet[np.frombuffer(blob, np.uint8)].astype(np.int8)
        edges = np.diff(np.concatenate(([0], ok, [0])))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        long_ = ends - starts >= MIN_BINARY
        for a, b in zip(starts[long_].tolist(), ends[long_].tolist()):
            text = blob[a:b].lower()
            for i in range(len(text) - MIN_BINARY + 1):
                for value in self.by_head.get(text[i:i + MIN_BINARY], ()):
                    if text.startswith(value, i):
                        yield value
                        break


def _is_text(name: str, blob: bytes) -> bool:
    if name.lower().endswith(TEXT_SUFFIXES):
        return True
    try:
        blob.decode("utf-8")
        return b"\x00" not in blob[:4096]
    except UnicodeDecodeError:
        return False


def _member_parts(name: str, blob: bytes) -> list[tuple[bytes, bool]]:
    """(bytes, binary?) pieces of a member: an .npy is its text header and its binary data."""
    if blob.startswith(b"\x93NUMPY"):
        header_end = blob.find(b"\n", 10) + 1 or len(blob)
        return [(blob[:header_end], False), (blob[header_end:], True)]
    return [(blob, not _is_text(name, blob))]


class Scan:
    def __init__(self, matcher: Matcher):
        self.matcher = matcher
        self.hits: list[dict] = []
        self.files = self.members = self.bytes = 0

    def _record(self, counts: Counter, file: str, member: str | None) -> None:
        for value, n in sorted(counts.items()):
            needle = self.matcher.by_value.get(value)
            kind, field = (needle.kind, needle.field) if needle else ("?", "?")
            self.hits.append({"file": file, "member": member, "kind": kind, "field": field, "count": n})

    def blob(self, blob: bytes, name: str, file: str, member: str | None) -> None:
        self.bytes += len(blob)
        counts = Counter()
        for part, binary in _member_parts(name, blob):
            counts.update(self.matcher.find(part if binary else GENERATED.sub(b" ", part), binary))
        self._record(counts, file, member)

    def tar(self, f, file: str) -> None:
        with tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                self.members += 1
                header = " ".join([info.name, info.linkname, info.uname, info.gname,
                                   json.dumps(info.pax_headers)]).encode()
                self._record(self.matcher.find(header, False), file, f"{info.name} (tar header)")
                if info.isfile():
                    self.blob(tar.extractfile(info).read(), info.name, file, info.name)

    def path(self, url: str, label: str) -> None:
        self.files += 1
        with fsspec.open(url, "rb") as f:
            if url.endswith((".tar", ".tar.tmp")):
                try:
                    return self.tar(f, label)
                except tarfile.TarError:  # not a readable tar: scan its bytes as they are
                    f.seek(0)
            self.blob(f.read(), label, label, None)


def _files(url: str) -> list[tuple[str, str]]:
    """(url, label) of every file at ``url`` (a file, or a folder searched recursively)."""
    fs, root = fsspec.core.url_to_fs(str(url))
    if fs.isfile(root):
        return [(str(url), posixpath.basename(root))]
    if not fs.isdir(root):
        raise FileNotFoundError(f"scan-phi: nothing at {url}")
    return [(fs.unstrip_protocol(p), posixpath.relpath(p, root)) for p in sorted(fs.find(root))]


def scan_shards(shards: str | Path, needles, include: list[str | Path] = (), skip_kinds=()) -> dict:
    """Search every file under ``shards`` and each ``include`` path; returns the scan result."""
    scan = Scan(Matcher(needles, skip_kinds))
    for url, label in _files(str(shards)):
        scan.path(url, label)
    for extra in include:
        for url, label in _files(str(extra)):
            scan.path(url, f"{Path(str(extra)).name}/{label}" if label != Path(str(extra)).name else label)
    kinds = Counter(n.kind for n in needles.items.values() if n.kind not in skip_kinds)
    return {"needles": sum(kinds.values()), "needles_by_kind": dict(sorted(kinds.items())),
            "skipped_kinds": list(skip_kinds), "files": scan.files, "members": scan.members,
            "bytes": scan.bytes, "n_hits": sum(h["count"] for h in scan.hits), "hits": scan.hits}


def scan_phi(shards: str | Path, source: str | Path | None, tables: list[str | Path] = (),
             include: list[str | Path] = (), skip_kinds=()) -> dict:
    """Gather needles from ``source`` (and ``tables``), then :func:`scan_shards`."""
    from .ingest.phi_sources import gather

    needles, read = gather(source, list(tables), _declared(shards))
    return {"source_files": read, **scan_shards(shards, needles, include, skip_kinds)}


def _declared(shards: str | Path) -> set[str]:
    """The words of the shard set's dataset declaration (none when it has no manifest yet)."""
    from .dataset import dataset_of, declared_words
    from .manifest import load_manifest

    try:
        manifest = load_manifest(shards)
    except (FileNotFoundError, ValueError):
        return set()
    return declared_words(dataset_of(manifest)) if manifest.get("kind") == "study" else set()


def format_scan(result: dict) -> str:
    lines = [f"  HIT {h['file']}" + (f" :: {h['member']}" if h["member"] else "")
             + f": {h['kind']} from {h['field']} ({h['count']}x)" for h in result["hits"]]
    verdict = "PHI FOUND" if result["n_hits"] else "no PHI found"
    lines.append(f"scan-phi: {verdict}: {result['n_hits']} hits of {result['needles']} identifying values "
                 f"({', '.join(f'{k} {v}' for k, v in result['needles_by_kind'].items()) or 'none'}) in "
                 f"{result['files']} files, {result['members']} shard members, {result['bytes']:,} bytes")
    return "\n".join(lines)
