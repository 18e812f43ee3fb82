"""The head training loop: plain torch, seeded, full-batch-friendly for small feature sets.

``get_batch(indices) -> (inputs, target)`` hides where rows come from (memory-mapped feature cache,
preprocessed volumes, EHR tables); models take ``inputs`` and return logits.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

GetBatch = Callable[[np.ndarray], tuple[dict, torch.Tensor]]


def masked_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE over known labels only: NaN targets (unknown) add nothing to the loss or its gradient."""
    known = torch.isfinite(target)
    if not known.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[known], target[known])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def fit(model: torch.nn.Module, get_batch: GetBatch, rows: Sequence[int], loss_fn: Callable, *, epochs: int,
        lr: float, weight_decay: float = 0.0, batch_size: int = 16, seed: int = 0,
        param_groups: list[dict] | None = None, desc: str = "train", device: str = "cpu",
        on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Train with AdamW for ``epochs`` over ``rows``; returns the mean loss per epoch.

    ``on_epoch(epoch, loss)`` runs after each epoch (sweeps report validation metrics from it)."""
    rows = np.asarray(rows)
    if len(rows) == 0:
        raise ValueError(f"{desc}: no training rows")
    model.to(device).train()
    groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    history = []
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        order = rng.permutation(rows)
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            inputs, target = get_batch(idx)
            loss = loss_fn(model(to_device(inputs, device)), target.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + float(loss.detach()) * len(idx), count + len(idx)
        history.append(total / count)
        if on_epoch is not None:
            on_epoch(len(history), history[-1])
            model.train()
    model.eval()
    return history


@torch.no_grad()
def predict(model: torch.nn.Module, get_batch: GetBatch, rows: Sequence[int], batch_size: int = 32,
            device: str = "cpu") -> torch.Tensor:
    """Model outputs for ``rows`` in order, concatenated on the batch axis (on CPU)."""
    model.to(device).eval()
    rows = np.asarray(rows)
    outs = [model(to_device(get_batch(rows[s:s + batch_size])[0], device)).cpu()
            for s in range(0, len(rows), batch_size)]
    return torch.cat(outs)


def to_device(x, device: str):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x
