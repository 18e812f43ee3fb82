"""Feature standardisation with statistics of the training rows, stored in the head as buffers.

A :class:`Standardize` module z-scores its input per channel (axis 1) with a mean and standard deviation
measured once on the training rows (:func:`downstream.train.fit_standardizers`, called by ``fit``),
then frozen. The statistics are buffers (``<module path>.mean``, ``.std``, ``.fitted``), so they are
written to the head's safetensors with its weights and applied by the same ``forward`` at prediction.

Stage 0 modules see backbone maps (B, C, d, h, w): statistics over training rows and voxels. Stage 1
modules see pooled vectors (B, D): statistics over training rows, one per pooled feature. Stages are
fitted in order, so a stage-1 module sees the output of the already fitted stage-0 modules.
"""

from __future__ import annotations

import torch
from torch import nn


class Standardize(nn.Module):
    """``(x - mean) / std`` per channel of axis 1; the identity until fitted (or loaded)."""

    def __init__(self, dim: int, stage: int = 1):
        super().__init__()
        self.stage = stage
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("fitted", torch.tensor(False))
        self._sums: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._sums is not None:
            flat = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
            self._sums[0] += flat.shape[1]
            self._sums[1] += flat.sum(dim=1)
            self._sums[2] += (flat ** 2).sum(dim=1)
            return x
        if bool(self.fitted):
            shape = (1, -1) + (1,) * (x.ndim - 2)
            return (x - self.mean.view(shape)) / self.std.view(shape)
        return x

    def start(self) -> None:
        self._sums = [torch.zeros((), dtype=torch.float64), torch.zeros(len(self.mean), dtype=torch.float64),
                      torch.zeros(len(self.mean), dtype=torch.float64)]

    def finish(self) -> None:
        n, s, ss = self._sums
        self._sums = None
        if n == 0:
            raise RuntimeError("feature standardisation saw no training rows")
        mean = s / n
        std = (ss / n - mean ** 2).clamp_min(0).sqrt()
        std = torch.where(std > 1e-8, std, torch.ones_like(std))      # a constant feature stays centred
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.copy_(std.to(self.std.dtype))
        self.fitted.fill_(True)
