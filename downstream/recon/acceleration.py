"""``downstream acceleration-study``: how fast can we scan before the reading suffers?

For each test study of ``shards`` and each plane a fixed trained task model reads, every slice becomes
multi-coil k-space with the synthetic generator's own simulator (:func:`shards.synth.kspace.simulate_kspace`:
sigpy birdcage coils, smooth phase, complex noise; seeded per study, plane and slice), is undersampled at
each of ``accelerations`` (1x = fully sampled; ``mask`` seeded per slice, the same for every method) and
reconstructed by zero-filling and by the trained ``varnet`` with the coil handling and normalisation it was
trained with (its published ``transform``). The reconstructed volumes, back on the study's intensity scale,
go through each task model unchanged (:class:`downstream.predictor.Predictor`): diagnosis models give
patient-level macro AUROC, segmentation models mean Dice, each with the bootstrap intervals of
``downstream evaluate``; the study's own images are the ``original`` reference row. Nothing is tuned here:
the models, thresholds and settings come fixed. Writes ``metrics.json``, ``table.md``, one plot per task
model (metric vs acceleration, one band per method) and ``report.md``/``report.html``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pretrain.recon.evaluate import trained_transform
from pretrain.recon.publish import load_recon_backbone
from pretrain.recon.transforms import ReconTransform, ReconTransformConfig, collate_recon
from shards.config import ConfigError, save_config
from shards.report import Report, write_report
from shards.runs import default_folder, write_metrics
from shards.synth.kspace import simulate_kspace
from shards.synth.study import KspaceConfig

from ..evaluate import diagnosis_evaluation, segmentation_evaluation
from ..predict_inputs import shard_studies
from ..predictor import Predictor, Study
from ..studies.plots import plot_bands
from ..task_model import load_task_model
from .common import mask_spec

METHODS = ("zero-filled", "varnet")


@dataclass
class AccelerationStudyConfig:
    name: str = "acceleration"
    shards: str = "data/shards/demo"                 # study shards (kind study) holding the test studies
    split: str = "test"
    task_models: list[str] = field(default_factory=list)   # fixed trained task models (diagnosis/segmentation)
    backbone_dir: str = ""                           # as `downstream predict`: where local backbones moved
    varnet: str = ""                                 # published reconstruction backbone (VarNet or U-Net)
    accelerations: list[float] = field(default_factory=lambda: [1.0, 4.0, 8.0, 12.0])
    mask: str = "equispaced1d"
    coils: dict[str, int] = field(default_factory=lambda: dict(KspaceConfig().coils))   # per joint
    noise: float = KspaceConfig().noise
    max_studies: int | None = None
    seed: int = 0
    out: str = field(default_factory=default_folder("acceleration-study"))

    def validate(self) -> None:
        if not self.task_models:
            raise ConfigError("key 'task_models': give at least one trained task model (folder or URL)")
        if not self.varnet:
            raise ConfigError("key 'varnet': give a published reconstruction backbone")
        if not self.accelerations or min(self.accelerations) < 1:
            raise ConfigError(f"key 'accelerations': {self.accelerations} must be >= 1 (1 = fully sampled)")


def simulate(cfg: AccelerationStudyConfig, study: Study, plane: str) -> list[dict]:
    """Recon samples (one per slice) of a study plane: multi-coil k-space simulated from its images."""
    coils = int(cfg.coils.get(study.joint, 8))
    out = []
    for i, image in enumerate(np.asarray(study.volumes[plane], np.float32)):
        rng = np.random.default_rng([cfg.seed, zlib.crc32(f"{study.key}/{plane}".encode()), i])
        kspace, target = simulate_kspace(image, coils, cfg.noise, rng)
        out.append({"__key__": f"{study.key}-{plane}{i:03d}", "kspace": kspace, "target": target,
                    "meta": {"study": study.key, "slice": i, "coils": coils}})
    return out


@torch.no_grad()
def reconstruct(samples: list[dict], tcfg: ReconTransformConfig, varnet) -> dict[str, np.ndarray]:
    """{method: volume (slices, rows, cols)} on the input's intensity scale."""
    transform, out = ReconTransform(tcfg), {m: [] for m in METHODS}
    for sample in samples:
        item = transform(sample)
        batch = collate_recon([item])
        image = varnet(batch["masked_kspace"], batch["mask"], batch["num_low_frequencies"])[0]
        out["zero-filled"].append(item["zero_filled"].numpy() * item["scale"])
        out["varnet"].append(image.float().numpy() * item["scale"])
    return {m: np.stack(v).astype(np.float32) for m, v in out.items()}


