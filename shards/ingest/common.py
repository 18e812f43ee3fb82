"""What every ingest shares: studies found in a source become study samples, joined to label
and EHR tables, split by patient and written with the resumable :class:`ShardWriter`.

A source (DICOM, NIfTI) yields :class:`FoundStudy` records whose pixels are not read yet; a study
already in a finished shard is skipped before :meth:`FoundStudy.load` decodes anything. Samples are
checked against the dataset declaration (given or inferred, :mod:`.declare`): a value that contradicts
it is reported per study and not kept (a label or EHR value becomes unknown, a label map is dropped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from .. import lock
from ..config import to_dict
from ..dataset import DatasetDeclaration, check_sample
from ..runs import run_dir, write_run
from ..schema import SchemaError, validate_study
from ..splits import assign_split
from ..writer import ShardWriter, check_resumable
from .config import IngestConfig
from .declare import resolve_dataset
from .report import IngestReport
from .tables import TableJoin, labels_for

# ingest keys that may change when an ingest is resumed (everything else must match the shards)
RESUME_IGNORE = ("ingest_config.strict",)


@dataclass
class FoundStudy:
    key: str                     # s-… (keyed hash of the study id)
    patient: str                 # p-… (keyed hash of the patient id)
    joint: str
    meta: dict                   # de-identified study meta without planes/split
    join_keys: dict[str, str]    # study / patient / accession -> the key a table row maps to
    n_files: int
    # Decodes the chosen stacks: returns {plane: volume}, {plane: plane meta}, {plane.seg: map}
    load: Callable[[IngestReport], tuple[dict, dict, dict]]
    ehr: dict = field(default_factory=dict)  # from the headers (retained patient characteristics)
    # Local only, never written to a shard: the source files (relative to the input folder) and,
    # filled by ``load``, per plane where its volume came from and its geometry (``predict`` writes
    # label maps back in it and keeps a private map from study key to source).
    sources: list[str] = field(default_factory=list)
    origin: dict = field(default_factory=dict)
    # the label-map values of the study (read only to infer a declaration when none is given)
    label_values: Callable[[], set[int]] | None = None


def run_dir_of(cfg: IngestConfig, command: str) -> Path:
    """``run_dir`` if set, else ``$MSKFM_RUNS/<command>/<name>`` like every other command."""
    if cfg.run_dir:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        return Path(cfg.run_dir)
    return run_dir(command, cfg.name or Path(cfg.out).name or "ingest")


def open_tables(cfg: IngestConfig, to_key: Callable[[str, str], str],
                dataset: DatasetDeclaration) -> dict[str, TableJoin]:
    tables = {}
    for kind, tcfg in (("labels", cfg.labels), ("ehr", cfg.ehr)):
        if tcfg.path:
            tables[kind] = TableJoin(tcfg, kind, to_key, dataset, cfg.deid.keep_free_text)
    return tables


def _sample(study: FoundStudy, split: str, volumes: dict, planes: dict, segs: dict,
            tables: dict[str, TableJoin], dataset: DatasetDeclaration) -> dict:
    meta = {**study.meta, "study": study.key, "patient": study.patient, "joint": study.joint,
            "split": split, "planes": planes}
    sample = {"__key__": study.key, "meta": meta, **volumes, **segs}
    if "labels" in tables:
        sample["labels"] = labels_for(dataset, study.joint, tables["labels"].lookup(study.key, study.join_keys))
    ehr = dict(study.ehr)
    if "ehr" in tables:
        row = tables["ehr"].lookup(study.key, study.join_keys) or {}
        ehr.update({k: v for k, v in row.items() if v is not None})
    if ehr:
        sample["ehr"] = ehr
    return sample


def _keep_declared(sample: dict, study: FoundStudy, tables: dict[str, TableJoin], dataset: DatasetDeclaration,
                   report: IngestReport) -> None:
    """Report the study's contradictions of the declaration and drop the contradicting values."""
    for table in tables.values():
        for problem in table.contradictions(study.join_keys):
            report.contradict(study.key, problem)
    if study.joint not in dataset.anatomies:
        return  # the schema check skips the study, naming the declared anatomies
    for problem in check_sample(dataset, sample):
        report.contradict(study.key, problem)
    spec = dataset.anatomies[study.joint]
    allowed = {0, *spec.structures.values()}
    for name in [k for k in sample if k.endswith(".seg")]:
        if not set(np.unique(sample[name]).tolist()) <= allowed:
            del sample[name]
    for name, field_spec in dataset.ehr.items():
        if field_spec.check_value((sample.get("ehr") or {}).get(name)):
            sample["ehr"][name] = None


def write_studies(studies: list[FoundStudy], cfg: IngestConfig, report: IngestReport,
                  tables: dict[str, TableJoin], info: dict, dataset: DatasetDeclaration) -> dict | None:
    """Write every study not already in a finished shard; returns the manifest (None if none)."""
    report.studies_found = len(studies)
    if not studies:
        return None
    writer = ShardWriter(cfg.out, kind="study", max_bytes=cfg.shard_max_mb * 1_000_000,
                         max_count=cfg.shard_max_count, info=info, resume_ignore=RESUME_IGNORE)
    try:
        for study in tqdm(studies, desc="studies", unit="study", disable=len(studies) < 5):
            _write_one(study, cfg, report, tables, writer, dataset)
    except BaseException as exc:  # keep finished shards for the rerun, drop partial ones
        writer.__exit__(type(exc), exc, exc.__traceback__)
        raise
    if report.ingested or writer.finished:
        return writer.close()
    writer.release()
    return None


