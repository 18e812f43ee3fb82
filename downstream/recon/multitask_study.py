"""``downstream recon-seg-study``: reconstruct and segment in one model, or one after the other?

Three pipelines, all trained with the one pretraining engine (:func:`pretrain.run.train`) on the same
seeded train slices of one anatomy (``<out>/<name>/data``), then scored on ``eval_split`` slices with the
same mask per slice and acceleration (seeded by the slice key):

- ``multitask``: ``objective: recon_seg`` (``multitask_config``): a VarNet whose output feeds a 2D MONAI
  BasicUNet, trained jointly on SSIM (+ L1) + Dice/CE, as ATOMMIC's MTL models;
- ``sequential``: a VarNet trained alone (``recon_config``, ``objective: recon``), then a segmenter trained
  alone on the fully sampled images (``seg2d``, ``seg_input: target``) applied to its reconstruction;
- ``zero-filled``: a segmenter trained alone on zero-filled images (``seg_input: zero_filled``) applied to
  the zero-filled image.

The fully sampled image through the sequential segmenter is reported as a reference row (``fully
sampled``). Reconstruction: fastMRI's SSIM/PSNR/NMSE per volume; segmentation: Dice per slice (MONAI,
background excluded) averaged per volume; means with percentile-bootstrap intervals over volumes, per
acceleration. Writes ``metrics.json``, ``dice.png``, ``ssim.png`` and ``report.md``/``report.html``
(:mod:`shards.report`, the downstream studies' renderer).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pretrain.config import PretrainConfig
from pretrain.recon.metrics import VolumeAccumulator
from pretrain.recon.objective import crop_to
from pretrain.recon.study import train_keys, write_subset
from pretrain.recon.transforms import ReconTransform, ReconTransformConfig, collate_recon
from shards.config import ConfigError, load_config, save_config, to_dict
from shards.reader import iter_samples
from shards.report import Report, write_report
from shards.resume import check_resume, saved_yaml
from shards.runs import default_folder, write_metrics
from shards.schema import RECON_FIELDS

from ..studies.plots import plot_bands
from .common import fmt, mask_spec, mean_ci, slice_dice

VARNET_KEYS = ("num_cascades", "sens_chans", "sens_pools", "chans", "pools", "mask_center", "recon")
RESUME_KEYS = ("source", "anatomy", "multitask_config", "recon_config", "overrides", "seed")


@dataclass
class ReconSegStudyConfig:
    name: str = "recon-seg"
    source: str = "data/shards/demo/recon"
    anatomy: str = "knee"
    multitask_config: str = "configs/pretrain/recon-seg-tiny.yaml"   # recon_seg run (backbone varnet-seg)
    recon_config: str = "configs/pretrain/recon-tiny.yaml"           # the sequential pipeline's VarNet
    overrides: list[str] = field(default_factory=list)               # key=value for every training run
    mask: str = "equispaced1d"
    accelerations: list[float] = field(default_factory=lambda: [4.0, 8.0])
    eval_split: str = "test"
    max_eval_slices: int | None = None
    ci: float = 0.95
    n_boot: int = 1000
    seed: int = 0
    out: str = field(default_factory=default_folder("recon-seg-study"))

    def validate(self) -> None:
        if not self.accelerations or min(self.accelerations) <= 1:
            raise ConfigError(f"key 'accelerations': {self.accelerations} must be > 1")


def run_configs(cfg: ReconSegStudyConfig, study_dir: Path) -> dict[str, PretrainConfig]:
    """The four training runs; the two VarNets must share architecture and k-space handling."""
    common = [f"data.source={study_dir / 'data'}", f"run_root={study_dir / 'runs'}",
              f"storage_path={study_dir / 'ckpt'}", f"seed={cfg.seed}"]
    mt = load_config(PretrainConfig, cfg.multitask_config, [*cfg.overrides, "name=multitask", *common])
    if mt.objective != "recon_seg" or mt.model.get("backbone", "varnet-seg") != "varnet-seg":
        raise ConfigError(f"key 'multitask_config': {cfg.multitask_config} must train objective recon_seg with "
                          "backbone varnet-seg")
    varnet = load_config(PretrainConfig, cfg.recon_config, [*cfg.overrides, "name=varnet", *common])
    differ = [k for k in VARNET_KEYS if mt.model.get(k) != varnet.model.get(k)]
    if varnet.objective != "recon" or differ:
        raise ConfigError(f"key 'recon_config': {cfg.recon_config} must train objective recon with the multitask "
                          f"run's VarNet and k-space handling; model keys {differ} differ")
    out = {"multitask": mt, "varnet": varnet}
    for seg_input in ("target", "zero_filled"):
        model = {"backbone": "seg2d", "seg_features": mt.model["seg_features"], "recon": mt.model["recon"],
                 "multitask": {**mt.model.get("multitask", {}), "anatomy": cfg.anatomy, "seg_input": seg_input}}
        name = f"seg-{seg_input.replace('_', '-')}"
        out[name] = load_config(PretrainConfig, None, [f"name={name}"], base=to_dict(mt) | {"model": model})
    out["multitask"].model["multitask"] = {**mt.model.get("multitask", {}), "anatomy": cfg.anatomy}
    return out


def train_all(runs: dict[str, PretrainConfig], hub: Path) -> dict[str, str]:
    """Train (or resume) and publish every run; returns where each model was published."""
    from pretrain.run import publish_unit, train

    urls = {}
    for name, run in runs.items():
        train(run)
        urls[name] = publish_unit(run, run.planes[0], str(hub), overwrite=True, folder=name)
    return urls


@torch.no_grad()
def pipelines(models: dict, batch: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(image, logits) of each method for one slice."""
    k, mask, nlf = batch["masked_kspace"], batch["mask"], batch["num_low_frequencies"]
    mt_image, mt_logits = models["multitask"](k, mask, nlf)
    seq_image = models["varnet"](k, mask, nlf)
    return {"multitask": (mt_image, mt_logits), "sequential": (seq_image, models["seg-target"](seq_image)),
            "zero-filled": (batch["zero_filled"], models["seg-zero-filled"](batch["zero_filled"])),
            "fully sampled": (batch["target"], models["seg-target"](batch["target"]))}


