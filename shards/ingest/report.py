"""The ingest report: what came in, what was skipped and why (one entry per file or study), and
warnings. It names source paths (relative to the input folder), so it is written to the run
folder beside the source data, never into the shard folder.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPORT_NAME = "ingest_report.json"


@dataclass
class IngestReport:
    command: str
    source: str
    files_seen: int = 0
    studies_found: int = 0
    ingested: list[dict] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    tables: dict = field(default_factory=dict)
    # the declaration ingested with: {"source": "declared"|"inferred", "declaration": {...}, ...}
    dataset: dict = field(default_factory=dict)
    contradictions: list[dict] = field(default_factory=list)  # data vs declaration, one entry per study and problem
    phi_scan: dict = field(default_factory=dict)  # shards.phi_scan result over the shard folder

    def skip(self, where: str, code: str, reason: str, study: str | None = None) -> None:
        """Record a file (or study, when ``where`` is a study key) that did not make it in."""
        entry = {"path": where, "code": code, "reason": reason}
        if study:
            entry["study"] = study
        self.skipped.append(entry)

    def warn(self, where: str, message: str) -> None:
        self.warnings.append({"path": where, "message": message})

    def contradict(self, study: str, problem: str) -> None:
        """Record where a study contradicts the dataset declaration (the value is not kept)."""
        self.contradictions.append({"study": study, "problem": problem})

    def ingest(self, key: str, planes: dict[str, str], files: int) -> None:
        self.ingested.append({"study": key, "planes": planes, "files": files})

    @property
    def n_usable(self) -> int:
        return len(self.ingested) + len(self.resumed)

    def counts(self) -> dict:
        table_problems = sum(len(v.get("problems", [])) for v in self.tables.values())
        return {"files_seen": self.files_seen, "studies_found": self.studies_found,
                "studies_ingested": len(self.ingested), "studies_resumed": len(self.resumed),
                "skipped": len(self.skipped), "warnings": len(self.warnings),
                "table_problems": table_problems, "contradictions": len(self.contradictions),
                "phi_hits": self.phi_scan.get("n_hits", 0),
                "skipped_by_code": dict(sorted(Counter(s["code"] for s in self.skipped).items()))}

    def failed(self, strict: bool) -> bool:
        """Non-zero exit: nothing usable came out, identifying values reached the shard folder, or
        strict and anything was skipped, a table has problems or data contradicts the declaration."""
        counts = self.counts()
        return (self.n_usable == 0 or counts["phi_hits"] > 0 or "error" in self.phi_scan
                or (strict and bool(counts["skipped"] or counts["table_problems"] or counts["contradictions"])))

    def to_dict(self) -> dict:
        return {"command": self.command, "source": self.source,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "counts": self.counts(), "ingested": self.ingested, "resumed": self.resumed,
                "skipped": self.skipped, "warnings": self.warnings, "tables": self.tables,
                "dataset": self.dataset, "contradictions": self.contradictions, "phi_scan": self.phi_scan}

    def write(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / REPORT_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        return path

    def summary(self) -> str:
        c = self.counts()
        lines = [f"ingest {self.command}: {c['studies_ingested']} studies ingested, "
                 f"{c['studies_resumed']} already done, {c['skipped']} skipped, "
                 f"{c['warnings']} warnings, {c['table_problems']} table problems, "
                 f"{c['contradictions']} contradictions of the {self.dataset.get('source', '')} declaration "
                 f"({c['files_seen']} files seen)"]
        lines += [f"  skipped {code}: {n}" for code, n in c["skipped_by_code"].items()]
        if "error" in self.phi_scan:
            lines.append(f"scan-phi: could not run ({self.phi_scan['error']}): run `shards scan-phi` on the shards")
        elif self.phi_scan:
            from ..phi_scan import format_scan

            lines.append(format_scan(self.phi_scan))
        return "\n".join(lines)
