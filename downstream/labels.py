"""Label types downstream: binary labels are one output each (sigmoid); a multiclass or ordinal label
of K classes (declared in the shard set's dataset declaration) is K outputs ``<label>=<class>`` taken
together by a softmax.

Everything that scores outputs one at a time (thresholds, per-output AUROC with intervals, ROC plots)
sees a class output as a one-vs-rest binary column: 1 for that class, 0 for another, NaN when the label
is unknown (masked). :func:`class_groups` finds the groups back from the output names, so the loss
(:func:`label_loss`: masked BCE on binary outputs, masked cross-entropy per group) and the probabilities
(:func:`to_probs`) need nothing else; :func:`multiclass_metrics` adds per label the macro one-vs-rest
AUROC and the confusion matrix.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from shards.dataset import LabelSpec, dataset_of

from .train import masked_bce

SEP = "="


def output_columns(labels: list[str], specs: dict[str, LabelSpec]) -> list[str]:
    """The task's outputs: a binary label as is, a K-class label as ``<label>=<class>`` x K."""
    out = []
    for name in labels:
        spec = specs.get(name, LabelSpec())
        out += [name] if spec.type == "binary" else [f"{name}{SEP}{c}" for c in spec.classes]
    return out


def output_task(task, manifest: dict):
    """A diagnosis task with its labels replaced by its outputs (what heads train and metrics score)."""
    if task.kind != "diagnosis":
        return task
    return replace(task, labels=output_columns(task.labels, dataset_of(manifest).anatomy(task.joint).labels))


def class_groups(columns: list[str]) -> dict[str, list[int]]:
    """Label -> indices of its class outputs, for the multiclass/ordinal labels among ``columns``."""
    groups: dict[str, list[int]] = {}
    for i, col in enumerate(columns):
        if SEP in col:
            groups.setdefault(col.split(SEP, 1)[0], []).append(i)
    return groups


def expand_values(name: str, spec: LabelSpec, values: list) -> dict[str, list[float]]:
    """One study-table column per output: a class index becomes one-hot floats, unknown all NaN."""
    if spec.type == "binary":
        return {name: [np.nan if v is None else float(v) for v in values]}
    return {f"{name}{SEP}{c}": [np.nan if v is None else float(int(v) == k) for v in values]
            for k, c in enumerate(spec.classes)}


def to_probs(logits: torch.Tensor, columns: list[str]) -> torch.Tensor:
    """Sigmoid per binary output, softmax over each label's class outputs."""
    probs = torch.sigmoid(logits)
    for idx in class_groups(columns).values():
        probs[:, idx] = torch.softmax(logits[:, idx], dim=1)
    return probs


def label_loss(columns: list[str], pos_weight: torch.Tensor | None = None):
    """Loss over known labels only. Binary outputs alone: :func:`downstream.train.masked_bce`. With class
    groups: the mean over labels known in the batch of the masked BCE of each binary output
    (``pos_weight`` per output) and the masked cross-entropy of each class group."""
    groups = class_groups(columns)
    if not groups:
        return partial(masked_bce, pos_weight=pos_weight)
    in_group = {i for idx in groups.values() for i in idx}
    binary = [i for i in range(len(columns)) if i not in in_group]

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        for idx in groups.values():  # a class group is scored whole: one class alone (per-output selection,
            known = torch.isfinite(target[:, idx])  # downstream.train.label_losses) has no loss of its own
            if (known.any(1) & ~known.all(1)).any():
                return logits.sum() * float("nan")
        terms = []
        for i in binary:
            known = torch.isfinite(target[:, i])
            if known.any():
                pw = None if pos_weight is None else pos_weight[i].to(logits)
                terms.append(F.binary_cross_entropy_with_logits(logits[known, i], target[known, i], pos_weight=pw))
        for idx in groups.values():
            known = torch.isfinite(target[:, idx]).all(1)
            if known.any():
                terms.append(F.cross_entropy(logits[known][:, idx], target[known][:, idx].argmax(1)))
        return torch.stack(terms).mean() if terms else logits.sum() * 0.0

    return loss


def confusion(y: np.ndarray, p: np.ndarray, n_classes: int) -> list[list[int]]:
    """Rows: true class, columns: predicted class (argmax)."""
    matrix = np.zeros((n_classes, n_classes), dtype=int)
    for t, q in zip(y, p.argmax(1)):
        matrix[int(t), int(q)] += 1
    return matrix.tolist()


def multiclass_metrics(frame: pd.DataFrame, columns: list[str], per_output: dict, score_prefix: str = "p_") -> dict:
    """Per multiclass/ordinal label: its classes, the per-class one-vs-rest AUROC (from ``per_output``,
    the per-output metrics), their macro mean and the study-level confusion matrix of argmax predictions
    on the studies where the label is known."""
    out = {}
    for label, idx in class_groups(columns).items():
        cols = [columns[i] for i in idx]
        truth = frame[cols].to_numpy(np.float64)
        known = np.isfinite(truth).all(1)
        aurocs = {c.split(SEP, 1)[1]: per_output[c]["auroc"] for c in cols}
        finite = [v for v in aurocs.values() if np.isfinite(v)]
        out[label] = {"classes": [c.split(SEP, 1)[1] for c in cols], "auroc_per_class": aurocs,
                      "macro_auroc": float(np.mean(finite)) if finite else float("nan"),
                      "n": int(known.sum()),
                      "confusion": confusion(truth[known].argmax(1), frame.loc[known, [score_prefix + c for c in cols]]
                                             .to_numpy(), len(cols))}
    return out