def _write_one(study: FoundStudy, cfg: IngestConfig, report: IngestReport,
               tables: dict[str, TableJoin], writer: ShardWriter, dataset: DatasetDeclaration) -> None:
    split = assign_split(study.patient, dict(cfg.splits), cfg.split_seed)
    if writer.done(study.key):
        report.resumed.append(study.key)
        for table in tables.values():
            table.lookup(study.key, study.join_keys)
        return
    volumes, planes, segs = study.load(report)
    if not volumes:
        report.skip(study.key, "no_series", "no stack of this study could be used "
                    "(see the entries of its files)", study=study.key)
        return
    sample = _sample(study, split, volumes, planes, segs, tables, dataset)
    _keep_declared(sample, study, tables, dataset, report)
    try:
        validate_study(sample, dataset)
    except SchemaError as exc:
        report.skip(study.key, "schema", str(exc), study=study.key)
        return
    writer.write(sample, split)
    report.ingest(study.key, {p: planes[p]["contrast"] for p in planes}, study.n_files)


def run_pipeline(cfg: IngestConfig, command: str, pseudo, find_studies, to_key) -> int:
    """The shared ingest: find studies, join tables, write shards, write the report.

    ``find_studies(cfg, pseudo, report)`` is the source-specific part (DICOM, NIfTI); ``to_key``
    maps a table's raw key to a study's join key. Returns the exit code (see :func:`finish`).
    """
    info = manifest_info(cfg, command) | {"deid_key_check": pseudo.digest("key-check", "mskfm")[:16]}
    lock.acquire(cfg.out)  # held for the whole ingest: a second one into the folder is refused
    try:
        # e.g. another salt or split fractions (the declaration is compared once resolved, by the writer)
        check_resumable(cfg.out, "study", info, RESUME_IGNORE + ("dataset",))
        report = IngestReport(command=command.removeprefix("ingest-"), source=str(cfg.source))
        if not Path(cfg.source).is_dir():
            report.skip(str(cfg.source), "no_source", "input folder does not exist")
            return finish(cfg, command, report, {})
        tables: dict[str, TableJoin] = {}
        try:
            studies = find_studies(cfg, pseudo, report)
            dataset, report.dataset = resolve_dataset(cfg, sorted({s.joint for s in studies}),
                                                      lambda: _label_values(studies))
            tables = open_tables(cfg, to_key, dataset)
            write_studies(studies, cfg, report, tables, info | {"dataset": dataset.to_dict()}, dataset)
        except BaseException as exc:  # never lose the report of what was done before the failure
            report.skip(".", "aborted", f"ingest stopped: {type(exc).__name__}: {exc}")
            finish(cfg, command, report, tables)
            raise
        if report.files_seen == 0:
            report.skip(".", "empty", "no files under the input folder")
        if (Path(cfg.out) / "manifest.json").is_file():
            report.phi_scan = scan_output(cfg.out, cfg.source, [cfg.labels.path, cfg.ehr.path],
                                          cfg.deid.keep_free_text)
        return finish(cfg, command, report, tables)
    finally:
        lock.release(cfg.out)
        if not any(Path(cfg.out).iterdir()):
            Path(cfg.out).rmdir()  # nothing usable: leave no empty shard folder behind


def _label_values(studies: list[FoundStudy]) -> dict[str, set[int]]:
    """Label-map values per anatomy over the found studies (to infer structures)."""
    values: dict[str, set[int]] = {}
    for study in studies:
        if study.label_values is not None:
            values.setdefault(study.joint, set()).update(study.label_values())
    return values


def scan_output(out: str | Path, source: str | Path, tables: list[str], free_text: bool) -> dict:
    """`shards scan-phi` over the finished shard folder (manifest and journal included)."""
    from ..phi_scan import scan_phi

    try:
        return scan_phi(out, source, [t for t in tables if t], skip_kinds=("free_text",) if free_text else ())
    except Exception as exc:  # the report is written either way; an unscanned ingest exits 1
        return {"error": f"{type(exc).__name__}: {exc}", "n_hits": 0}


def finish(cfg: IngestConfig, command: str, report: IngestReport,
           tables: dict[str, TableJoin]) -> int:
    """Write the report and resolved config to the run folder; return the exit code."""
    report.tables = {kind: table.finish() for kind, table in tables.items()}
    folder = run_dir_of(cfg, command)
    write_run(folder, cfg, report.counts())
    path = report.write(folder)
    print(report.summary())
    print(f"report: {path}")
    return 1 if report.failed(cfg.strict) else 0


def manifest_info(cfg: IngestConfig, command: str) -> dict:
    """What the manifest records about an ingest: no paths, no salt, no identifiers."""
    conf = to_dict(cfg)
    for key in ("source", "out", "run_dir", "name"):
        conf.pop(key, None)
    for table in ("labels", "ehr"):
        conf[table]["path"] = Path(conf[table]["path"]).name if conf[table]["path"] else ""
    conf["deid"].pop("salt_file", None)
    conf["dataset"] = Path(conf["dataset"]).name if conf["dataset"] else ""
    return {"name": cfg.name or Path(cfg.out).name, "source": command, "ingest_config": conf}


def as_float32(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr, dtype=np.float32)
