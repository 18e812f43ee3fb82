"""The box-prompted segmentation study (the SAM study's protocol) on mskfm's own backbone.

For every present structure of every test study one box prompt is drawn from the ground truth
(:mod:`.boxes`). Methods, scored per structure on the same test studies and native grids:

- ``box``: the box itself as the mask (what the prompt alone gives);
- ``zero_shot``: a :class:`~downstream.heads.prompted.BoxPromptDecoder` on frozen backbone features,
  trained only on the ``source_joints``' structures, never on the target anatomy;
- ``fine_tuned``: that decoder trained further on the target anatomy's training studies;
- ``prompt_free``: a published ``seg3d`` model (no prompt), when ``prompt_free`` names one;
- ``sam``: Segment Anything (``segment_anything`` package, user-supplied ``sam.checkpoint``), slice by
  slice with the box's 2D extent, when configured. It needs torchvision, which does not load on this
  machine's image: that path is untested here and refused with a clear message where it cannot import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch.nn import functional as F

from pretrain.preprocess import preprocess_volume
from pretrain.publish import load_backbone
from pretrain.seg.publish import load_seg_model
from shards.config import ConfigError, UserError, load_config
from shards.labelmaps import structure_tables, to_classes, union_structures
from shards.manifest import load_manifest
from shards.reader import iter_samples
from shards.runs import default_folder, write_run

from ..heads.prompted import BoxPromptDecoder
from ..train import fit, seed_everything
from .boxes import prompt_boxes
from .evaluate import segment
from .report import fmt
from .scores import bootstrap_mean, case_scores

METHODS = ("box", "zero_shot", "fine_tuned", "prompt_free", "sam")


@dataclass
class DecoderTrain:
    epochs: int = 30
    lr: float = 0.003
    batch_size: int = 8
    hidden: int = 16


@dataclass
class SamConfig:
    checkpoint: str = ""       # user-supplied Segment Anything weights; empty = not run
    model_type: str = "vit_b"


@dataclass
class PromptStudyConfig:
    name: str = "prompt-seg"
    backbone: str = ""                                       # published diffusion backbone (its plane is used)
    shards: str = ""
    source_joints: list[str] = field(default_factory=list)  # zero-shot: the decoder learns these anatomies only
    target_joints: list[str] = field(default_factory=list)  # tested (and fine-tuned) on these
    train_split: str = "train"
    test_split: str = "test"
    max_train_studies: int = 0                               # fine-tuning studies of the target (0 = all)
    jitter: float = 0.1                                      # box faces move by up to this x the extent
    seed: int = 0
    timestep: int = 25
    blocks: list[str] = field(default_factory=lambda: ["mid", "up.0", "up.1"])
    train: DecoderTrain = field(default_factory=DecoderTrain)
    fine_tune: DecoderTrain = field(default_factory=lambda: DecoderTrain(epochs=15, lr=0.001))
    prompt_free: str = ""                                    # published seg3d model scored on the same studies
    sam: SamConfig = field(default_factory=SamConfig)
    bootstrap: int = 1000
    ci: float = 0.95
    run_root: str = field(default_factory=default_folder("seg3d"))

    def validate(self) -> None:
        if not self.backbone or not self.shards:
            raise ConfigError("keys 'backbone' and 'shards' are required")
        if not self.source_joints or not self.target_joints:
            raise ConfigError("keys 'source_joints' and 'target_joints' must each name at least one anatomy")
        if set(self.source_joints) & set(self.target_joints):
            raise ConfigError(f"keys 'source_joints'/'target_joints' overlap: {sorted(set(self.source_joints) & set(self.target_joints))}"
                              " (zero-shot means the target anatomy is never trained on)")
        if not 0.0 <= self.jitter < 1.0:
            raise ConfigError(f"key 'jitter': {self.jitter} must be in [0, 1)")


class Studies:
    """The studies of one split and anatomies: native image and class map, and the frozen backbone's
    feature maps on its preprocessed grid (computed once per study)."""

    def __init__(self, cfg: PromptStudyConfig, backbone, spec, classes, tables, split, joints, limit=0):
        plane = spec.plane
        fields = (plane, f"{plane}.seg", "meta")
        self.items = []
        for sample in iter_samples(cfg.shards, split, fields, require=fields[:2], joints=joints):
            meta = sample["meta"]
            declared = meta.get("structures") or tables[meta["joint"]]
            truth = to_classes(np.asarray(sample[f"{plane}.seg"]), declared, classes)
            truth = np.where(truth == 255, 0, truth)
            with torch.no_grad():
                maps = backbone.features(preprocess_volume(sample[plane], spec)[None], [cfg.timestep], cfg.blocks)
            self.items.append({"key": sample["__key__"], "joint": meta["joint"], "image": sample[plane],
                               "truth": truth, "spacing": meta["planes"][plane]["spacing"],
                               "maps": [m[0] for m in maps.values()]})
            if limit and len(self.items) >= limit:
                break
        if not self.items:
            raise UserError(f"no {plane} study with a label map of {joints} in split '{split}' of {cfg.shards}")


def to_grid(mask: np.ndarray, shape) -> torch.Tensor:
    """A native-grid mask resampled (nearest) to the backbone grid: (1, *shape) float."""
    return F.interpolate(torch.as_tensor(mask, dtype=torch.float32)[None, None], size=list(shape), mode="nearest")[0]


def prompts_of(studies: Studies, classes, cfg: PromptStudyConfig) -> tuple[list[dict], list[dict]]:
    prompts, problems = [], []
    for i, item in enumerate(studies.items):
        boxes, bad = prompt_boxes(item["truth"], classes, item["key"], cfg.jitter, cfg.seed)
        problems += bad
        prompts += [{"study": i, "box": b, "k": classes.index(b.structure) + 1} for b in boxes]
    return prompts, problems


def decoder_batches(studies: Studies, prompts: list[dict], grid):
    def get(idx):
        ps = [prompts[i] for i in idx]
        items = [studies.items[p["study"]] for p in ps]
        maps = [torch.stack([it["maps"][b] for it in items]) for b in range(len(items[0]["maps"]))]
        box = torch.stack([to_grid(p["box"].mask(it["truth"].shape), grid) for p, it in zip(ps, items)])
        target = torch.stack([to_grid(it["truth"] == p["k"], grid) for p, it in zip(ps, items)])
        return {"maps": maps, "box": box}, target
    return get


def train_decoder(decoder, studies, prompts, grid, train: DecoderTrain, seed: int, desc: str):
    if not prompts:
        raise UserError(f"{desc}: no box prompt to train on")
    seed_everything(seed)
    return fit(decoder, decoder_batches(studies, prompts, grid), np.arange(len(prompts)),
               DiceCELoss(sigmoid=True), epochs=train.epochs, lr=train.lr, batch_size=train.batch_size,
               seed=seed, desc=desc)


@torch.no_grad()
def decoder_mask(decoder, item, box, grid) -> np.ndarray:
    logits = decoder({"maps": [m[None] for m in item["maps"]], "box": to_grid(box.mask(item["truth"].shape), grid)[None]})
    return (F.interpolate(logits, size=list(item["truth"].shape), mode="trilinear", align_corners=False)[0, 0] > 0).numpy()


def sam_segmenter(sam: SamConfig):
    """Segment Anything with user-supplied weights, slice by slice; refused clearly where it cannot import."""
    try:
        from segment_anything import SamPredictor, sam_model_registry
    except Exception as exc:  # the package, or torchvision under it, is missing or cannot load
        raise UserError(f"sam.checkpoint is set but segment_anything cannot be imported here ({exc}); it needs "
                        "torchvision (a GPU machine's image). Install segment-anything there, or unset "
                        "sam.checkpoint") from exc
    predictor = SamPredictor(sam_model_registry[sam.model_type](checkpoint=sam.checkpoint))

    def run(image: np.ndarray, box) -> np.ndarray:
        out = np.zeros(image.shape, bool)
        scale = 255.0 / max(float(np.percentile(image, 99.5)), 1e-6)
        for z in range(box.lo[0], box.hi[0]):
            rgb = np.repeat(np.clip(image[z] * scale, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
            predictor.set_image(rgb)
            xyxy = np.array([box.lo[2], box.lo[1], box.hi[2] - 1, box.hi[1] - 1])
            masks, _, _ = predictor.predict(box=xyxy, multimask_output=False)
            out[z] = masks[0]
        return out
    return run


def score(pred: np.ndarray, truth: np.ndarray, spacing) -> tuple[float, float]:
    s = case_scores(pred.astype(np.int64), truth.astype(np.int64), 2, spacing)
    return float(s["dice"][0]), float(s["hd95"][0])


def run_prompt_study(config: str | Path | None, overrides=(), run_dir: str | Path | None = None) -> dict:
    cfg = load_config(PromptStudyConfig, config, overrides)
    backbone, _, spec = load_backbone(cfg.backbone)
    if spec is None or spec.spatial != "resize":
        raise ConfigError(f"key 'backbone': {cfg.backbone} must carry a 'resize' preprocessing spec")
    tables = structure_tables(load_manifest(cfg.shards), cfg.source_joints + cfg.target_joints)
    classes = union_structures(tables)
    grid = [int(s) for s in spec.shape]
    channels = [backbone.block_channels()[b] for b in cfg.blocks]
    source = Studies(cfg, backbone, spec, classes, tables, cfg.train_split, cfg.source_joints)
    target_train = Studies(cfg, backbone, spec, classes, tables, cfg.train_split, cfg.target_joints, cfg.max_train_studies)
    test = Studies(cfg, backbone, spec, classes, tables, cfg.test_split, cfg.target_joints)
    decoder = BoxPromptDecoder(channels, grid, cfg.train.hidden)
    history = {"zero_shot": train_decoder(decoder, source, prompts_of(source, classes, cfg)[0], grid, cfg.train,
                                          cfg.seed, "zero-shot decoder")}
    zero_shot = {k: v.clone() for k, v in decoder.state_dict().items()}
    tuned = BoxPromptDecoder(channels, grid, cfg.train.hidden)
    tuned.load_state_dict(zero_shot)
    history["fine_tuned"] = train_decoder(tuned, target_train, prompts_of(target_train, classes, cfg)[0], grid,
                                          cfg.fine_tune, cfg.seed, "fine-tuned decoder")
    seg_model = load_seg_model(cfg.prompt_free)[0] if cfg.prompt_free else None
    sam = sam_segmenter(cfg.sam) if cfg.sam.checkpoint else None
    prompts, problems = prompts_of(test, classes, cfg)
    rows = score_prompts(test, prompts, classes, grid, decoder, tuned, seg_model, sam)
    metrics = {"classes": classes, "n_test_studies": len(test.items), "n_prompts": len(prompts),
               "box_problems": problems, "history": history,
               "methods": summarise_methods(rows, cfg.bootstrap, cfg.ci, cfg.seed)}
    folder = Path(run_dir or Path(cfg.run_root) / cfg.name)
    write_run(folder, cfg, metrics)
    (folder / "prompts.jsonl").write_text("".join(f"{_json(r)}\n" for r in rows))
    (folder / "report.md").write_text(render_prompt_report(cfg, metrics))
    return {"run_dir": folder, "metrics": metrics, "rows": rows}


def score_prompts(test: Studies, prompts, classes, grid, zero_shot, tuned, seg_model, sam) -> list[dict]:
    full = {}
    rows = []
    for p in prompts:
        item, box = test.items[p["study"]], p["box"]
        truth = item["truth"] == p["k"]
        preds = {"box": box.mask(truth.shape), "zero_shot": decoder_mask(zero_shot, item, box, grid),
                 "fine_tuned": decoder_mask(tuned, item, box, grid)}
        if seg_model is not None:
            if p["study"] not in full:
                full[p["study"]] = segment(seg_model, item["image"])
            model_classes = list(seg_model.config.structures)
            name = classes[p["k"] - 1]
            preds["prompt_free"] = (full[p["study"]] == model_classes.index(name) + 1 if name in model_classes
                                    else np.zeros_like(truth))
        if sam is not None:
            preds["sam"] = sam(item["image"], box)
        row = {"study": item["key"], "joint": item["joint"], "structure": box.structure, "clipped": box.clipped}
        for method, pred in preds.items():
            row[f"{method}_dice"], row[f"{method}_hd95"] = score(pred, truth, item["spacing"])
        rows.append(row)
    return rows


def summarise_methods(rows: list[dict], n_boot: int, ci: float, seed: int) -> dict:
    out = {}
    for method in METHODS:
        key = f"{method}_dice"
        if not rows or key not in rows[0]:
            continue
        structures = sorted({r["structure"] for r in rows}, key=[r["structure"] for r in rows].index)
        joints = sorted({r["joint"] for r in rows})
        out[method] = {
            "per_structure": {s: {m: bootstrap_mean([r[f"{method}_{m}"] for r in rows if r["structure"] == s],
                                                    n_boot, ci, seed) for m in ("dice", "hd95")} for s in structures},
            "per_region": {j: bootstrap_mean([r[key] for r in rows if r["joint"] == j], n_boot, ci, seed) for j in joints},
            "overall": bootstrap_mean([r[key] for r in rows], n_boot, ci, seed)}
    return out


def render_prompt_report(cfg: PromptStudyConfig, metrics: dict) -> str:
    methods = list(metrics["methods"])
    first = metrics["methods"][methods[0]]
    lines = [f"# Box-prompted segmentation: {cfg.name}", "",
             f"Backbone {cfg.backbone}; zero-shot decoder trained on {cfg.source_joints}, tested on {cfg.target_joints} "
             f"({metrics['n_test_studies']} test studies, {metrics['n_prompts']} prompts, box jitter {cfg.jitter}, "
             f"seed {cfg.seed}). Dice per prompt on the native grid: mean [95% bootstrap interval] (n).", "",
             f"| structure | {' | '.join(methods)} |", "|---|" + "---|" * len(methods)]
    for s in first["per_structure"]:
        lines.append(f"| {s} | {' | '.join(fmt(metrics['methods'][m]['per_structure'][s]['dice']) for m in methods)} |")
    for j in first["per_region"]:
        lines.append(f"| **region {j}** | {' | '.join(fmt(metrics['methods'][m]['per_region'][j]) for m in methods)} |")
    lines.append(f"| **all** | {' | '.join(fmt(metrics['methods'][m]['overall']) for m in methods)} |")
    if metrics["box_problems"]:
        lines += ["", "## Boxes outside the volume", ""]
        lines += [f"- study {p['study']}, {p['structure']}: {p['problem']}" for p in metrics["box_problems"]]
    if not cfg.sam.checkpoint:
        lines += ["", "Segment Anything was not run (no `sam.checkpoint`; it needs torchvision, untested on CPU here)."]
    return "\n".join(lines) + "\n"


def _json(row: dict) -> str:
    import json

    return json.dumps({k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()})
