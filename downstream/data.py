"""The studies of a task: checks against the shard manifest and the per-study table.

All checks run before any compute, and each error names what is missing and what exists.
"""

from __future__ import annotations

import posixpath

import fsspec
import numpy as np
import pandas as pd

from shards.config import ConfigError
from shards.dataset import dataset_of
from shards.manifest import load_manifest
from shards.reader import ShardReader

from .labels import expand_values
from .tasks import TaskConfig, check_vocabulary


def _published_beside(url: str) -> list[str]:
    """Names of published backbones (folders with config.json) next to ``url``."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
        parent = posixpath.dirname(path.rstrip("/"))
        return sorted(posixpath.basename(p) for p in fs.ls(parent, detail=False)
                      if fs.exists(posixpath.join(p, "config.json")))
    except (FileNotFoundError, OSError, ValueError):
        return []


def check_backbones(task: TaskConfig) -> None:
    missing = []
    for plane in task.planes:
        url = task.backbones[plane]
        if url.startswith("hf://"):
            continue  # resolved by the Hugging Face client when loading
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(posixpath.join(path, "config.json")):
            missing.append((plane, url))
    if missing:
        lines = [f"plane {p}: no published backbone at '{u}' (existing there: "
                 f"{', '.join(_published_beside(u)) or 'none'})" for p, u in missing]
        raise ConfigError(f"task '{task.name}': missing backbone(s):\n  " + "\n  ".join(lines)
                          + "\n  publish them with `pretrain run` (see `make demo`) or set backbones.<plane>=<path>")


def check_manifest(task: TaskConfig, manifest: dict) -> None:
    """Joint, planes and labels of the task must be declared by and present in the shards."""
    stats, where = manifest.get("stats", {}), f"task '{task.name}' vs shards {manifest.get('_base')}"
    check_vocabulary(task, dataset_of(manifest), where)
    joints = sorted(stats.get("joint", {}))
    if task.joint not in joints:
        raise ConfigError(f"{where}: joint '{task.joint}' is absent; joints present: {', '.join(joints)}")
    planes = sorted(stats.get("planes", {}))
    absent = [p for p in task.planes if p not in planes]
    if absent:
        raise ConfigError(f"{where}: plane(s) {absent} absent from the shards; planes present: {', '.join(planes)}")
    if task.kind == "diagnosis":
        present = sorted(stats.get("labels", {}).get(task.joint, {}))
        missing = [name for name in task.labels if name not in present]
        if missing:
            raise ConfigError(f"{where}: label(s) {missing} are not in the manifest for {task.joint}; "
                              f"labels present: {', '.join(present) or 'none'}")


def check_task(task: TaskConfig) -> dict:
    """Every pre-compute check; returns the shard manifest."""
    try:
        manifest = load_manifest(task.shards)
    except FileNotFoundError as exc:
        raise ConfigError(f"task '{task.name}': {exc}") from None
    check_manifest(task, manifest)
    check_backbones(task)
    return manifest


def task_splits(task: TaskConfig) -> tuple[str, ...]:
    """The splits a task reads: training, selection (when on) and evaluation."""
    t = task.train
    return tuple(dict.fromkeys(s for s in (t.train_split, t.select_split, t.eval_split) if s))


def load_studies(task: TaskConfig) -> pd.DataFrame:
    """One row per study of the task's joint having all its planes, in the splits the task reads
    (:func:`task_splits`; a large unlabelled ``pretrain`` pool gets no volumes or features): key,
    patient, split, labels (1.0 / 0.0 / NaN for unknown; a multiclass/ordinal label also as one-hot
    ``<label>=<class>`` outputs, :mod:`downstream.labels`) and ``ehr.<field>`` columns. Rows are sorted
    by key. A segmentation task keeps only the studies with a label map of its plane (real data labels
    some studies only)."""
    specs = dataset_of(load_manifest(task.shards)).anatomy(task.joint).labels if task.kind == "diagnosis" else {}
    segs = tuple(f"{p}.seg" for p in task.planes) if task.kind == "segmentation" else ()
    reader = ShardReader(task.shards, split=None, fields=("meta", "labels", "ehr", *segs), require=(),
                         joints=[task.joint], rank=0, world_size=1)
    wanted = task_splits(task)
    rows, seen = [], set()
    for s in reader:
        meta = s["meta"]
        if not all(p in meta.get("planes", {}) for p in task.planes) or not all(f in s for f in segs):
            continue
        split = meta.get("split", "train")
        seen.add(split)
        if split not in wanted:
            continue
        row = {"key": s["__key__"], "patient": meta["patient"], "split": split,
               "site": meta.get("site"), "field_strength": meta.get("field_strength"),
               "vendor": meta.get("vendor")}
        labels = s.get("labels") or {}
        for name in task.labels:
            value = labels.get(name)
            row[name] = np.nan if value is None else float(value)
            if name in specs and specs[name].type != "binary":
                row.update({col: v[0] for col, v in expand_values(name, specs[name], [value]).items()})
        for k, v in (s.get("ehr") or {}).items():
            row[f"ehr.{k}"] = v
        first = meta["planes"][task.planes[0]]
        row["spacing"], row["shape"] = list(first["spacing"]), list(first["shape"])
        rows.append(row)
    if not seen:
        raise ConfigError(f"task '{task.name}': no {task.joint} study in {task.shards} has all planes {task.planes}"
                          + (" with a label map" if segs else ""))
    absent = [s for s in wanted if s not in seen]
    if absent:
        raise ConfigError(f"task '{task.name}': split(s) {absent} have no {task.joint} studies; "
                          f"splits: {', '.join(sorted(seen))}"
                          + (' (or train.select_split="" to train without selection)'
                             if task.train.select_split in absent else ""))
    return pd.DataFrame(rows).sort_values("key").reset_index(drop=True)


def split_rows(frame: pd.DataFrame, task: TaskConfig) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the training and evaluation splits.

    ``train_fraction`` keeps the first patients of a seeded permutation of the training patients,
    so that for one seed smaller subsets are contained in larger ones (label-efficiency studies).
    ``domain_key`` with ``train_domain``/``eval_domain`` keeps only studies of that site, vendor or
    field strength on either side (robustness studies). ``frame`` is :func:`load_studies`' (which
    refuses a task whose splits have no studies).
    """
    t = task.train
    train = _in_domain(frame, task, t.train_split, t.train_domain, "train_domain")
    if t.train_fraction < 1:
        cover = frame.loc[train, task.labels] if t.cover_labels and task.kind == "diagnosis" else None
        train = train[frame.loc[train, "patient"].isin(patient_subset(frame.loc[train, "patient"], t.train_fraction,
                                                                      t.seed, cover)).to_numpy()]
    evaluate = _in_domain(frame, task, t.eval_split, t.eval_domain, "eval_domain")
    return np.array(train, dtype=np.int64), np.array(evaluate, dtype=np.int64)


