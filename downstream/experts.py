"""Per-label plane experts with a gating network trained on out-of-fold, patient-level predictions.

1. For each plane, a head (the task's head kind) is trained in K patient-grouped folds of the
   training set; its out-of-fold probabilities are averaged per patient.
2. A gating network maps a patient's per-plane probabilities to per-label plane weights (softmax
   over planes) and is trained on those out-of-fold predictions, so it never sees a plane expert's
   own training patients.
3. Experts retrained on the whole training set predict the evaluation patients; the gate mixes them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import GroupKFold

from .heads.fusion import GatingNetwork
from .heads.linear import PlaneHead
from .train import fit, masked_bce, predict, seed_everything


def _expert(task, plane: str, channels, batcher, fit_rows, pred_rows, seed: int) -> tuple[np.ndarray, PlaneHead]:
    seed_everything(seed)
    head = PlaneHead(plane, channels, len(task.labels), task.head.kind, task.features.pooling,
                     task.head.hidden, task.head.dropout)
    t = task.train
    fit(head, batcher, fit_rows, masked_bce, epochs=t.epochs, lr=t.lr, weight_decay=t.weight_decay,
        batch_size=t.batch_size, seed=seed, desc=f"expert {plane}", device=task.device)
    return torch.sigmoid(predict(head, batcher, pred_rows, device=task.device)).numpy(), head


def by_patient(patients: np.ndarray, probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean probabilities (.., P, L) and max of known labels per patient, sorted by patient."""
    order = np.array(sorted(set(patients)))
    p = np.stack([probs[patients == q].mean(axis=0) for q in order])
    with np.errstate(all="ignore"):
        lab = np.stack([np.nanmax(np.where(np.isnan(y[patients == q]), -np.inf, y[patients == q]), axis=0)
                        for q in order])
    lab[np.isinf(lab)] = np.nan
    return order, p.astype(np.float32), lab.astype(np.float32)


def run_experts(task, batchers: dict, channels: dict, frame: pd.DataFrame, y: np.ndarray,
                train_rows: np.ndarray, eval_rows: np.ndarray) -> dict:
    planes = list(batchers)
    patients = frame["patient"].to_numpy()
    n_folds = min(task.fusion.folds, len(set(patients[train_rows])))
    oof = np.zeros((len(train_rows), len(planes), len(task.labels)), np.float32)
    for fold, (fit_i, held_i) in enumerate(GroupKFold(n_splits=n_folds).split(train_rows, groups=patients[train_rows])):
        for j, plane in enumerate(planes):
            oof[held_i, j] = _expert(task, plane, channels[plane], batchers[plane], train_rows[fit_i],
                                     train_rows[held_i], task.train.seed + 101 * fold + j)[0]
    experts = {plane: _expert(task, plane, channels[plane], batchers[plane], train_rows, eval_rows, task.train.seed + j)
               for j, plane in enumerate(planes)}
    full = np.stack([experts[plane][0] for plane in planes], axis=1)
    _, oof_pat, y_pat = by_patient(patients[train_rows], oof, y[train_rows])
    eval_ids, eval_pat, _ = by_patient(patients[eval_rows], full, y[eval_rows])

    seed_everything(task.train.seed)
    gate = GatingNetwork(len(planes), len(task.labels), task.fusion.hidden)
    x_tr, y_tr = torch.from_numpy(oof_pat), torch.from_numpy(y_pat)
    history = fit(gate, lambda idx: (x_tr[idx], y_tr[idx]), np.arange(len(x_tr)), masked_bce,
                  epochs=task.train.epochs, lr=task.train.lr, weight_decay=task.train.weight_decay,
                  batch_size=task.train.batch_size, seed=task.train.seed, desc="gating")
    with torch.no_grad():
        x_ev = torch.from_numpy(eval_pat)
        weights = gate.weights(x_ev).numpy()                      # (patients, P, L)
        fused = torch.sigmoid(gate(x_ev)).numpy()                  # (patients, L)
    row_of = {q: i for i, q in enumerate(eval_ids)}
    study_probs = fused[[row_of[q] for q in patients[eval_rows]]]
    table = pd.DataFrame([{"patient": q, "label": name, "plane": plane, "weight": float(weights[i, j, k])}
                          for i, q in enumerate(eval_ids) for j, plane in enumerate(planes)
                          for k, name in enumerate(task.labels)])
    model = torch.nn.ModuleDict({"gate": gate, "experts": torch.nn.ModuleDict({p: e[1] for p, e in experts.items()})})
    return {"probs": study_probs, "history": history, "weights": table, "model": model,
            "expert_probs": {plane: full[:, j] for j, plane in enumerate(planes)}}
