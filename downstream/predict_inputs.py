"""Where ``predict`` reads studies from: shards (folder or URL), a DICOM folder, NIfTI files.

DICOM and NIfTI go through the ingest's own discovery, series choice and de-identification
(:mod:`shards.ingest`) without writing any shard: studies get de-identified keys (keyed hashes with
``$MSKFM_DEID_SALT`` when set, else a salt drawn for this run and never stored), and the map from
key back to source files is returned for a private file next to the predictions.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Iterator

from shards.config import load_config
from shards.ingest.deid import DeidConfig, Pseudonymizer
from shards.ingest.report import IngestReport
from shards.manifest import load_manifest, shard_entries
from shards.reader import ShardReader

from .heads.segmentation import structure_values
from .labels import SEP
from .predictor import Study
from .task_model import TaskModel, TaskModelError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def input_kind(inputs: list[str]) -> str:
    """``shards``, ``dicom`` or ``nifti`` from what the inputs are."""
    if len(inputs) == 1 and ("://" in inputs[0] or (Path(inputs[0]) / "manifest.json").is_file()
                             or inputs[0].endswith("manifest.json")):
        return "shards"
    missing = [i for i in inputs if not Path(i).exists()]
    if missing:
        raise TaskModelError(f"input(s) {missing} do not exist")
    if all(i.endswith(NIFTI_SUFFIXES) for i in inputs):
        return "nifti"
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        has_nifti = any(n.endswith(NIFTI_SUFFIXES) for _, _, names in os.walk(inputs[0]) for n in names)
        return "nifti" if has_nifti else "dicom"
    raise TaskModelError(f"inputs {inputs}: give one shard folder or URL, one DICOM folder, or NIfTI files "
                         f"(.nii/.nii.gz) or one folder of them")


# ----- shards -------------------------------------------------------------------------------------
def check_shards(model: TaskModel, shards: str, split: str | None, with_truth: bool) -> int:
    """Vocabulary and planes of the model against the shard manifest; returns the number of shards."""
    try:
        manifest = load_manifest(shards)
        entries = shard_entries(manifest, split)
    except (FileNotFoundError, ValueError) as exc:
        raise TaskModelError(f"shards {shards}: {exc}") from None
    stats, joint = manifest.get("stats", {}), model.meta["joint"]
    joints = sorted(stats.get("joint", {}))
    if joint not in joints:
        raise TaskModelError(f"vocabulary mismatch: the model is for {joint} but shards {shards} hold "
                             f"{', '.join(joints) or 'no'} studies")
    absent = [p for p in model.planes if p not in stats.get("planes", {})]
    if absent:
        raise TaskModelError(f"planes mismatch: the model needs plane(s) {absent}; shards {shards} have "
                             f"{', '.join(sorted(stats.get('planes', {}))) or 'none'}")
    if with_truth and model.labels:
        present = set(stats.get("labels", {}).get(joint, {}))
        missing = sorted({n.split(SEP, 1)[0] for n in model.labels} - present)
        if missing:
            raise TaskModelError(f"vocabulary mismatch: label(s) {missing} of the model are not in shards "
                                 f"{shards} for {joint}; labels there: {', '.join(sorted(present)) or 'none'}")
    return len(entries)


def shard_studies(model: TaskModel, shards: str, split: str | None, unit: int, n_units: int,
                  with_truth: bool) -> Iterator[Study]:
    """The model's joint's studies in shard ``unit`` of ``n_units`` (one shard each)."""
    planes, seg = model.planes, model.meta["kind"] == "segmentation"
    truth_fields = ([f"{p}.seg" for p in planes] if seg else ["labels"]) if with_truth else []
    fields = ["meta", *planes, *truth_fields]
    reader = ShardReader(shards, split=split, fields=fields, require=(), joints=[model.meta["joint"]],
                         rank=unit, world_size=n_units, split_by="shard")
    vocab = model.meta["vocabulary"]
    for s in reader:
        meta = s["meta"]
        truth = {p: s[f"{p}.seg"] for p in planes if f"{p}.seg" in s}
        if truth and meta.get("structures") and (structure_values(meta["structures"])
                                                 != structure_values(vocab.get("source_structures", []))):
            raise TaskModelError(f"vocabulary mismatch: study {s['__key__']} labels structures "
                                 f"{meta['structures']}, the model was trained on {vocab['source_structures']}")
        yield Study(s["__key__"], meta.get("joint", ""), {p: s[p] for p in planes if p in s},
                    {p: list(m["spacing"]) for p, m in meta.get("planes", {}).items()}, meta.get("patient", ""),
                    {k: meta.get(k) for k in ("split", "site", "vendor", "field_strength")},
                    {p: {"kind": "grid", "spacing": list(m["spacing"])} for p, m in meta.get("planes", {}).items()},
                    s.get("labels") if with_truth else None, truth)


# ----- DICOM and NIfTI ----------------------------------------------------------------------------
def _pseudonymizer() -> tuple[Pseudonymizer, str]:
    env = DeidConfig().salt_env
    salt = os.environ.get(env, "").encode()
    if len(salt) >= 8:
        return Pseudonymizer(salt), f"${env}"
    return Pseudonymizer(secrets.token_bytes(32)), "a salt drawn for this run (not stored)"


def ingest_studies(kind: str, inputs: list[str], model: TaskModel, joint: str, workdir: Path):
    """(found studies, source folder, ingest report, salt note) through the ingest's discovery."""
    if kind == "nifti" and not (len(inputs) == 1 and Path(inputs[0]).is_dir()):
        source = workdir / "nifti-inputs"  # explicit files: each becomes its own study
        source.mkdir()
        for i, path in enumerate(inputs):
            (source / f"{i:04d}-{Path(path).name}").symlink_to(Path(path).resolve())
    else:
        source = Path(inputs[0])
    from shards.ingest import dicom, nifti
    from shards.ingest.config import DicomIngestConfig, NiftiIngestConfig

    module, schema = (dicom, DicomIngestConfig) if kind == "dicom" else (nifti, NiftiIngestConfig)
    joint = joint or ("" if kind == "dicom" else model.meta["joint"])  # NIfTI headers name no joint
    cfg = load_config(schema, None, [f"source={source}", f"out={workdir / 'unused'}"] + ([f"joint={joint}"] if joint else []))
    pseudo, salt_note = _pseudonymizer()
    report = IngestReport(command=f"predict-{kind}", source=str(source))
    found = module.find_studies(cfg, pseudo, report)
    if not found:
        reasons = sorted({f"{e['code']}: {e['reason']}" for e in report.skipped})[:5]
        raise TaskModelError(f"no usable {kind.upper()} study in {inputs[0] if len(inputs) == 1 else inputs} "
                             f"({report.files_seen} files seen){': ' + '; '.join(reasons) if reasons else ''}")
    return found, source, report, salt_note


def load_found(found, kind: str, source: Path, report: IngestReport) -> Study:
    """Decode one found study (pixels read now) into a :class:`Study`; no volume -> no planes."""
    volumes, planes, _ = found.load(report)
    geometry = {}
    for plane, origin in found.origin.items():
        geometry[plane] = ({"kind": "dicom", "affine": origin["affine"]} if kind == "dicom" else
                           {"kind": "nifti", "path": str(source / origin["source"]), "axis": origin["axis"]})
    return Study(found.key, found.joint, volumes, {p: list(m["spacing"]) for p, m in planes.items()},
                 found.patient, {}, geometry)
