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

MIN_BINARY = 6
TEXT_SUFFIXES = (".json", ".jsonl", ".txt", ".cls", ".yaml", ".yml", ".csv", ".md", ".html")


class Matcher:
    """Two compiled searches over bytes: whole words in text, long needles anywhere in binary."""

    def __init__(self, needles, skip_kinds=()):
        self.by_value = {n.value.lower().encode(): n for n in needles.items.values() if n.kind not in skip_kinds}
        ordered = sorted(self.by_value, key=len, reverse=True)
        alternation = b"|".join(re.escape(v) for v in ordered) or b"(?!)"
        self.text = re.compile(rb"(?<![A-Za-z0-9])(?:" + alternation + rb")(?![A-Za-z0-9])", re.IGNORECASE)
        long_ = b"|".join(re.escape(v) for v in ordered if len(v) >= MIN_BINARY) or b"(?!)"
        self.binary = re.compile(long_, re.IGNORECASE)

    def find(self, blob: bytes, binary: bool) -> Counter:
        pattern = self.binary if binary else self.text
        return Counter(m.group(0).lower() for m in pattern.finditer(blob))


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
            counts.update(self.matcher.find(part, binary))
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

    needles, read = gather(source, list(tables))
    return {"source_files": read, **scan_shards(shards, needles, include, skip_kinds)}


def format_scan(result: dict) -> str:
    lines = [f"  HIT {h['file']}" + (f" :: {h['member']}" if h["member"] else "")
             + f": {h['kind']} from {h['field']} ({h['count']}x)" for h in result["hits"]]
    verdict = "PHI FOUND" if result["n_hits"] else "no PHI found"
    lines.append(f"scan-phi: {verdict}: {result['n_hits']} hits of {result['needles']} identifying values "
                 f"({', '.join(f'{k} {v}' for k, v in result['needles_by_kind'].items()) or 'none'}) in "
                 f"{result['files']} files, {result['members']} shard members, {result['bytes']:,} bytes")
    return "\n".join(lines)