def evaluate(cfg: ReconSegStudyConfig, models: dict, transform: dict, slices: list[dict]) -> list[dict]:
    """Per volume, method and acceleration: SSIM/PSNR/NMSE and mean slice Dice."""
    n_classes = len(models["multitask"].config.structures)
    rows = []
    for acc in cfg.accelerations:
        tcfg = ReconTransformConfig(**{**transform, "masks": [mask_spec(cfg.mask, acc)]})
        recon, dice = VolumeAccumulator(), defaultdict(list)
        for item in tqdm([ReconTransform(tcfg)(s) for s in slices], desc=f"x{acc:g}", leave=False):
            batch = collate_recon([item])
            meta, target = item["meta"], item["target"].numpy()
            volume = f"{meta.get('study', item['key'])}/{meta.get('orientation', '')}"
            for method, (image, logits) in pipelines(models, batch).items():
                if method != "fully sampled":  # the target itself: no reconstruction error to score
                    recon.add(volume, meta.get("anatomy", "?"), method, int(meta.get("slice", 0)), target,
                              image[0].float().numpy())
                dice[(volume, method)].append(slice_dice(crop_to(logits[0], target.shape), item["seg"], n_classes))
        scored = recon.per_volume()
        scored += [{"volume": v, "method": m, **dict.fromkeys(("ssim", "psnr", "nmse"), float("nan"))}
                   for v, m in dice if m == "fully sampled"]
        rows += [r | {"acceleration": float(acc), "dice": float(np.nanmean(dice[(r["volume"], r["method"])]))}
                 for r in scored]
    return rows


def summarise(cfg: ReconSegStudyConfig, rows: list[dict]) -> list[dict]:
    frame = pd.DataFrame(rows)
    out = []
    for (acc, method), g in frame.groupby(["acceleration", "method"], sort=True):
        out.append({"acceleration": acc, "method": method, "volumes": len(g),
                    **{m: mean_ci(g[m], cfg.ci, cfg.n_boot, cfg.seed) for m in ("ssim", "psnr", "nmse", "dice")}})
    return out


