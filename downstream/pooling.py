"""Pooling of spatial backbone features (B, C, d, h, w) per block into one vector per study.

- ``avg``: global average per block.
- ``attention``: OrthoDiffusion-style self-attention pooling over voxels (a learned score per voxel,
  softmax over voxels, weighted sum), concatenated with the global average.
- ``global_local``: global average concatenated with a 2x2x2 grid of local averages.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

LOCAL_GRID = (2, 2, 2)


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


class Pooler(nn.Module):
    """Pools a list of block feature maps and concatenates the vectors; ``out_dim`` tells the size."""

    def __init__(self, kind: str, channels: Sequence[int]):
        super().__init__()
        if kind not in ("avg", "attention", "global_local"):
            raise ValueError(f"pooling '{kind}' is unknown; known: avg, attention, global_local")
        self.kind = kind
        self.attn = nn.ModuleList(AttentionPool(c) for c in channels) if kind == "attention" else None
        factor = {"avg": 1, "attention": 2, "global_local": 1 + LOCAL_GRID[0] * LOCAL_GRID[1] * LOCAL_GRID[2]}
        self.out_dim = int(sum(channels) * factor[kind])

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        parts = []
        for i, x in enumerate(maps):
            gap = x.mean(dim=(2, 3, 4))
            if self.kind == "avg":
                parts.append(gap)
            elif self.kind == "attention":
                parts += [self.attn[i](x), gap]
            else:
                parts += [gap, F.adaptive_avg_pool3d(x, LOCAL_GRID).flatten(1)]
        return torch.cat(parts, dim=1)
