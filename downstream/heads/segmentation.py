"""Segmentation: a lightweight decoder from backbone feature maps back to the plane's grid.

Each block's map is projected by a 1x1x1 convolution, upsampled (trilinear) to the preprocessed grid
and summed; two MONAI convolution blocks and a 1x1x1 classifier follow. The loss is MONAI's masked
Dice plus cross-entropy with unlabelled voxels (``ignore_index``) left out of both terms.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from monai.losses import MaskedDiceLoss
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


class SparseDiceCELoss(nn.Module):
    """Dice (MONAI ``MaskedDiceLoss``, softmax, one-hot target) + cross-entropy, ignoring ``ignore_index``."""

    def __init__(self, ignore_index: int = 255, lambda_dice: float = 1.0, lambda_ce: float = 1.0):
        super().__init__()
        self.ignore_index = ignore_index
        self.dice = MaskedDiceLoss(include_background=False, to_onehot_y=True, softmax=True)
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, K, D, H, W); ``target`` (B, D, H, W) class indices or ``ignore_index``."""
        target = target.long()
        labelled = target != self.ignore_index
        ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index) if labelled.any() else logits.sum() * 0
        dice = self.dice(logits, torch.where(labelled, target, 0)[:, None], mask=labelled[:, None].float())
        return self.lambda_dice * dice + self.lambda_ce * ce


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
