"""Multi-label diagnosis heads on pooled features of one plane: linear probe and MLP."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..pooling import Pooler


def mlp(in_dim: int, out_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, out_dim))


def classifier(kind: str, in_dim: int, out_dim: int, hidden: int = 64, dropout: float = 0.1) -> nn.Module:
    """``linear``: a linear probe; ``mlp``: one hidden layer. Inputs are pooled vectors already
    standardised per feature with training-row statistics (:class:`~downstream.pooling.Pooler`); no
    LayerNorm, which rescales each study by the spread of its own feature vector and so drowns
    small-scale, informative features in large-scale ones."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))
    raise ValueError(f"head kind '{kind}' is unknown; known: linear, mlp")


class PlaneHead(nn.Module):
    """Pooled features of one plane -> per-label logits."""

    def __init__(self, plane: str, channels: Sequence[int], n_labels: int, kind: str = "linear",
                 pooling: str = "avg", hidden: int = 64, dropout: float = 0.1):
        super().__init__()
        self.plane = plane
        self.pool = Pooler(pooling, channels)
        self.head = classifier(kind, self.pool.out_dim, n_labels, hidden, dropout)

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.head(self.pool(inputs[self.plane]))
