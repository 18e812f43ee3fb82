"""``downstream predict``: apply a task model to shards, a DICOM folder or NIfTI files.

In-process API::

    from downstream.predict import PredictConfig, run_predict
    summary = run_predict("runs/finetune/knee-dx/model", ["data/shards/demo"], "runs/predict/demo",
                          PredictConfig(split="test", workers=2))

Shard inputs stream shard by shard, in this process (``workers=0``) or on ``workers`` Ray actors of
the cluster ``downstream`` finds (``RAY_ADDRESS``, else a local Ray): each actor loads the model
once, on a GPU when the cluster has one per actor, and reads its shards itself. DICOM and NIfTI
inputs are local folders and run in this process.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm import tqdm

from shards.config import ConfigError, load_config, save_config

from .predict_inputs import check_shards, ingest_studies, input_kind, load_found, shard_studies
from .predict_outputs import predictions_frame, write_private_map, write_segmentations
from .predictor import Predictor, Study
from .task_model import TaskModel, TaskModelError, load_task_model

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "predict" / "default.yaml"


@dataclass
class PredictConfig:
    split: str = ""                  # shard inputs: one split; "" = every split
    batch_size: int = 4              # studies per backbone forward pass
    workers: int = 0                 # shard inputs: 0 = this process, N = N Ray actors
    device: str = "auto"             # auto: cuda when available, else cpu
    threads: int = 0                 # torch CPU threads per process (0 = torch's default)
    max_clipped: float = 0.5         # a study with more voxels outside the stored intensity window fails
    joint: str = ""                  # DICOM/NIfTI: force the joint (default: DICOM headers; NIfTI: the model's)
    backbone_dir: str = ""           # where local backbones recorded by folder name are looked up
    backbones: dict[str, str] = field(default_factory=dict)  # plane -> URL, overrides the recorded one

    def validate(self) -> None:
        if self.batch_size < 1 or self.workers < 0 or not 0 < self.max_clipped <= 1:
            raise ConfigError(f"predict: batch_size >= 1, workers >= 0 and max_clipped in (0, 1] are needed, got "
                              f"{self.batch_size}, {self.workers}, {self.max_clipped}")


def load_predict_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PredictConfig:
    return load_config(PredictConfig, path or CONFIG, overrides)


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def open_model(url: str, cfg: PredictConfig, device: str = "cpu") -> TaskModel:
    return load_task_model(url, dict(cfg.backbones), cfg.backbone_dir or None, device)


def batched(studies: Iterator[Study], n: int) -> Iterator[list[Study]]:
    batch: list[Study] = []
    for s in studies:
        batch.append(s)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_unit(predictor: Predictor, shards: str, split: str | None, unit: int, n_units: int,
                 with_truth: bool, batch_size: int) -> list[dict]:
    """Rows for the studies of one shard (``unit`` of ``n_units``)."""
    rows = []
    for batch in batched(shard_studies(predictor.model, shards, split, unit, n_units, with_truth), batch_size):
        rows += predictor.predict(batch)
    return rows


class ShardWorker:
    """A Ray actor: the task model loaded once, then any number of shards predicted."""

    def __init__(self, url: str, cfg: PredictConfig):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.predictor = Predictor(open_model(url, cfg, resolve_device(cfg.device)), resolve_device(cfg.device),
                                   cfg.max_clipped)

    def ready(self) -> str:
        return self.predictor.device

    def run(self, shards: str, split: str | None, unit: int, n_units: int, with_truth: bool) -> list[dict]:
        return predict_unit(self.predictor, shards, split, unit, n_units, with_truth, self.cfg.batch_size)


def shard_rows(url: str, model: TaskModel, shards: str, cfg: PredictConfig, with_truth: bool,
               timing: dict) -> Iterator[list[dict]]:
    """Rows per shard, from this process or from ``cfg.workers`` Ray actors."""
    split = cfg.split or None
    n_units = check_shards(model, shards, split, with_truth)
    if cfg.workers == 0:
        device = resolve_device(cfg.device)
        predictor = Predictor(model, device, cfg.max_clipped)
        timing.update(workers=0, devices=[device])
        t0 = time.perf_counter()
        for unit in range(n_units):
            yield predict_unit(predictor, shards, split, unit, n_units, with_truth, cfg.batch_size)
        timing["predict_s"] = time.perf_counter() - t0
        return
    import ray
    from ray.util import ActorPool

    from pretrain.launchers.ray import connect_ray

    connect_ray(log_to_driver=False)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= cfg.workers else 0
    t0 = time.perf_counter()
    worker = ray.remote(num_cpus=1, num_gpus=gpus)(ShardWorker)
    actors = [worker.remote(url, cfg) for _ in range(cfg.workers)]
    timing.update(workers=cfg.workers, devices=ray.get([a.ready.remote() for a in actors]),
                  startup_s=time.perf_counter() - t0)
    t0 = time.perf_counter()
    try:
        yield from ActorPool(actors).map_unordered(
            lambda a, unit: a.run.remote(shards, split, unit, n_units, with_truth), range(n_units))
        timing["predict_s"] = time.perf_counter() - t0
    finally:
        for a in actors:
            ray.kill(a)


def file_rows(model: TaskModel, kind: str, inputs: list[str], out: Path, cfg: PredictConfig,
              timing: dict) -> Iterator[list[dict]]:
    """Rows for DICOM/NIfTI studies, decoded one by one through the ingest; writes the private map."""
    with tempfile.TemporaryDirectory(prefix="mskfm-predict-") as work:
        found, source, report, salt = ingest_studies(kind, inputs, model, cfg.joint, Path(work))
        write_private_map(out, kind, source, found)
        (out / "input_report.private.json").write_text(json.dumps(report.to_dict(), indent=1))
        device = resolve_device(cfg.device)
        predictor = Predictor(model, device, cfg.max_clipped)
        timing.update(workers=0, devices=[device], keys=f"keyed hashes with {salt}")
        t0 = time.perf_counter()
        for s in found:
            yield predictor.predict([load_found(s, kind, source, report)])
        timing["predict_s"] = time.perf_counter() - t0


def run_predict(url: str, inputs: Sequence[str], out: str | Path, cfg: PredictConfig | None = None,
                with_truth: bool = False) -> dict:
    """Predict every study of ``inputs`` into ``out``; returns the summary (and the rows under "rows")."""
    cfg = cfg or load_predict_config()
    input_kind([str(i) for i in inputs])  # bad inputs fail before the model loads
    t0 = time.perf_counter()
    model = open_model(url, cfg)
    return predict_with(model, url, inputs, out, cfg, with_truth, {"load_s": time.perf_counter() - t0})


def predict_with(model: TaskModel, url: str, inputs: Sequence[str], out: str | Path, cfg: PredictConfig,
                 with_truth: bool = False, timing: dict | None = None) -> dict:
    """:func:`run_predict` with the task model already loaded (``url`` is what Ray workers load)."""
    inputs = [str(i) for i in inputs]
    kind = input_kind(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    timing = dict(timing or {})
    stream = (shard_rows(url, model, inputs[0], cfg, with_truth, timing) if kind == "shards"
              else file_rows(model, kind, inputs, out, cfg, timing))
    rows: list[dict] = []
    with tqdm(desc=f"predict {model.meta['task']}", unit="study") as bar:
        for chunk in stream:
            for row in chunk:
                geometry = row.pop("geometry", None)
                if "seg" in row:
                    row["seg_files"] = write_segmentations(row, geometry, out / "segmentations")
            rows += chunk
            bar.update(len(chunk))
    return finish(model, kind, rows, out, timing)


def finish(model: TaskModel, kind: str, rows: list[dict], out: Path, timing: dict) -> dict:
    frame = predictions_frame(rows, model.labels, model.meta.get("thresholds", {}))
    frame.to_csv(out / "predictions.csv", index=False, float_format="%.9g")
    ok = sum(r["status"] == "ok" for r in rows)
    failed = [{"key": r["key"], "error": r["error"]} for r in rows if r["status"] != "ok"]
    seconds = timing.get("predict_s", 0.0)
    summary = {"task": model.meta["task"], "kind": model.meta["kind"], "input": kind, "n_studies": len(rows),
               "n_predicted": ok, "n_failed": len(failed), "failed": failed,
               "thresholds": model.meta.get("thresholds"), "threshold_source": model.meta.get("threshold_source"),
               "timing": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in timing.items()},
               "studies_per_s": round(ok / seconds, 3) if seconds > 0 else None}
    (out / "predict.json").write_text(json.dumps(summary, indent=1))
    if rows and not ok:
        reasons = sorted({f["error"] for f in failed})[:3]
        raise TaskModelError(f"none of the {len(rows)} {kind} studies could be predicted ({'; '.join(reasons)}); "
                             f"every study is listed with its reason in {out / 'predictions.csv'}")
    return summary | {"rows": rows, "predictions": frame}
