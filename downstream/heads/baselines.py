"""Baselines trained in the same interface as the heads, on the same preprocessed volumes.

- ``scratch_cnn``: a MONAI 3D ResNet per plane (diagnosis) or a MONAI 3D UNet (segmentation),
  trained end to end from random weights.
- ``mrnet_2d``: the MRNet recipe — a 2D encoder applied to every slice, max-pooled over slices, one
  per plane, concatenated, then a linear classifier. The encoder comes from ``timm`` where it can be
  imported (the optional ``timm`` extra; it needs torchvision, absent from CPU builds) and otherwise
  from a MONAI 2D ResNet.
- ``random_backbone`` is not a module here: it is the task's own head on features of a randomly
  initialised copy of the backbone (see :mod:`downstream.finetune`).
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

import torch
from monai.networks.nets import ResNet, UNet
from torch import nn


def monai_resnet(spatial_dims: int, widths: Sequence[int]) -> nn.Module:
    """A small MONAI ResNet (one basic block per stage) returning pooled features (B, widths[-1])."""
    return ResNet("basic", [1] * len(widths), list(widths), spatial_dims=spatial_dims, n_input_channels=1,
                  conv1_t_size=3, conv1_t_stride=1, no_max_pool=True, feed_forward=False)


def encoder_2d(name: str, widths: Sequence[int]) -> tuple[nn.Module, int, str]:
    """(encoder, feature size, source): timm's ``name`` when timm imports, else a MONAI 2D ResNet."""
    if importlib.util.find_spec("timm") is not None:
        try:
            import timm

            enc = timm.create_model(name, pretrained=False, in_chans=1, num_classes=0)
            return enc, int(enc.num_features), f"timm:{name}"
        except (ImportError, RuntimeError):
            pass
    return monai_resnet(2, widths), int(widths[-1]), "monai:ResNet2d"


class Scratch3DClassifier(nn.Module):
    """One 3D ResNet per plane, features concatenated, one linear layer."""

    def __init__(self, planes: Sequence[str], n_labels: int, widths: Sequence[int]):
        super().__init__()
        self.planes = list(planes)
        self.encoders = nn.ModuleDict({p: monai_resnet(3, widths) for p in planes})
        self.head = nn.Linear(widths[-1] * len(planes), n_labels)

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.head(torch.cat([self.encoders[p](inputs[p]) for p in self.planes], dim=1))


class MRNet2D(nn.Module):
    """MRNet-style slice model: per plane a 2D encoder over slices, max over slices, then linear."""

    def __init__(self, planes: Sequence[str], n_labels: int, encoder: str, widths: Sequence[int]):
        super().__init__()
        self.planes = list(planes)
        built = {p: encoder_2d(encoder, widths) for p in planes}
        self.encoders = nn.ModuleDict({p: b[0] for p, b in built.items()})
        self.source = next(iter(built.values()))[2]
        self.head = nn.Linear(sum(b[1] for b in built.values()), n_labels)

    def encode(self, plane: str, volume: torch.Tensor) -> torch.Tensor:
        b, c, s, h, w = volume.shape
        slices = volume.permute(0, 2, 1, 3, 4).reshape(b * s, c, h, w)
        return self.encoders[plane](slices).view(b, s, -1).amax(dim=1)

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.head(torch.cat([self.encode(p, inputs[p]) for p in self.planes], dim=1))


class Scratch3DSegmenter(nn.Module):
    """A MONAI 3D UNet trained from scratch on one plane's volumes."""

    def __init__(self, plane: str, n_classes: int, widths: Sequence[int]):
        super().__init__()
        self.plane = plane
        chans = list(widths[:3])
        self.net = UNet(3, 1, n_classes, channels=chans, strides=[2] * (len(chans) - 1), num_res_units=1)

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.net(inputs[self.plane])
