"""``pretrain eval-recon``: fastMRI metrics of a reconstruction backbone per mask, acceleration, anatomy.

For every mask kind x acceleration, each slice of ``split`` is undersampled with a mask seeded by its
key (the same mask for every method and every run), reconstructed by zero-filling, by the backbone and
optionally by a baseline backbone; slices are grouped into volumes (study + orientation) and scored with
fastMRI's NMSE/PSNR/SSIM (:mod:`pretrain.recon.metrics`). Writes ``runs/eval-recon/<name>/`` with
``config.yaml``, ``metrics.json`` (summary rows + per-volume rows + throughput), ``table.md`` and
``examples.png`` (target, zero-filled, reconstructions and error maps for a few slices).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shards.config import ConfigError, load_config, save_config
from shards.reader import iter_samples
from shards.runs import default_folder, write_metrics
from shards.schema import RECON_FIELDS

from .masks import MASK_KINDS
from .metrics import VolumeAccumulator, center_crop, summarise
from .transforms import ReconTransform, ReconTransformConfig, collate_recon

DEFAULT_CENTER = {4: 0.08, 8: 0.04}  # fastMRI's pairing of acceleration and centre fraction


@dataclass
class EvalReconConfig:
    backbone: str = ""                 # published backbone folder or URL
    source: str = "data/shards/demo/recon"
    split: str = "val"
    masks: list[str] = field(default_factory=lambda: ["equispaced1d"])
    accelerations: list[float] = field(default_factory=lambda: [4.0, 8.0])
    center_fractions: dict[str, float] = field(default_factory=dict)  # "4": 0.08; default fastMRI's
    baselines: dict[str, str] = field(default_factory=dict)            # method name -> backbone URL
    normalisation: str = ""            # empty: as the backbone was trained (else max | mean | none)
    virtual_coils: int | None = None   # None: as the backbone was trained (its training_config.yaml)
    coil_compression: str = ""         # empty: as trained (svd | gcc)
    prewhiten: bool | None = None      # None: as trained
    combine: str = ""                  # empty: as trained (rss | sense with ESPIRiT maps)
    espirit: dict | None = None        # None: as trained
    max_slices: int | None = None
    figure_slices: int = 3
    seed: int = 0
    device: str = "cpu"                # "cuda" to reconstruct on a GPU
    name: str = "eval"
    run_root: str = field(default_factory=default_folder("eval-recon"))

    def validate(self) -> None:
        if not self.backbone:
            raise ConfigError("key 'backbone': give a published reconstruction backbone folder or URL")
        bad = [m for m in self.masks if m not in MASK_KINDS]
        if bad or not self.masks:
            raise ConfigError(f"key 'masks': unknown {bad or self.masks}; known: {', '.join(MASK_KINDS)}")
        if not self.accelerations or min(self.accelerations) <= 1:
            raise ConfigError(f"key 'accelerations': {self.accelerations} must be > 1")

    def center_fraction(self, acc: float) -> float:
        key = f"{acc:g}"
        return float(self.center_fractions.get(key, DEFAULT_CENTER.get(int(acc), 0.32 / acc)))


COIL_SETTINGS = ("virtual_coils", "coil_compression", "normalisation", "prewhiten", "combine", "espirit")


def trained_transform(url: str) -> ReconTransformConfig | None:
    """The typed transform settings a published backbone was trained with: ``transform`` in its
    ``config.json``; for folders published before it was stored there, ``model.recon`` of
    ``training_config.yaml``; None when neither is present."""
    from omegaconf import OmegaConf

    from ..hub import fetch_folder

    folder = fetch_folder(url)
    stored = json.loads((folder / "config.json").read_text()).get("transform")
    if stored is None and (folder / "training_config.yaml").is_file():
        stored = (OmegaConf.to_container(OmegaConf.load(folder / "training_config.yaml")).get("model") or {}).get("recon")
    if stored is None:
        return None
    try:
        return load_config(ReconTransformConfig, None, base=dict(stored))
    except ConfigError as exc:
        raise ConfigError(f"{url}: stored transform settings: {exc}") from exc


def trained_recon_settings(url: str) -> dict:
    """The coil/normalisation settings (:data:`COIL_SETTINGS`) a published backbone was trained with."""
    cfg = trained_transform(url)
    return {} if cfg is None else {k: getattr(cfg, k) for k in COIL_SETTINGS if getattr(cfg, k) is not None}


def resolve_coil_settings(cfg: EvalReconConfig) -> EvalReconConfig:
    """Fill unset coil handling from the backbone's training (the same inputs it learned on)."""
    trained = trained_recon_settings(cfg.backbone)
    if cfg.virtual_coils is None:
        cfg.virtual_coils = trained.get("virtual_coils")
    if not cfg.coil_compression:
        cfg.coil_compression = trained.get("coil_compression", "svd")
    if not cfg.normalisation:
        cfg.normalisation = trained.get("normalisation", "max")
    if cfg.prewhiten is None:
        cfg.prewhiten = bool(trained.get("prewhiten", False))
    if not cfg.combine:
        cfg.combine = trained.get("combine", "rss")
    if cfg.espirit is None:
        cfg.espirit = dict(trained.get("espirit") or {})
    return cfg


def _slices(cfg: EvalReconConfig) -> list[dict]:
    out = []
    for sample in iter_samples(cfg.source, cfg.split, RECON_FIELDS, require=("kspace",)):
        out.append(sample)
        if cfg.max_slices and len(out) >= cfg.max_slices:
            break
    if not out:
        raise ConfigError(f"key 'source': no reconstruction slices in split '{cfg.split}' of {cfg.source}")
    return out


