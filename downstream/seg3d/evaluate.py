"""Score a published ``seg3d`` model on named test sets (``internal``, ``external``, ...), each
study on its native grid, and write ``runs/seg3d/<name>/`` (config, metrics.json, per-case CSV,
report.md with the sets side by side).

The external set is a site, vendor or field strength held out of training: ``hold_out`` names the
meta field and its held-out values, and the run refuses an internal set that holds one of them or an
external set that holds another. Label maps with values their anatomy does not declare are scored
without those voxels and named in the report, study by study.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.transforms import NormalizeIntensity

from pretrain.seg.inference import predict_labels
from pretrain.seg.publish import load_seg_model
from shards.config import ConfigError, UserError, load_config
from shards.labelmaps import to_classes, undeclared_values
from shards.reader import iter_samples
from shards.runs import default_folder, write_run

from .report import render_report
from .scores import case_scores, summarise

META_FIELDS = ("site", "vendor", "field_strength")


@dataclass
class TestSetConfig:
    source: str = ""          # shard folder or URL
    split: str = "test"
    max_studies: int = 0      # 0 = all


@dataclass
class SegEvalConfig:
    name: str = "seg3d-eval"
    model: str = ""                                           # published seg3d model (folder or URL)
    sets: dict[str, TestSetConfig] = field(default_factory=dict)
    hold_out: dict[str, list[str]] = field(default_factory=dict)  # meta field -> values kept out of training
    external: list[str] = field(default_factory=lambda: ["external"])  # which sets are external
    bootstrap: int = 1000
    ci: float = 0.95
    seed: int = 0
    run_root: str = field(default_factory=default_folder("seg3d"))

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("key 'model': give the published seg3d model to score")
        if not self.sets or any(not s.source for s in self.sets.values()):
            raise ConfigError("key 'sets': give at least one test set with a source, e.g. sets.internal.source=...")
        bad = [f for f in self.hold_out if f not in META_FIELDS]
        if bad:
            raise ConfigError(f"key 'hold_out': {bad} unknown; known: {', '.join(META_FIELDS)}")


def normalise(image: np.ndarray) -> torch.Tensor:
    """The training input: per-volume z-score, (1, 1, S, R, C)."""
    x = torch.as_tensor(np.asarray(image, np.float32))[None]
    return NormalizeIntensity()(x).as_subclass(torch.Tensor)[None]


def segment(model, image: np.ndarray) -> np.ndarray:
    c = model.config
    return predict_labels(model, normalise(image), c.patch, c.overlap, c.mirror_axes)[0].numpy()


def iter_cases(model, labels: dict, test: TestSetConfig):
    """One record per study of ``test`` whose anatomy the model knows: truth and prediction (model
    classes), spacing, meta fields, undeclared label values."""
    plane, classes = model.config.plane, list(model.config.structures)
    fields = (plane, f"{plane}.seg", "meta")
    n = 0
    for sample in iter_samples(test.source, test.split, fields, require=fields[:2], joints=list(labels["tables"])):
        meta = sample["meta"]
        declared = meta.get("structures") or labels["tables"][meta["joint"]]
        seg = np.asarray(sample[f"{plane}.seg"])
        truth = to_classes(seg, declared, classes)
        pred = segment(model, sample[plane])
        unlabelled = truth == 255
        yield {"key": sample["__key__"], "joint": meta["joint"], **{f: meta.get(f) for f in META_FIELDS},
               "truth": np.where(unlabelled, 0, truth), "pred": np.where(unlabelled, 0, pred),
               "spacing": meta["planes"][plane]["spacing"], "undeclared": undeclared_values(seg, declared)}
        n += 1
        if test.max_studies and n >= test.max_studies:
            return


def check_hold_out(cfg: SegEvalConfig, name: str, cases: list[dict]) -> None:
    for fld, held in ((f, h) for f, h in cfg.hold_out.items() if h):
        seen = {str(c[fld]) for c in cases}
        wrong = seen - set(map(str, held)) if name in cfg.external else seen & set(map(str, held))
        if wrong:
            kind = "external" if name in cfg.external else "internal"
            raise UserError(f"test set '{name}' ({kind}) holds {fld} {sorted(wrong)}; held out of training: {held}")


def evaluate_sets(cfg: SegEvalConfig, model=None, labels=None) -> dict:
    """Score every set; returns ``{"sets": {name: summary}, "cases": DataFrame, "undeclared": [...]}``."""
    if model is None:
        model, labels = load_seg_model(cfg.model)
    classes = list(model.config.structures)
    regions = {j: [n for n in names if n in classes] for j, names in labels["tables"].items()}
    out, rows, undeclared = {}, [], []
    for name, test in cfg.sets.items():
        cases = []
        for case in iter_cases(model, labels, test):
            case.update(case_scores(case.pop("pred"), case.pop("truth"), len(classes) + 1, case["spacing"]))
            cases.append(case)
            if case["undeclared"]:
                undeclared.append({"set": name, "study": case["key"], "values": case["undeclared"]})
        if not cases:
            raise UserError(f"test set '{name}': no {model.config.plane} study with a label map of "
                            f"{list(labels['tables'])} in split '{test.split}' of {test.source}")
        check_hold_out(cfg, name, cases)
        out[name] = summarise(cases, classes, regions, cfg.bootstrap, cfg.ci, cfg.seed)
        out[name]["meta"] = {f: sorted({str(c[f]) for c in cases}) for f in META_FIELDS}
        for c in cases:
            rows += [{"set": name, "study": c["key"], "joint": c["joint"], "structure": s,
                      "dice": c["dice"][k], "hd95": c["hd95"][k], "present": bool(c["present"][k])}
                     for k, s in enumerate(classes) if s in regions[c["joint"]]]
    return {"sets": out, "cases": pd.DataFrame(rows), "undeclared": undeclared}


def run_seg_eval(config: str | Path | None, overrides=(), run_dir: str | Path | None = None) -> dict:
    cfg = load_config(SegEvalConfig, config, overrides)
    result = evaluate_sets(cfg)
    folder = Path(run_dir or Path(cfg.run_root) / cfg.name)
    metrics = {"model": cfg.model, "sets": result["sets"], "undeclared": result["undeclared"],
               "external": cfg.external, "hold_out": cfg.hold_out}
    write_run(folder, cfg, metrics)
    result["cases"].to_csv(folder / "cases.csv", index=False)
    (folder / "report.md").write_text(render_report(metrics))
    return {**result, "run_dir": folder, "metrics": metrics}
