"""Multi-label diagnosis: the task's head on frozen-backbone features, EHR variants, the reference
probe and baselines.

Every trained model uses the same training rows, the same masked loss (unknown labels add nothing)
weighted per label by the training rows' class balance (``pos_weight``; a multiclass/ordinal label is a
softmax over its class outputs with a masked cross-entropy, :mod:`downstream.labels`), and the same model selection
on the selection split (:func:`downstream.train.fit_selected`). Each predicts the selection rows (for
decision thresholds) and the evaluation rows; results come back as study-level probabilities.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pandas as pd
import torch

from .experts import run_experts
from .heads.baselines import MRNet2D, Scratch3DClassifier
from .heads.ehr import EHRFusion, EHRHead, encode_tabular, fit_tabular
from .heads.fusion import build_feature_model
from .heads.probe import LogisticProbe, fit_probe
from .heads.tuned import TunedBackbone
from .inputs import PlaneData
from .labels import label_loss, to_probs
from .train import fit_selected, pos_weights, predict, seed_everything


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


def _probs(model, batcher, rows, device: str, outputs: list[str] | None = None) -> np.ndarray:
    """Probabilities of ``rows``: softmax over class outputs when ``outputs`` names them, else sigmoid
    per output (one-vs-rest: the probe)."""
    if len(rows) == 0:
        return np.zeros((0, 0), np.float32)
    logits = predict(model, batcher, rows, device=device)
    return (to_probs(logits, outputs) if outputs else torch.sigmoid(logits)).numpy()


def train_predict(task, build, batcher, y: np.ndarray, rows: dict[str, np.ndarray], desc: str,
                  epochs: int | None = None, lr: float | None = None, param_groups=None,
                  weight_decays: list[float] | None = None) -> dict:
    """Train ``build()`` with selection on ``rows["select"]``; predict ``rows["select"]`` and ``rows["eval"]``."""
    t = task.train
    loss = label_loss(task.labels, pos_weights(y[rows["train"]]))
    model, history, selection = fit_selected(
        build, batcher, rows["train"], rows["select"], loss, epochs=epochs or t.epochs, lr=lr or t.lr,
        weight_decays=weight_decays or [t.weight_decay], patience=t.patience, batch_size=t.batch_size, seed=t.seed,
        param_groups=param_groups, desc=desc, device=task.device)
    chosen = asdict(selection)
    if chosen["per_label"] is not None:
        chosen["per_label"] = dict(zip(task.labels, chosen["per_label"]))
    return {"probs": _probs(model, batcher, rows["eval"], task.device, task.labels), "history": history,
            "model": model, "select_probs": _probs(model, batcher, rows["select"], task.device, task.labels),
            "selection": chosen}


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


def run_probe(task, feats: dict, channels: dict, frame: pd.DataFrame, y: np.ndarray, rows: dict) -> dict:
    """The closed-form reference probe (:mod:`downstream.heads.probe`) on ``feats``."""
    probe = LogisticProbe(channels, len(task.labels))
    batcher = feature_batcher(feats, y)
    chosen = fit_probe(probe, batcher, rows["train"], y, frame["patient"].to_numpy(), task.probe.cs,
                       task.probe.folds, task.train.seed)
    return {"probs": _probs(probe, batcher, rows["eval"], "cpu"), "history": [], "model": probe.eval(),
            "select_probs": _probs(probe, batcher, rows["select"], "cpu"),
            "selection": {"C": dict(zip(task.labels, chosen))}}


def _head_on(task, feats: dict, channels: dict, frame: pd.DataFrame, y: np.ndarray, rows: dict, desc: str) -> dict:
    """The task's head (single plane, feature/label-level fusion, plane experts, or the probe) on ``feats``."""
    if task.head.kind == "logistic":
        return run_probe(task, feats, channels, frame, y, rows)
    if task.fusion.kind == "experts" and len(feats) > 1:
        batchers = {p: feature_batcher({p: f}, y) for p, f in feats.items()}
        both = np.concatenate([rows["select"], rows["eval"]])
        res = run_experts(task, batchers, channels, frame, y, rows["train"], both)
        n = len(rows["select"])
        res["select_probs"], res["probs"] = res["probs"][:n], res["probs"][n:]
        res["weights"] = res["weights"][res["weights"]["patient"].isin(set(frame["patient"].iloc[rows["eval"]]))]
        return res
    res = train_predict(task, lambda: _image_model(task, channels), feature_batcher(feats, y), y, rows, desc,
                        weight_decays=list(task.train.weight_decay_grid))
    res["weights"] = _fusion_table(res["model"], list(feats), task.labels)
    return res


