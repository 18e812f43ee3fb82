"""MosaicMRI-style reconstruction studies: ``pretrain recon-study --config configs/sweeps/recon-*.yaml``.

- ``transfer``: train one backbone per anatomy (``anatomies``), evaluate each on every anatomy's
  validation slices: the cross-anatomy transfer matrix (rows: trained on, columns: tested on).
- ``data-size``: for each training size in ``sizes`` (slices), train on one anatomy alone
  (``single-<anatomy>-n<size>``) and on all ``anatomies`` mixed (``multi-n<size>``, the same number of
  slices split evenly over the anatomies), and test on
  every anatomy: does multi-anatomy data help at a given budget?

Each condition writes a seeded subset of the source's train split to ``<study>/data/<condition>``
(recon shards), runs the same training engine (``pretrain run`` with ``base_config`` + ``overrides``),
publishes to ``<study>/hub/<condition>`` and scores it with :func:`pretrain.recon.evaluate.evaluate_recon`.
Output: ``<run_root>/<name>/`` with ``config.yaml``, ``metrics.json`` (per condition x anatomy SSIM,
PSNR, NMSE), ``heatmap.png`` (the metric, conditions x test anatomies), and ``report.md`` /
``report.html`` (rendered by :mod:`shards.report`, as the downstream studies' reports).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shards.config import ConfigError, load_config, save_config, to_dict
from shards.reader import iter_samples
from shards.report import Report, write_report
from shards.resume import check_resume, saved_yaml
from shards.runs import default_folder, write_metrics
from shards.writer import ShardWriter

STUDY_KINDS = ("transfer", "data-size")
# keys whose change makes a study folder's subsets and runs stale (it resumes by condition name)
RESUME_KEYS = ("kind", "source", "anatomies", "sizes", "train_slices", "base_config", "overrides", "seed")


@dataclass
class ReconStudyConfig:
    name: str = "recon-transfer"
    kind: str = "transfer"
    source: str = "data/shards/demo/recon"
    anatomies: list[str] = field(default_factory=lambda: ["knee", "ankle", "shoulder"])
    sizes: list[int] = field(default_factory=lambda: [16, 64])   # training slices (data-size study)
    train_slices: int | None = None                                # cap per condition (transfer study)
    base_config: str = "configs/pretrain/recon-tiny.yaml"
    overrides: list[str] = field(default_factory=list)             # key=value for every training run
    masks: list[str] = field(default_factory=lambda: ["equispaced1d"])
    accelerations: list[float] = field(default_factory=lambda: [4.0])
    eval_split: str = "val"
    max_eval_slices: int | None = None
    metric: str = "ssim"
    seed: int = 0
    run_root: str = field(default_factory=default_folder("recon-study"))

    def validate(self) -> None:
        if self.kind not in STUDY_KINDS:
            raise ConfigError(f"key 'kind': '{self.kind}' is not one of {STUDY_KINDS}")
        if self.metric not in ("ssim", "psnr", "nmse"):
            raise ConfigError(f"key 'metric': '{self.metric}' is not one of ssim, psnr, nmse")
        if not self.anatomies:
            raise ConfigError("key 'anatomies': give at least one anatomy")
        if self.kind == "data-size" and (not self.sizes or min(self.sizes) < 1):
            raise ConfigError(f"key 'sizes': {self.sizes} must be positive slice counts")


def conditions(cfg: ReconStudyConfig) -> list[tuple[str, list[str], int | None]]:
    """(condition name, training anatomies, number of training slices or None for all)."""
    if cfg.kind == "transfer":
        return [(a, [a], cfg.train_slices) for a in cfg.anatomies]
    out = []
    for n in cfg.sizes:
        out += [(f"single-{a}-n{n}", [a], n) for a in cfg.anatomies]
        out.append((f"multi-n{n}", list(cfg.anatomies), n))
    return out


def train_keys(source: str, anatomies: list[str]) -> dict[str, list[str]]:
    """The train-split slice keys of ``source`` per anatomy; an anatomy without slices is an error."""
    keys: dict[str, list[str]] = {a: [] for a in anatomies}
    for s in iter_samples(source, "train", ("meta",), require=()):
        if s["meta"].get("anatomy") in keys:
            keys[s["meta"]["anatomy"]].append(s["__key__"])
    if missing := [a for a, k in keys.items() if not k]:
        raise ConfigError(f"key 'source': no train slices of {missing} in {source}")
    return keys


def choose_slices(keys: dict[str, list[str]], anatomies: list[str], n: int | None, seed: int) -> set[str]:
    """All train slices of ``anatomies``, or a seeded ``n`` split as evenly as possible over them (the
    first ones take the remainder), so a multi-anatomy condition is balanced."""
    if n is None:
        return {k for a in anatomies for k in keys[a]}
    rng, chosen = random.Random(seed), set()
    for i, anatomy in enumerate(anatomies):
        share = n // len(anatomies) + (i < n % len(anatomies))
        if share > len(keys[anatomy]):
            raise ConfigError(f"a condition needs {share} training slices of {anatomy}; the source's train split "
                              f"has {len(keys[anatomy])} (lower 'sizes' or 'train_slices')")
        chosen |= set(rng.sample(keys[anatomy], share))
    return chosen


def write_subset(source: str, out: Path, chosen: set[str], anatomies: list[str]) -> int:
    """Recon shards at ``out`` with the ``chosen`` train slices of ``source``."""
    with ShardWriter(out, kind="recon", info={"source": f"subset of {source}", "anatomies": anatomies}) as w:
        for s in iter_samples(source, "train", None):
            if s["__key__"] in chosen:
                w.write(s, "train")
    return len(chosen)


def run_condition(cfg: ReconStudyConfig, study_dir: Path, name: str, anatomies: list[str], chosen: set[str]) -> dict:
    from ..config import PretrainConfig
    from ..run import publish_run, train
    from .evaluate import EvalReconConfig, evaluate_recon

    data = study_dir / "data" / name
    count = write_subset(cfg.source, data, chosen, anatomies)
    common = [f"name={name}", f"data.source={data}", f"run_root={study_dir}/runs", f"storage_path={study_dir}/ckpt"]
    run_cfg = load_config(PretrainConfig, cfg.base_config, [*cfg.overrides, *common])
    train(run_cfg)
    hub = study_dir / "hub" / name
    published = next(iter(publish_run(run_cfg, str(hub), overwrite=True).values()))
    ev = EvalReconConfig(backbone=str(published), source=cfg.source, split=cfg.eval_split, masks=list(cfg.masks),
                         accelerations=list(cfg.accelerations), max_slices=cfg.max_eval_slices, name=name,
                         run_root=str(study_dir / "eval"), figure_slices=0)
    ev.validate()
    summary = evaluate_recon(ev)["summary"]
    scores = {}
    for test in cfg.anatomies:
        rows = [r for r in summary if r["group"] == test and r["method"] == "backbone"]
        if rows:
            scores[test] = {m: float(np.mean([r[m] for r in rows])) for m in ("ssim", "psnr", "nmse")}
    return {"condition": name, "train_anatomies": anatomies, "train_slices": count, "test": scores}


def save_heatmap(results: list[dict], anatomies: list[str], metric: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.array([[r["test"].get(a, {}).get(metric, np.nan) for a in anatomies] for r in results])
    fig, ax = plt.subplots(figsize=(1.4 * len(anatomies) + 2, 0.5 * len(results) + 1.5))
    im = ax.imshow(grid, cmap="viridis" if metric != "nmse" else "viridis_r", aspect="auto")
    ax.set_xticks(range(len(anatomies)), anatomies)
    ax.set_yticks(range(len(results)), [r["condition"] for r in results])
    ax.set_xlabel("tested on")
    ax.set_ylabel("trained on")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label=metric.upper())
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_resumable(cfg: ReconStudyConfig, study_dir: Path) -> None:
    """A study folder resumes by condition name, so its data and training settings must not change."""
    check_resume(saved_yaml(study_dir / "config.yaml"), to_dict(cfg), study_dir, "study", keys=RESUME_KEYS)


def run_study(cfg: ReconStudyConfig) -> dict:
    study_dir = (Path(cfg.run_root) / cfg.name).resolve()
    check_resumable(cfg, study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, study_dir / "config.yaml")
    keys = train_keys(cfg.source, list(cfg.anatomies))
    # every condition's subset is drawn (and checked) before the first training run starts
    subsets = [(name, anats, choose_slices(keys, anats, n, cfg.seed)) for name, anats, n in conditions(cfg)]
    results = [run_condition(cfg, study_dir, name, anats, chosen) for name, anats, chosen in subsets]
    write_metrics(study_dir, {"kind": cfg.kind, "results": results}, default=None)
    title = f"{cfg.kind}: {cfg.metric.upper()} ({', '.join(cfg.masks)} x{'/'.join(f'{a:g}' for a in cfg.accelerations)})"
    save_heatmap(results, list(cfg.anatomies), cfg.metric, study_dir / "heatmap.png", title)
    md, page = write_report(study_report(cfg, results, study_dir / "heatmap.png", title), study_dir)
    return {"results": results, "run_dir": str(study_dir), "report": str(md), "html": str(page)}


def study_report(cfg: ReconStudyConfig, results: list[dict], heatmap: Path, title: str) -> Report:
    """The study's report (the same renderer as the downstream studies): every condition's training
    slices and its SSIM, PSNR and NMSE per test anatomy (mean over the test anatomy's volumes)."""
    import pandas as pd

    rep = Report(f"Reconstruction study: {title}")
    rep.text(f"Rows: training condition ({cfg.kind}); each trained with `{cfg.base_config}` on a seeded subset "
             f"(seed {cfg.seed}) of the train split of {cfg.source}, scored on the {cfg.eval_split} split"
             + (f" (at most {cfg.max_eval_slices} slices)" if cfg.max_eval_slices else "") + ".")
    rows = [{"condition": r["condition"], "trained on": "+".join(r["train_anatomies"]),
             "train slices": r["train_slices"], "tested on": test, **{m: f"{v[m]:.4f}" for m in ("ssim", "psnr", "nmse")}}
            for r in results for test, v in r["test"].items()]
    rep.heading("Metrics per condition and test anatomy")
    rep.table(pd.DataFrame(rows))
    rep.image(heatmap, f"{cfg.metric.upper()}: conditions x test anatomies")
    return rep
