"""The head training loop: plain torch, seeded, full-batch-friendly for small feature sets.

``get_batch(indices) -> (inputs, target)`` hides where rows come from (memory-mapped feature cache,
preprocessed volumes, EHR tables); models take ``inputs`` and return logits.

:func:`fit` first fits the model's feature standardisation on the rows it trains on (the training
rows); :func:`fit_selected` adds model selection on a separate selection split (best epoch, early
stopping, weight decay from a grid), so that no choice ever reads the evaluation split.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from .standardize import Standardize

log = logging.getLogger(__name__)

GetBatch = Callable[[np.ndarray], tuple[dict, torch.Tensor]]
POS_WEIGHT_CAP = 100.0


def masked_bce(logits: torch.Tensor, target: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """BCE over known labels only: NaN targets (unknown) add nothing to the loss or its gradient.
    ``pos_weight`` (labels,) weighs the positive term per label (class imbalance)."""
    known = torch.isfinite(target)
    if not known.any():
        return logits.sum() * 0.0
    pw = None if pos_weight is None else pos_weight.to(logits).expand_as(logits)[known]
    return F.binary_cross_entropy_with_logits(logits[known], target[known], pos_weight=pw)


def pos_weights(y: np.ndarray, cap: float = POS_WEIGHT_CAP) -> torch.Tensor:
    """Per label ``n_negative / n_positive`` over the known labels of ``y`` (the training rows),
    capped at ``cap``; 1 where a class is absent."""
    y = np.asarray(y, dtype=np.float64)
    pos, neg = np.nansum(y == 1, axis=0), np.nansum(y == 0, axis=0)
    w = np.where((pos > 0) & (neg > 0), neg / np.maximum(pos, 1), 1.0)
    return torch.tensor(np.clip(w, 1.0 / cap, cap), dtype=torch.float32)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


@torch.no_grad()
def fit_standardizers(model: torch.nn.Module, get_batch: GetBatch, rows: Sequence[int], batch_size: int = 64,
                      device: str = "cpu") -> int:
    """Fit every unfitted :class:`~downstream.standardize.Standardize` of ``model`` on ``rows``, stage
    by stage (block maps, then pooled vectors); returns how many. Fitted or loaded ones are kept."""
    todo = [m for m in model.modules() if isinstance(m, Standardize) and not bool(m.fitted)]
    if not todo:
        return 0
    model.to(device).eval()
    rows = np.asarray(rows)
    try:
        for stage in sorted({m.stage for m in todo}):
            active = [m for m in todo if m.stage == stage]
            for m in active:
                m.start()
            for s in range(0, len(rows), batch_size):
                model(to_device(get_batch(rows[s:s + batch_size])[0], device))
            for m in active:
                m.finish()
    finally:
        for m in todo:
            m._sums = None
    return len(todo)


def fit(model: torch.nn.Module, get_batch: GetBatch, rows: Sequence[int], loss_fn: Callable, *, epochs: int,
        lr: float, weight_decay: float = 0.0, batch_size: int = 16, seed: int = 0,
        param_groups: list[dict] | None = None, desc: str = "train", device: str = "cpu",
        on_epoch: Callable[[int, float], bool | None] | None = None) -> list[float]:
    """Fit the model's feature standardisation on ``rows``, then train with AdamW for ``epochs`` over
    ``rows``; returns the mean loss per epoch.

    ``on_epoch(epoch, loss)`` runs after each epoch (sweeps report validation metrics from it, model
    selection keeps the best state); returning True stops training early."""
    rows = np.asarray(rows)
    if len(rows) == 0:
        raise ValueError(f"{desc}: no training rows")
    fit_standardizers(model, get_batch, rows, device=device)
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
            stop = on_epoch(len(history), history[-1])
            model.train()
            if stop:
                break
    model.eval()
    return history


@torch.no_grad()
def mean_loss(model: torch.nn.Module, get_batch: GetBatch, rows: Sequence[int], loss_fn: Callable,
              batch_size: int = 64, device: str = "cpu") -> float:
    """``loss_fn`` over ``rows`` in eval mode (batch losses weighted by batch size)."""
    model.eval()
    rows = np.asarray(rows)
    total = 0.0
    for s in range(0, len(rows), batch_size):
        inputs, target = get_batch(rows[s:s + batch_size])
        total += float(loss_fn(model(to_device(inputs, device)), target.to(device))) * len(rows[s:s + batch_size])
    return total / len(rows)


@dataclass
class Selection:
    """What model selection chose, on the selection split only: per weight decay its best epoch and
    selection loss; ``weight_decay``/``epoch``/``loss`` of the chosen candidate; ``per_label`` (in
    label order) the weight decay, epoch and loss each label's own row was taken from, for models whose
    labels train independently (:func:`label_rows`), else None."""

    weight_decay: float
    epoch: int
    loss: float | None
    candidates: list[dict] = field(default_factory=list)
    per_label: list[dict] | None = None


def label_rows(model: torch.nn.Module) -> list[str] | None:
    """Names of the trainable parameters when they are only those of a final linear classifier ``head``
    (one row per label): the labels then train independently, so each can keep the epoch and weight
    decay that suit it, as a per-label regularisation (the reference probe's C per label) does. None
    for any model with shared trainable parts (learned pooling, projections, hidden layers)."""
    head = getattr(model, "head", None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if not isinstance(head, torch.nn.Linear) or trainable != {"head.weight", "head.bias"}:
        return None
    return sorted(trainable)


class LabelTracker:
    """Per label the lowest selection loss over every epoch of every weight decay and the classifier
    rows of that moment; :meth:`apply` writes each label's rows into the returned model."""

    def __init__(self, names: list[str], n_labels: int):
        self.names, self.n = names, n_labels
        self.best: list[dict | None] = [None] * n_labels

    @torch.no_grad()
    def update(self, model: torch.nn.Module, losses: np.ndarray, wd: float, epoch: int) -> bool:
        """Keep the rows of every label whose loss improved; True when any did."""
        params = dict(model.named_parameters())
        improved = False
        for j, loss in enumerate(losses):
            if np.isfinite(loss) and (self.best[j] is None or loss < self.best[j]["loss"]):
                self.best[j] = {"weight_decay": float(wd), "epoch": epoch, "loss": float(loss),
                                "rows": {n: params[n][j].detach().clone() for n in self.names}}
                improved = True
        return improved

    @torch.no_grad()
    def apply(self, model: torch.nn.Module, fallback: dict) -> list[dict]:
        """Copy each label's kept rows into ``model``; a label without selection targets keeps the
        jointly chosen rows (``fallback`` describes them). Returns the per-label choices."""
        params = dict(model.named_parameters())
        chosen = []
        for j, best in enumerate(self.best):
            if best is None:
                chosen.append(dict(fallback))
                continue
            for n in self.names:
                params[n][j] = best["rows"][n]
            chosen.append({k: best[k] for k in ("weight_decay", "epoch", "loss")})
        return chosen


@torch.no_grad()
def label_losses(model: torch.nn.Module, get_batch: GetBatch, rows: np.ndarray, loss_fn: Callable,
                 device: str = "cpu") -> np.ndarray:
    """``loss_fn`` per label on ``rows`` (the other labels' targets masked as unknown); NaN for a label
    with no known target there."""
    logits = predict(model, get_batch, rows, device=device)
    target = torch.cat([get_batch(rows[s:s + 64])[1] for s in range(0, len(rows), 64)])
    out = np.full(target.shape[1], np.nan)
    for j in range(target.shape[1]):
        only = torch.full_like(target, float("nan"))
        only[:, j] = target[:, j]
        if torch.isfinite(only[:, j]).any():
            out[j] = float(loss_fn(logits, only))
    return out


def fit_selected(build: Callable[[], torch.nn.Module], get_batch: GetBatch, train_rows: Sequence[int],
                 select_rows: Sequence[int], loss_fn: Callable, *, epochs: int, lr: float,
                 weight_decays: Sequence[float], patience: int = 0, batch_size: int = 16, seed: int = 0,
                 param_groups: Callable[[torch.nn.Module], list[dict]] | None = None, desc: str = "train",
                 device: str = "cpu") -> tuple[torch.nn.Module, list[float], Selection]:
    """Train one model per weight decay (``build()`` makes it, seeded alike) on ``train_rows``; keep each
    one's state at its lowest ``loss_fn`` on ``select_rows`` (stopping after ``patience`` epochs without
    improvement, 0 = never) and return the candidate with the lowest, its loss history and the
    :class:`Selection`. Without selection rows: the last epoch of the first weight decay.

    For a linear classifier on fixed features (:func:`label_rows`) each label is selected on its own
    loss: its row comes from the weight decay and epoch where that label's selection loss was lowest,
    and training stops when no label has improved for ``patience`` epochs. One shared epoch would stop
    at the noisy labels' minimum (often the first epochs) before a clear finding is learned."""
    select_rows = np.asarray(select_rows)
    best: tuple | None = None
    candidates = []
    tracker: LabelTracker | None = None
    for wd in (weight_decays if len(select_rows) else list(weight_decays)[:1]):
        seed_everything(seed)
        model = build()
        names = label_rows(model) if len(select_rows) else None
        if names and tracker is None:
            tracker = LabelTracker(names, dict(model.named_parameters())[names[0]].shape[0])
        state: dict = {"loss": float("inf"), "epoch": 0, "weights": None, "since": 0}

        def keep_best(epoch: int, _loss: float, model=model, state=state, wd=wd, tracker=tracker) -> bool:
            if not len(select_rows):
                return False
            val = mean_loss(model, get_batch, select_rows, loss_fn, device=device)
            improved = val < state["loss"]
            if improved:
                state.update(loss=val, epoch=epoch, weights=copy.deepcopy(model.state_dict()))
            if tracker is not None:
                improved = tracker.update(model, label_losses(model, get_batch, select_rows, loss_fn, device),
                                          wd, epoch) or improved
            state["since"] = 0 if improved else state["since"] + 1
            return bool(patience) and state["since"] >= patience

        history = fit(model, get_batch, train_rows, loss_fn, epochs=epochs, lr=lr, weight_decay=wd,
                      batch_size=batch_size, seed=seed, param_groups=param_groups(model) if param_groups else None,
                      desc=f"{desc} wd={wd:g}", device=device, on_epoch=keep_best)
        if state["weights"] is not None:
            model.load_state_dict(state["weights"])
        loss = state["loss"] if len(select_rows) else None
        candidates.append({"weight_decay": float(wd), "epoch": state["epoch"] or len(history), "loss": loss,
                           "epochs_run": len(history)})
        if best is None or (loss is not None and loss < best[2].loss):
            best = (model, history, Selection(float(wd), candidates[-1]["epoch"], loss))
    model, history, chosen = best
    chosen.candidates = candidates
    if tracker is not None:
        chosen.per_label = tracker.apply(model, {"weight_decay": chosen.weight_decay, "epoch": chosen.epoch,
                                                 "loss": None})
    model.eval()
    return model, history, chosen


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
