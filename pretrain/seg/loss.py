"""Dice + cross-entropy with unlabelled voxels left out, the loss of every segmentation model."""

from __future__ import annotations

import torch
from monai.losses import MaskedDiceLoss
from torch import nn
from torch.nn import functional as F


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