@torch.no_grad()
def _run_models(models: dict, batch: dict, device: str) -> dict[str, np.ndarray]:
    k, mask = batch["masked_kspace"].to(device), batch["mask"].to(device)
    out = {name: m(k, mask, batch["num_low_frequencies"])[0].float().cpu().numpy() for name, m in models.items()}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out


def evaluate_setting(cfg: EvalReconConfig, models: dict, slices: list[dict], kind: str, acc: float):
    """Per-volume rows for one mask kind and acceleration, plus examples for the figure and timing."""
    tcfg = ReconTransformConfig(masks=[{"kind": kind, "acceleration": acc, "center_fraction": cfg.center_fraction(acc)}],
                                virtual_coils=cfg.virtual_coils, coil_compression=cfg.coil_compression,
                                normalisation=cfg.normalisation,
                                prewhiten=bool(cfg.prewhiten), combine=cfg.combine or "rss",
                                espirit=dict(cfg.espirit or {}), seed=cfg.seed)
    transform, acc_store = ReconTransform(tcfg), VolumeAccumulator()
    examples, seconds = [], {name: 0.0 for name in models}
    for sample in tqdm(slices, desc=f"{kind} x{acc:g}", unit="slice", leave=False):
        item = transform(sample)
        batch = collate_recon([item])
        target = item["target"].numpy()
        outs = {"zero-filled": item["zero_filled"].numpy()}
        for name, m in models.items():
            t0 = time.perf_counter()
            outs[name] = _run_models({name: m}, batch, cfg.device)[name]
            seconds[name] += time.perf_counter() - t0
        meta = item["meta"]
        volume = f"{meta.get('study', item['key'])}/{meta.get('orientation', '')}"
        for method, image in outs.items():
            acc_store.add(volume, meta.get("anatomy", "unknown"), method, int(meta.get("slice", 0)), target, image)
        if len(examples) < cfg.figure_slices:
            examples.append((item["key"], target, {k: center_crop(v, target.shape) for k, v in outs.items()}))
    rows = [r | {"mask": kind, "acceleration": acc} for r in acc_store.per_volume()]
    speed = {name: len(slices) / s for name, s in seconds.items() if s > 0}
    return rows, examples, speed


def format_table(summary: list[dict], kind: str, acc: float) -> str:
    lines = [f"### {kind}, {acc:g}x", "", "| anatomy | method | volumes | NMSE | PSNR | SSIM |", "|---|---|---|---|---|---|"]
    for r in summary:
        if r["mask"] == kind and r["acceleration"] == acc:
            lines.append(f"| {r['group']} | {r['method']} | {r['volumes']} | {r['nmse']:.4f} | {r['psnr']:.2f} | "
                         f"{r['ssim']:.4f} |")
    return "\n".join(lines)


def save_figure(examples: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(examples[0][2])
    cols = 1 + 2 * len(methods)
    fig, axes = plt.subplots(len(examples), cols, figsize=(2.2 * cols, 2.3 * len(examples)), squeeze=False)
    for row, (key, target, outs) in enumerate(examples):
        vmax = float(target.max())
        panels = [("target", target, "gray", vmax)]
        for m in methods:
            panels += [(m, outs[m], "gray", vmax), (f"|{m} - target|", np.abs(outs[m] - target), "magma", vmax / 4)]
        for ax, (name, img, cmap, vm) in zip(axes[row], panels):
            ax.imshow(img, cmap=cmap, vmin=0, vmax=vm)
            ax.set_title(name if row == 0 else "", fontsize=7)
            ax.set_xticks([]), ax.set_yticks([])
        axes[row][0].set_ylabel(key, fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_recon(cfg: EvalReconConfig) -> dict:
    """Run the evaluation, write the run folder, return ``{"summary", "volumes", "throughput", "tables"}``."""
    from .publish import load_recon_backbone

    torch.manual_seed(cfg.seed)
    cfg = resolve_coil_settings(cfg)
    models = {"backbone": load_recon_backbone(cfg.backbone, device=cfg.device)}
    models |= {name: load_recon_backbone(url, device=cfg.device) for name, url in cfg.baselines.items()}
    slices = _slices(cfg)
    out_dir = Path(cfg.run_root) / cfg.name
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    volumes, tables, throughput = [], [], {}
    for kind in cfg.masks:
        for acc in cfg.accelerations:
            rows, examples, speed = evaluate_setting(cfg, models, slices, kind, float(acc))
            volumes += rows
            throughput[f"{kind}/{acc:g}"] = speed
            if kind == cfg.masks[0] and acc == cfg.accelerations[0] and examples:
                save_figure(examples, out_dir / "examples.png", f"{kind}, {acc:g}x")
    summary = summarise(volumes, ("mask", "acceleration", "group", "method"))
    summary += [r | {"group": "all"} for r in summarise(volumes, ("mask", "acceleration", "method"))]
    for kind in cfg.masks:
        for acc in cfg.accelerations:
            tables.append(format_table(summary, kind, float(acc)))
    result = {"summary": summary, "volumes": volumes, "throughput_slices_per_s": throughput,
              "slices": len(slices), "device": cfg.device}
    write_metrics(out_dir, result)
    (out_dir / "table.md").write_text("\n\n".join(tables) + "\n")
    return result | {"tables": tables, "run_dir": str(out_dir)}
