"""Segmentation: a decoder on frozen-backbone features of one plane, and its baselines.

Targets are the plane's label map resampled (nearest) to the backbone's preprocessed grid and
remapped to the task's structures (others -> background; ``ignore_index`` voxels stay unlabelled).
Scores use that grid's voxel spacing (the study's spacing scaled by the resampling factor).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from pretrain.seg.loss import SparseDiceCELoss
from shards.dataset import dataset_of
from shards.manifest import load_manifest

from .heads.baselines import Scratch3DSegmenter
from .heads.segmentation import SegDecoder, remap_structures
from .inputs import PlaneData
from .metrics import segmentation_scores
from .train import fit, predict, seed_everything


class Argmax(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs):
        return self.model(inputs).argmax(dim=1)


def grid_spacing(spacing, shape, grid) -> list[float]:
    return [float(s) * float(n) / float(g) for s, n, g in zip(spacing, shape, grid)]


def run_segmentation(task, frame: pd.DataFrame, data: PlaneData, train_rows: np.ndarray,
                     eval_rows: np.ndarray) -> dict[str, dict]:
    """``{model: {"pred": (n_eval, S, R, C), "scores": {dice|hd95|iou: (n_eval, K)}, "history", "model"}}``."""
    plane, n_classes = data.plane, len(task.structures) + 1
    structures = dataset_of(load_manifest(task.shards)).structure_values(task.joint)
    target = remap_structures(torch.from_numpy(np.array(data.seg[:, 0])), structures, task.structures,
                              task.ignore_index)
    loss = SparseDiceCELoss(task.ignore_index)
    grid = data.spec["shape"]

    def batcher(source):
        def get(idx):
            if source == "volumes":
                inputs = {plane: torch.from_numpy(np.ascontiguousarray(data.volumes[idx]))}
            else:
                inputs = {plane: [torch.from_numpy(np.ascontiguousarray(a[idx])) for a in source.values()]}
            return inputs, target[idx]
        return get

    candidates = {"diffusion": (lambda: SegDecoder(plane, data.channels(), n_classes, grid, task.head.hidden),
                                batcher(data.features), task.train.epochs, task.train.lr)}
    if "random_backbone" in task.baselines.names:
        candidates["random_backbone"] = (
            lambda: SegDecoder(plane, data.channels(random=True), n_classes, grid, task.head.hidden),
            batcher(data.random_features), task.train.epochs, task.train.lr)
    if "scratch_cnn" in task.baselines.names:
        candidates["scratch_cnn"] = (lambda: Scratch3DSegmenter(plane, n_classes, task.baselines.cnn_channels),
                                     batcher("volumes"),
                                     task.baselines.epochs_for(len(train_rows), task.train.batch_size),
                                     task.baselines.lr)
    truth = target[eval_rows]
    truth = torch.where(truth == task.ignore_index, 0, truth)
    results = {}
    for name, (build, get, epochs, lr) in candidates.items():
        seed_everything(task.train.seed)
        model = build()
        history = fit(model, get, train_rows, loss, epochs=epochs, lr=lr, weight_decay=task.train.weight_decay,
                      batch_size=task.train.batch_size, seed=task.train.seed, desc=name, device=task.device)
        pred = predict(Argmax(model), get, eval_rows, batch_size=4, device=task.device)
        pred = torch.where(target[eval_rows] == task.ignore_index, 0, pred)
        scores = case_scores(pred, truth, n_classes, frame.iloc[eval_rows], grid)
        results[name] = {"pred": pred.numpy(), "scores": scores, "history": history, "model": model}
    return results


def case_scores(pred: torch.Tensor, truth: torch.Tensor, n_classes: int, rows: pd.DataFrame, grid) -> dict:
    per_case = [segmentation_scores(pred[i:i + 1], truth[i:i + 1], n_classes,
                                    grid_spacing(r.spacing, r.shape, grid))
                for i, r in enumerate(rows.itertuples())]
    return {k: np.concatenate([c[k] for c in per_case]) for k in ("dice", "hd95", "iou")}