def eval_slices(cfg: ReconSegStudyConfig) -> list[dict]:
    out = []
    for s in iter_samples(cfg.source, cfg.eval_split, RECON_FIELDS, require=("kspace", "seg"), joints=[cfg.anatomy]):
        out.append(s)
        if cfg.max_eval_slices and len(out) >= cfg.max_eval_slices:
            break
    if not out:
        raise ConfigError(f"key 'source': no {cfg.anatomy} slices with a label map in split '{cfg.eval_split}' "
                          f"of {cfg.source}")
    return out


def run_recon_seg_study(cfg: ReconSegStudyConfig) -> dict:
    study_dir = (Path(cfg.out) / cfg.name).resolve()
    check_resume(saved_yaml(study_dir / "config.yaml"), to_dict(cfg), study_dir, "study", keys=RESUME_KEYS)
    runs = run_configs(cfg, study_dir)        # every config checked before any data is written
    slices = eval_slices(cfg)
    study_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, study_dir / "config.yaml")
    keys = train_keys(cfg.source, [cfg.anatomy])[cfg.anatomy]
    write_subset(cfg.source, study_dir / "data", set(keys), [cfg.anatomy])
    from pretrain.recon.publish import load_recon_backbone

    urls = train_all(runs, study_dir / "hub")
    models = {name: load_recon_backbone(url) for name, url in urls.items()}
    rows = evaluate(cfg, models, dict(runs["multitask"].model["recon"]), slices)
    summary = summarise(cfg, rows)
    write_metrics(study_dir, {"summary": summary, "volumes": rows, "train_slices": len(keys), "models": urls},
                  default=None)
    md, page = write_report(report(cfg, summary, study_dir, len(keys)), study_dir)
    return {"summary": summary, "run_dir": str(study_dir), "report": str(md), "html": str(page)}


def _band(summary: list[dict], metric: str) -> pd.DataFrame:
    return pd.DataFrame([{"acceleration": r["acceleration"], "method": r["method"], "mean": r[metric]["mean"],
                          "lo": r[metric]["ci"][0], "hi": r[metric]["ci"][1]} for r in summary])


def report(cfg: ReconSegStudyConfig, summary: list[dict], study_dir: Path, n_train: int) -> Report:
    rep = Report(f"Reconstruction + segmentation study: multitask vs sequential vs zero-filled ({cfg.anatomy})")
    rep.text(f"Trained on the {n_train} {cfg.anatomy} train slices of {cfg.source} (multitask: "
             f"`{cfg.multitask_config}`; sequential VarNet: `{cfg.recon_config}`; segmenters: its seg2d variants), "
             f"scored on the {cfg.eval_split} split with {cfg.mask} masks seeded per slice. Means over volumes with "
             f"{cfg.ci:.0%} percentile-bootstrap intervals ({cfg.n_boot} resamples). `fully sampled` is the "
             "sequential segmenter on the fully sampled image (reference, SSIM 1 by definition).")
    table = pd.DataFrame([{"acceleration": f"{r['acceleration']:g}x", "method": r["method"], "volumes": r["volumes"],
                           "SSIM": fmt(r["ssim"]), "PSNR": fmt(r["psnr"], 2), "NMSE": fmt(r["nmse"], 4),
                           "Dice": fmt(r["dice"])} for r in summary])
    rep.heading("Reconstruction and segmentation per acceleration")
    rep.table(table)
    for metric, label in (("dice", "Dice (mean over structures)"), ("ssim", "SSIM")):
        rows = [r for r in summary if metric == "dice" or r["method"] != "fully sampled"]
        path = plot_bands(_band(rows, metric), "acceleration", "method", study_dir / f"{metric}.png",
                          "acceleration", label, f"{label} vs acceleration", logx=False)
        rep.image(path, f"{label} per method vs acceleration ({cfg.ci:.0%} bootstrap bands)")
    return rep