def score(model, rows: list[dict]) -> dict:
    """The task model's headline metric with its interval, as ``downstream evaluate`` computes it."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        raise ConfigError(f"no study could be predicted: {[r['error'] for r in rows][:3]}")
    if model.meta["kind"] == "diagnosis":
        m = diagnosis_evaluation(model, ok)[0]["macro"]
        return {"metric": "macro AUROC", "mean": m["auroc"], "ci": m.get("ci", {}).get("auroc", [np.nan] * 2),
                "n": len(ok)}
    m = segmentation_evaluation(model, ok)[0]["mean"]["dice"]
    return {"metric": "mean Dice", "mean": m["mean"], "ci": m["ci"], "n": len(ok)}


def study_task_model(cfg: AccelerationStudyConfig, url: str, varnet, tcfg: ReconTransformConfig) -> list[dict]:
    model = load_task_model(url, backbone_dir=cfg.backbone_dir or None)
    predictor = Predictor(model)
    studies = list(shard_studies(model, cfg.shards, cfg.split, 0, 1, with_truth=True))[:cfg.max_studies]
    if not studies:
        raise ConfigError(f"key 'shards': no {model.meta['joint']} studies in split '{cfg.split}' of {cfg.shards}")
    simulated = {(s.key, p): simulate(cfg, s, p) for s in studies for p in model.planes if p in s.volumes}
    name = model.meta["task"]
    rows = [{"task": name, "acceleration": float("nan"), "method": "original", **score(model, predictor.predict(studies))}]
    for acc in cfg.accelerations:
        acc_cfg = replace(tcfg, masks=[mask_spec(cfg.mask, acc)], grid=None)
        recon = {k: reconstruct(v, acc_cfg, varnet) for k, v in tqdm(simulated.items(), desc=f"{name} x{acc:g}",
                                                                    leave=False)}
        for method in METHODS:
            inputs = [replace(s, volumes={p: recon[(s.key, p)][method] if (s.key, p) in recon else v
                                          for p, v in s.volumes.items()}) for s in studies]
            rows.append({"task": name, "acceleration": float(acc), "method": method,
                         **score(model, predictor.predict(inputs))})
    return rows


def run_acceleration_study(cfg: AccelerationStudyConfig) -> dict:
    out = (Path(cfg.out) / cfg.name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    varnet = load_recon_backbone(cfg.varnet)
    tcfg = trained_transform(cfg.varnet) or ReconTransformConfig()
    rows = [r for url in cfg.task_models for r in study_task_model(cfg, url, varnet, tcfg)]
    write_metrics(out, {"rows": rows, "transform": tcfg.__dict__}, default=None)
    table = format_table(rows)
    (out / "table.md").write_text(table + "\n")
    md, page = write_report(report(cfg, rows, out, table), out)
    return {"rows": rows, "table": table, "run_dir": str(out), "report": str(md), "html": str(page)}


def format_table(rows: list[dict]) -> str:
    lines = ["| task | metric | acceleration | method | studies | value [95% CI] |", "|---|---|---|---|---|---|"]
    for r in rows:
        acc = "original" if np.isnan(r["acceleration"]) else f"{r['acceleration']:g}x"
        lines.append(f"| {r['task']} | {r['metric']} | {acc} | {r['method']} | {r['n']} | "
                     f"{r['mean']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] |")
    return "\n".join(lines)


def report(cfg: AccelerationStudyConfig, rows: list[dict], out: Path, table: str) -> Report:
    rep = Report("Acceleration study: how fast can we scan before the reading suffers?")
    rep.text(f"Test studies ({cfg.split} split of {cfg.shards}) turned into simulated multi-coil k-space "
             f"(coils per joint {cfg.coils}, noise {cfg.noise}), undersampled with {cfg.mask} masks and "
             f"reconstructed by zero-filling and by `{cfg.varnet}`; fixed task models read every version. "
             "`original`: the study's own images. Intervals: the task models' own bootstrap (`downstream evaluate`).")
    frame = pd.DataFrame(rows)
    rep.heading("Task metric per acceleration and reconstruction")
    rep.table(frame.assign(acceleration=frame["acceleration"].map(lambda a: "original" if np.isnan(a) else f"{a:g}x"),
                           value=[f"{m:.3f} [{c[0]:.3f}, {c[1]:.3f}]" for m, c in zip(frame["mean"], frame["ci"])])
              [["task", "metric", "acceleration", "method", "n", "value"]])
    for task, g in frame[frame["method"] != "original"].groupby("task", sort=False):
        band = g.assign(lo=[c[0] for c in g["ci"]], hi=[c[1] for c in g["ci"]])
        metric = g["metric"].iloc[0]
        path = plot_bands(band, "acceleration", "method", out / f"{task}.png", "acceleration (1 = fully sampled)",
                          metric, f"{task}: {metric} vs acceleration", logx=False)
        rep.image(path, f"{task}: {metric} per reconstruction vs acceleration (bands: 95% bootstrap intervals)")
    return rep
