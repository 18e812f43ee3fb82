"""EHR fusion: a tabular encoder of the record, mixed per label with the image prediction.

The encoder standardises numbers (train-set mean/std, missing -> mean), one-hot encodes categories
(train-set vocabulary; unseen -> all zeros) and embeds the injury event (index 0 = unseen). The fused
logit per label is ``w * image + (1 - w) * ehr`` with ``w = sigmoid(a_label)`` learned.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from .linear import mlp

UNSEEN = "<unseen>"


def fit_tabular(frame: pd.DataFrame, cfg) -> dict:
    """Train-set statistics and vocabularies (JSON-serialisable, stored with the head)."""
    stats = {}
    for name in cfg.numeric:
        col = pd.to_numeric(frame[f"ehr.{name}"], errors="coerce")
        mean, std = float(col.mean()), float(col.std(ddof=0))
        stats[name] = [0.0 if math.isnan(mean) else mean, std if std > 0 else 1.0]
    vocab = {name: sorted(frame[f"ehr.{name}"].dropna().astype(str).unique()) for name in cfg.categorical}
    events = [UNSEEN] + sorted(frame[f"ehr.{cfg.event}"].dropna().astype(str).unique())
    return {"numeric": stats, "categorical": vocab, "event": cfg.event, "events": events}


def encode_tabular(frame: pd.DataFrame, tab: dict) -> dict[str, torch.Tensor]:
    n = len(frame)
    num = np.zeros((n, len(tab["numeric"])), dtype=np.float32)
    for j, (name, (mean, std)) in enumerate(tab["numeric"].items()):
        col = pd.to_numeric(frame[f"ehr.{name}"], errors="coerce").to_numpy(dtype=np.float64)
        num[:, j] = np.nan_to_num((col - mean) / std, nan=0.0)
    blocks = []
    for name, values in tab["categorical"].items():
        col = frame[f"ehr.{name}"].astype(str).to_numpy()
        blocks.append(np.stack([col == v for v in values], axis=1).astype(np.float32)
                      if values else np.zeros((n, 0), np.float32))
    cat = np.concatenate(blocks, axis=1) if blocks else np.zeros((n, 0), np.float32)
    index = {v: i for i, v in enumerate(tab["events"])}
    event = np.array([index.get(str(v), 0) for v in frame[f"ehr.{tab['event']}"]], dtype=np.int64)
    return {"num": torch.from_numpy(num), "cat": torch.from_numpy(cat), "event": torch.from_numpy(event)}


class EHRHead(nn.Module):
    """EHR-only model: tabular encoder -> per-label logits."""

    def __init__(self, tab: dict, n_labels: int, embed_dim: int = 8, hidden: int = 32, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(len(tab["events"]), embed_dim)
        n_in = len(tab["numeric"]) + sum(len(v) for v in tab["categorical"].values()) + embed_dim
        self.net = mlp(n_in, n_labels, hidden, dropout)

    def forward(self, inputs: dict) -> torch.Tensor:
        ehr = inputs["ehr"]
        return self.net(torch.cat([ehr["num"], ehr["cat"], self.embed(ehr["event"])], dim=1))


class EHRFusion(nn.Module):
    """Image model + EHR head, mixed per label with a learned weight (image, ehr sum to one)."""

    def __init__(self, image: nn.Module, ehr: EHRHead, n_labels: int):
        super().__init__()
        self.image, self.ehr = image, ehr
        self.mix = nn.Parameter(torch.zeros(n_labels))

    def fusion_weights(self) -> torch.Tensor:
        """(2, labels): row 0 image weight, row 1 EHR weight."""
        w = torch.sigmoid(self.mix)
        return torch.stack([w, 1 - w])

    def forward(self, inputs: dict) -> torch.Tensor:
        w = self.fusion_weights()
        return w[0] * self.image(inputs) + w[1] * self.ehr(inputs)