def run_diagnosis(task, frame: pd.DataFrame, planes: dict[str, PlaneData], rows: dict[str, np.ndarray]) -> dict[str, dict]:
    """``{model name: {"probs": (n_eval, L), "select_probs": (n_select, L), "history": [...], "model": module,
    "selection": {...}, "weights": frame?}}``; ``rows``: ``train``, ``select`` and ``eval`` row indices."""
    y = frame[task.labels].to_numpy(np.float32)
    feats = {p: d.features for p, d in planes.items()}
    channels = {p: d.channels() for p, d in planes.items()}
    results: dict[str, dict] = {}

    seed_everything(task.train.seed)
    if task.head.finetune_blocks:
        def tuned():
            return TunedBackbone({p: d.model for p, d in planes.items()}, _image_model(task, channels),
                                 task.features, list(task.head.finetune_blocks))
        results["diffusion"] = train_predict(task, tuned, volume_batcher(planes, y), y, rows, "finetune",
                                             param_groups=lambda m: m.param_groups(task.train.lr,
                                                                                   task.head.finetune_lr_scale))
    else:
        results["diffusion"] = _head_on(task, feats, channels, frame, y, rows, "head")
    if task.probe.enabled and task.head.kind != "logistic":
        results["probe"] = run_probe(task, feats, channels, frame, y, rows)

    if task.ehr.enabled:
        tab = fit_tabular(frame.iloc[rows["train"]], task.ehr)
        ehr = encode_tabular(frame, tab)
        batcher = feature_batcher(feats, y, ehr)

        def ehr_head():
            return EHRHead(tab, len(task.labels), task.ehr.embed_dim, task.ehr.hidden, task.head.dropout)

        results["ehr_only"] = train_predict(task, ehr_head, batcher, y, rows, "ehr only")
        results["diffusion+ehr"] = train_predict(
            task, lambda: EHRFusion(_image_model(task, channels), ehr_head(), len(task.labels)), batcher, y, rows,
            "image+ehr")
        results["diffusion+ehr"]["weights"] = _fusion_table(results["diffusion+ehr"]["model"], list(planes), task.labels)
        results["diffusion+ehr"]["tabular"] = tab

    results.update(run_baselines(task, frame, planes, y, rows))
    return results


def run_baselines(task, frame: pd.DataFrame, planes: dict[str, PlaneData], y: np.ndarray, rows: dict) -> dict[str, dict]:
    out = {}
    b = task.baselines
    epochs = b.epochs_for(len(rows["train"]), task.train.batch_size)
    for name in b.names:
        seed_everything(task.train.seed)
        if name == "random_backbone":
            feats = {p: d.random_features for p, d in planes.items()}
            channels = {p: d.channels(random=True) for p, d in planes.items()}
            out[name] = _head_on(task, feats, channels, frame, y, rows, name)
            if task.probe.enabled and task.head.kind != "logistic":
                out[f"{name}_probe"] = run_probe(task, feats, channels, frame, y, rows)
        elif name == "scratch_cnn":
            out[name] = train_predict(task, lambda: Scratch3DClassifier(list(planes), len(task.labels), b.cnn_channels),
                                      volume_batcher(planes, y), y, rows, name, epochs=epochs, lr=b.lr)
        elif name == "mrnet_2d":
            out[name] = train_predict(task, lambda: MRNet2D(list(planes), len(task.labels), b.encoder_2d, b.cnn_channels),
                                      volume_batcher(planes, y), y, rows, name, epochs=epochs, lr=b.lr)
            out[name]["encoder"] = out[name]["model"].source
    return out
