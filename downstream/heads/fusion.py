"""Multi-plane fusion.

Feature level: per-plane pooled vectors combined by concatenation, a projected sum, or cross-attention
between plane tokens, then one classifier. Label level: one head per plane, logits mixed per label
with softmax weights (they sum to one per label). Plane experts: per-plane heads whose out-of-fold,
patient-level probabilities train a gating network that outputs per-patient, per-label plane weights.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..pooling import Pooler
from .linear import PlaneHead, classifier


class FeatureFusion(nn.Module):
    """``concat`` | ``projected_sum`` | ``cross_attention`` of per-plane pooled features."""

    def __init__(self, kind: str, channels: dict[str, Sequence[int]], n_labels: int, head: str = "linear",
                 pooling: str = "avg", hidden: int = 32, heads: int = 2, dropout: float = 0.1):
        super().__init__()
        if kind not in ("concat", "projected_sum", "cross_attention"):
            raise ValueError(f"feature fusion '{kind}' is unknown; known: concat, projected_sum, cross_attention")
        self.kind, self.planes = kind, list(channels)
        self.pools = nn.ModuleDict({p: Pooler(pooling, c) for p, c in channels.items()})
        dims = {p: pool.out_dim for p, pool in self.pools.items()}
        if kind == "concat":
            self.head = classifier(head, sum(dims.values()), n_labels, hidden, dropout)
            return
        self.proj = nn.ModuleDict({p: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden)) for p, d in dims.items()})
        if kind == "cross_attention":
            self.plane_embed = nn.Parameter(torch.zeros(len(self.planes), hidden))
            self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True, dropout=dropout)
            self.norm = nn.LayerNorm(hidden)
        self.head = classifier(head, hidden, n_labels, hidden, dropout)

    def forward(self, inputs: dict) -> torch.Tensor:
        pooled = [self.pools[p](inputs[p]) for p in self.planes]
        if self.kind == "concat":
            return self.head(torch.cat(pooled, dim=1))
        tokens = torch.stack([self.proj[p](v) for p, v in zip(self.planes, pooled)], dim=1)  # (B, P, H)
        if self.kind == "projected_sum":
            return self.head(torch.relu(tokens.sum(dim=1)))
        tokens = tokens + self.plane_embed
        attended, _ = self.attn(tokens, tokens, tokens)
        return self.head(self.norm(tokens + attended).mean(dim=1))


class LabelLevelFusion(nn.Module):
    """One head per plane; fused logit per label = sum over planes of softmax(weights)[plane, label] * logit."""

    def __init__(self, channels: dict[str, Sequence[int]], n_labels: int, head: str = "linear",
                 pooling: str = "avg", hidden: int = 64, dropout: float = 0.1):
        super().__init__()
        self.planes = list(channels)
        self.experts = nn.ModuleDict({p: PlaneHead(p, c, n_labels, head, pooling, hidden, dropout)
                                      for p, c in channels.items()})
        self.mix = nn.Parameter(torch.zeros(len(self.planes), n_labels))

    def fusion_weights(self) -> torch.Tensor:
        """(planes, labels); each column sums to one."""
        return torch.softmax(self.mix, dim=0)

    def forward(self, inputs: dict) -> torch.Tensor:
        logits = torch.stack([self.experts[p](inputs) for p in self.planes], dim=1)  # (B, P, L)
        return (logits * self.fusion_weights()[None]).sum(dim=1)


class GatingNetwork(nn.Module):
    """Per-patient plane weights per label from the plane experts' probabilities (B, P, L)."""

    def __init__(self, n_planes: int, n_labels: int, hidden: int = 32):
        super().__init__()
        self.n_planes, self.n_labels = n_planes, n_labels
        self.net = nn.Sequential(nn.Linear(n_planes * n_labels, hidden), nn.GELU(),
                                 nn.Linear(hidden, n_planes * n_labels))

    def weights(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, P, L) softmax over planes: sums to one per patient and label."""
        logits = self.net(probs.flatten(1)).view(-1, self.n_planes, self.n_labels)
        return torch.softmax(logits, dim=1)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        """Fused probability (B, L) as a logit, so the same masked BCE-with-logits loss applies."""
        fused = (self.weights(probs) * probs).sum(dim=1).clamp(1e-6, 1 - 1e-6)
        return torch.logit(fused)


def build_feature_model(kind: str, channels: dict[str, Sequence[int]], n_labels: int, head_cfg, pooling: str,
                        fusion_cfg) -> nn.Module:
    """The image model for a task: a single plane head, or a feature/label-level fusion of planes."""
    if len(channels) == 1:
        (plane, ch), = channels.items()
        return PlaneHead(plane, ch, n_labels, head_cfg.kind, pooling, head_cfg.hidden, head_cfg.dropout)
    if kind == "label_level":
        return LabelLevelFusion(channels, n_labels, head_cfg.kind, pooling, head_cfg.hidden, head_cfg.dropout)
    return FeatureFusion(kind, channels, n_labels, head_cfg.kind, pooling, fusion_cfg.hidden, fusion_cfg.heads,
                         head_cfg.dropout)
