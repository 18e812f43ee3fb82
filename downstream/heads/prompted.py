"""A promptable decoder (the SAM idea on mskfm's own backbone): frozen backbone feature maps plus a
box prompt (a binary box volume) in, one structure's mask logits out, on the backbone's grid.

Each feature map is projected by a 1x1x1 convolution and upsampled to the grid; the box is embedded
by a small convolution and added (a dense prompt embedding, as SAM embeds its mask prompts); two
MONAI convolution blocks and a 1x1x1 classifier follow.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn
from torch.nn import functional as F


class BoxPromptDecoder(nn.Module):
    def __init__(self, channels: Sequence[int], out_shape: Sequence[int], hidden: int = 16):
        super().__init__()
        self.out_shape = tuple(int(s) for s in out_shape)
        self.proj = nn.ModuleList(nn.Conv3d(c, hidden, 1) for c in channels)
        self.prompt = nn.Conv3d(1, hidden, 3, padding=1)
        norm = ("instance", {"affine": True})
        self.refine = nn.Sequential(Convolution(3, hidden, hidden, kernel_size=3, norm=norm, act="GELU"),
                                    Convolution(3, hidden, hidden, kernel_size=3, norm=norm, act="GELU"))
        self.classify = nn.Conv3d(hidden, 1, 1)

    def forward(self, inputs: dict) -> torch.Tensor:
        """``inputs["maps"]``: feature maps (B, C_i, ...); ``inputs["box"]``: (B, 1, *out_shape) in {0, 1}.
        Logits (B, 1, *out_shape)."""
        maps, box = inputs["maps"], inputs["box"]
        x = sum(F.interpolate(p(m), size=self.out_shape, mode="trilinear", align_corners=False)
                for p, m in zip(self.proj, maps))
        return self.classify(self.refine(x + self.prompt(box)))
