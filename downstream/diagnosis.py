"""Multi-label diagnosis: the task's head on frozen-backbone features, EHR variants and baselines.

Every model is trained on the same training rows with the same masked loss (unknown labels add
nothing) and predicts the same evaluation rows; results come back as study-level probabilities.
"""

from __future__ import annotations


import numpy as np
import pandas as pd
import torch

from .experts import run_experts
from .heads.baselines import MRNet2D, Scratch3DClassifier
from .heads.ehr import EHRFusion, EHRHead, encode_tabular, fit_tabular
from .heads.fusion import build_feature_model
from .heads.tuned import TunedBackbone
from .inputs import PlaneData
from .train import fit, masked_bce, predict, seed_everything


def feature_batcher(feats: dict[str, dict[str, np.ndarray]], y: np.ndarray, ehr: dict | None = None):
    arrays = {plane: list(f.values()) for plane, f in feats.items()}

    def get(idx: np.ndarray):
        inputs: dict = {plane: [torch.from_numpy(np.ascontiguousarray(a[idx])) for a in arrs]
                        for plane, arrs in arrays.items()}
        if ehr is not None:
            inputs["ehr"] = {k: v[idx] for k, v in ehr.items()}
        return inputs, torch.from_numpy(y[idx])

    return get


def volume_batcher(planes: dict[str, PlaneData], y: np.ndarray):
    def get(idx: np.ndarray):
        return ({p: torch.from_numpy(np.ascontiguousarray(d.volumes[idx])) for p, d in planes.items()},
                torch.from_numpy(y[idx]))

    return get


def train_predict(task, model, batcher, train_rows, eval_rows, desc: str, epochs: int | None = None,
                  lr: float | None = None, param_groups=None) -> dict:
    t = task.train
    history = fit(model, batcher, train_rows, masked_bce, epochs=epochs or t.epochs, lr=lr or t.lr,
                  weight_decay=t.weight_decay, batch_size=t.batch_size, seed=t.seed, desc=desc,
                  param_groups=param_groups, device=task.device)
    probs = torch.sigmoid(predict(model, batcher, eval_rows, device=task.device)).numpy()
    return {"probs": probs, "history": history, "model": model}


def _image_model(task, channels: dict[str, list[int]]):
    return build_feature_model(task.fusion.kind, channels, len(task.labels), task.head, task.features.pooling,
                               task.fusion)


def _fusion_table(model, planes: list[str], labels: list[str]) -> pd.DataFrame | None:
    """Learned per-label weights of label-level or EHR fusion, as rows (patient="all")."""
    if not hasattr(model, "fusion_weights"):
        return None
    w = model.fusion_weights().detach().numpy()
    sources = planes if w.shape[0] == len(planes) and not hasattr(model, "ehr") else ["image", "ehr"]
    return pd.DataFrame([{"patient": "all", "label": name, "plane": src, "weight": float(w[j, k])}
                         for j, src in enumerate(sources) for k, name in enumerate(labels)])


def _head_on(task, feats: dict, channels: dict, frame: pd.DataFrame, y: np.ndarray, train_rows, eval_rows,
             desc: str) -> dict:
    """The task's head (single plane, feature/label-level fusion, or plane experts) on ``feats``."""
    if task.fusion.kind == "experts" and len(feats) > 1:
        batchers = {p: feature_batcher({p: f}, y) for p, f in feats.items()}
        return run_experts(task, batchers, channels, frame, y, train_rows, eval_rows)
    res = train_predict(task, _image_model(task, channels), feature_batcher(feats, y), train_rows, eval_rows, desc)
    res["weights"] = _fusion_table(res["model"], list(feats), task.labels)
    return res


def run_diagnosis(task, frame: pd.DataFrame, planes: dict[str, PlaneData], train_rows: np.ndarray,
                  eval_rows: np.ndarray) -> dict[str, dict]:
    """``{model name: {"probs": (n_eval, L), "history": [...], "model": module, "weights": frame?}}``."""
    y = frame[task.labels].to_numpy(np.float32)
    feats = {p: d.features for p, d in planes.items()}
    channels = {p: d.channels() for p, d in planes.items()}
    results: dict[str, dict] = {}

    seed_everything(task.train.seed)
    if task.head.finetune_blocks:
        tuned = TunedBackbone({p: d.model for p, d in planes.items()}, _image_model(task, channels),
                              task.features, list(task.head.finetune_blocks))
        results["diffusion"] = train_predict(task, tuned, volume_batcher(planes, y), train_rows, eval_rows,
                                             "finetune", param_groups=tuned.param_groups(task.train.lr, task.head.finetune_lr_scale))
    else:
        results["diffusion"] = _head_on(task, feats, channels, frame, y, train_rows, eval_rows, "head")

    if task.ehr.enabled:
        tab = fit_tabular(frame.iloc[train_rows], task.ehr)
        ehr = encode_tabular(frame, tab)
        batcher = feature_batcher(feats, y, ehr)
        seed_everything(task.train.seed)
        ehr_head = EHRHead(tab, len(task.labels), task.ehr.embed_dim, task.ehr.hidden, task.head.dropout)
        results["ehr_only"] = train_predict(task, ehr_head, batcher, train_rows, eval_rows, "ehr only")
        seed_everything(task.train.seed)
        fused = EHRFusion(_image_model(task, channels),
                          EHRHead(tab, len(task.labels), task.ehr.embed_dim, task.ehr.hidden, task.head.dropout),
                          len(task.labels))
        results["diffusion+ehr"] = train_predict(task, fused, batcher, train_rows, eval_rows, "image+ehr")
        results["diffusion+ehr"]["weights"] = _fusion_table(fused, list(planes), task.labels)
        results["diffusion+ehr"]["tabular"] = tab

    results.update(run_baselines(task, frame, planes, y, train_rows, eval_rows))
    return results


def run_baselines(task, frame: pd.DataFrame, planes: dict[str, PlaneData], y: np.ndarray, train_rows,
                  eval_rows) -> dict[str, dict]:
    out = {}
    b = task.baselines
    for name in b.names:
        seed_everything(task.train.seed)
        if name == "random_backbone":
            out[name] = _head_on(task, {p: d.random_features for p, d in planes.items()},
                                 {p: d.channels(random=True) for p, d in planes.items()}, frame, y, train_rows,
                                 eval_rows, name)
        elif name == "scratch_cnn":
            model = Scratch3DClassifier(list(planes), len(task.labels), b.cnn_channels)
            out[name] = train_predict(task, model, volume_batcher(planes, y), train_rows, eval_rows, name,
                                      epochs=b.epochs, lr=b.lr)
        elif name == "mrnet_2d":
            model = MRNet2D(list(planes), len(task.labels), b.encoder_2d, b.cnn_channels)
            out[name] = train_predict(task, model, volume_batcher(planes, y), train_rows, eval_rows,
                                      f"{name} ({model.source})", epochs=b.epochs, lr=b.lr)
            out[name]["encoder"] = model.source
    return out