def select_rows(frame: pd.DataFrame, task: TaskConfig) -> np.ndarray:
    """Row indices of the selection split (``train.select_split``; empty when it is ""): studies of the
    training domain, and with ``train_fraction`` < 1 the same seeded fraction of its patients, since
    validation labels come out of the same labelling budget as training labels (``cover_labels``: as there)."""
    t = task.train
    if not t.select_split:
        return np.array([], dtype=np.int64)
    rows = _in_domain(frame, task, t.select_split, t.train_domain, "train_domain")
    if t.train_fraction < 1:
        cover = frame.loc[rows, task.labels] if t.cover_labels and task.kind == "diagnosis" else None
        rows = rows[frame.loc[rows, "patient"].isin(patient_subset(frame.loc[rows, "patient"], t.train_fraction,
                                                                   t.seed, cover)).to_numpy()]
    return np.array(rows, dtype=np.int64)


def patient_subset(patients: pd.Series, fraction: float, seed: int, cover: pd.DataFrame | None = None) -> list[str]:
    """The first ``round(fraction * n)`` (at least 2) of a seeded permutation of the unique patients.

    With ``cover`` (label columns, 1/0/NaN, on the rows of ``patients``) the permutation is reordered
    so that it starts with patients who bring a positive for a label not yet covered (taken in
    permutation order), and the subset grows to hold them: every subset has a positive for every
    label that has one, and smaller subsets stay contained in larger ones.
    """
    unique = np.array(sorted(patients.unique()))
    order = list(np.random.default_rng(seed).permutation(unique))
    n = max(2, round(len(unique) * fraction))
    if cover is not None:
        first = _covering(order, patients, cover)
        order = first + [p for p in order if p not in set(first)]
        n = max(n, len(first))
    return order[:min(len(unique), n)]


def _covering(order: list[str], patients: pd.Series, cover: pd.DataFrame) -> list[str]:
    """Patients, in ``order``, each adding a positive for a label no earlier one had."""
    positive = (cover == 1).groupby(patients.to_numpy()).any()
    missing, first = set(positive.columns[positive.any()]), []
    for p in order:
        new = {c for c in missing if positive.at[p, c]}
        if new:
            first.append(p)
            missing -= new
        if not missing:
            break
    return first


def domain_values(frame: pd.DataFrame, key: str) -> list[str]:
    return sorted({str(v) for v in frame[key]})


def _in_domain(frame: pd.DataFrame, task: TaskConfig, split: str, domain: str, what: str) -> np.ndarray:
    rows = frame["split"] == split
    if task.train.domain_key and domain:
        values = frame[task.train.domain_key].astype(str)
        if not (rows & (values == domain)).any():
            raise ConfigError(f"task '{task.name}': train.{what} '{domain}' has no {task.joint} studies in split "
                              f"'{split}'; {task.train.domain_key} values there: "
                              f"{', '.join(domain_values(frame[rows], task.train.domain_key))}")
        rows &= values == domain
    return frame.index[rows].to_numpy()
