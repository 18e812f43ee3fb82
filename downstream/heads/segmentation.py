"""Segmentation: a lightweight decoder from backbone feature maps back to the plane's grid.

Each block's map is projected by a 1x1x1 convolution, upsampled (trilinear) to the preprocessed grid
and summed; two MONAI convolution blocks and a 1x1x1 classifier follow. Its loss is
:class:`pretrain.seg.loss.SparseDiceCELoss` (shared with the 3D segmentation objective).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn
from torch.nn import functional as F



class SegDecoder(nn.Module):
    def __init__(self, plane: str, channels: Sequence[int], n_classes: int, out_shape: Sequence[int],
                 hidden: int = 32):
        super().__init__()
        self.plane, self.out_shape = plane, tuple(int(s) for s in out_shape)
        self.proj = nn.ModuleList(nn.Conv3d(c, hidden, 1) for c in channels)
        self.refine = nn.Sequential(
            Convolution(3, hidden, hidden, kernel_size=3, norm=("instance", {"affine": True}), act="GELU"),
            Convolution(3, hidden, hidden, kernel_size=3, norm=("instance", {"affine": True}), act="GELU"))
        self.classify = nn.Conv3d(hidden, n_classes, 1)

    def forward(self, inputs: dict) -> torch.Tensor:
        maps = inputs[self.plane]
        x = sum(F.interpolate(p(m), size=self.out_shape, mode="trilinear", align_corners=False)
                for p, m in zip(self.proj, maps))
        return self.classify(self.refine(x))


def structure_values(structures: Mapping[str, int] | Sequence[str]) -> dict[str, int]:
    """Structure name -> label-map value, from a declaration's mapping or a list indexed by value."""
    if isinstance(structures, Mapping):
        return {str(k): int(v) for k, v in structures.items()}
    return {name: i for i, name in enumerate(structures)}


def remap_structures(seg: torch.Tensor, structures: Mapping[str, int] | Sequence[str], wanted: Sequence[str],
                     ignore_index: int) -> torch.Tensor:
    """Label map over the anatomy's structures (name -> value, as declared) -> 0 (background/other),
    1..K (``wanted``), ignore kept."""
    values = structure_values(structures)
    lut = torch.zeros(max(256, ignore_index + 1), dtype=torch.long)
    for k, name in enumerate(wanted, start=1):
        lut[values[name]] = k
    lut[ignore_index] = ignore_index
    return lut[seg.long()]
