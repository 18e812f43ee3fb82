"""Pooling of spatial backbone features (B, C, d, h, w) per block into one standardised vector per study.

- ``avg``: global average per block.
- ``attention``: OrthoDiffusion-style attention pooling over voxels (a learned score per voxel,
  softmax over voxels, weighted sum), concatenated with the global average.
- ``self_attention``: multi-head attention over the voxel tokens with a learned query (one token out),
  concatenated with the global average.
- ``global_local``: global average concatenated with a 2x2x2 grid of local averages.
- ``mean_std``: mean and standard deviation over voxels per channel (the reference probe's pooling).

Each block map is standardised per channel before pooling and the pooled vector per feature after
(:class:`~downstream.standardize.Standardize`, statistics of the training rows), so heads see
unit-scale inputs whatever the scale of a block.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .standardize import Standardize

LOCAL_GRID = (2, 2, 2)
POOLINGS = ("avg", "attention", "self_attention", "global_local", "mean_std")
FACTOR = {"avg": 1, "attention": 2, "self_attention": 2,
          "global_local": 1 + LOCAL_GRID[0] * LOCAL_GRID[1] * LOCAL_GRID[2], "mean_std": 2}


class AttentionPool(nn.Module):
    """Softmax-weighted sum of voxel features; the score comes from a small MLP per voxel."""

    def __init__(self, channels: int, hidden: int = 32):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(channels, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, voxels) softmax weights of the voxels of ``x`` (B, C, d, h, w)."""
        return torch.softmax(self.score(x.flatten(2).transpose(1, 2))[..., 0], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bv,bcv->bc", self.weights(x), x.flatten(2))


class SelfAttentionPool(nn.Module):
    """Multi-head attention of a learned query over the voxel tokens (B, voxels, C) -> (B, C).

    ``heads`` is reduced to the largest count that divides ``channels``."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        heads = max(h for h in range(1, heads + 1) if channels % h == 0)
        self.query = nn.Parameter(torch.randn(1, 1, channels) * channels ** -0.5)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, voxels) attention weights of the query over the voxels of ``x``."""
        tokens = x.flatten(2).transpose(1, 2)
        _, w = self.attn(self.query.expand(len(x), -1, -1), tokens, tokens, average_attn_weights=False)
        return w[:, :, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)
        out, _ = self.attn(self.query.expand(len(x), -1, -1), tokens, tokens, need_weights=False)
        return out[:, 0]


class Pooler(nn.Module):
    """Pools a list of block feature maps and concatenates the vectors; ``out_dim`` tells the size."""

    def __init__(self, kind: str, channels: Sequence[int]):
        super().__init__()
        if kind not in POOLINGS:
            raise ValueError(f"pooling '{kind}' is unknown; known: {', '.join(POOLINGS)}")
        self.kind = kind
        learned = {"attention": AttentionPool, "self_attention": SelfAttentionPool}.get(kind)
        self.attn = nn.ModuleList(learned(c) for c in channels) if learned else None
        self.out_dim = int(sum(channels) * FACTOR[kind])
        self.scale_maps = nn.ModuleList(Standardize(c, stage=0) for c in channels)
        self.scale = Standardize(self.out_dim, stage=1)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        parts = []
        for i, x in enumerate(maps):
            x = self.scale_maps[i](x)
            gap = x.mean(dim=(2, 3, 4))
            if self.kind == "avg":
                parts.append(gap)
            elif self.attn is not None:
                parts += [self.attn[i](x), gap]
            elif self.kind == "mean_std":
                parts += [gap, x.flatten(2).std(dim=2, unbiased=False)]
            else:
                parts += [gap, F.adaptive_avg_pool3d(x, LOCAL_GRID).flatten(1)]
        return self.scale(torch.cat(parts, dim=1))
