"""Reconstruction meets segmentation (ATOMMIC's multitask idea): a VarNet whose reconstruction feeds a
2D segmentation network, and the segmentation network alone (for the sequential and zero-filled pipelines).

- ``varnet-seg`` (:class:`VarNetSegBackbone`): fastMRI's VarNet (:class:`~pretrain.models.recon.VarNetBackbone`)
  -> MONAI ``BasicUNet`` (2D) on the standardised reconstruction; ``forward(masked_kspace, mask,
  num_low_frequencies) -> (image (B, rows, cols), logits (B, classes, rows, cols))``.
- ``seg2d`` (:class:`SegNet2d`): the same MONAI ``BasicUNet`` on a given image; ``forward(image (B, rows,
  cols)) -> logits``.

``structures`` (the label names, background first) travel in ``config.json`` with the coil/mask settings
(``transform``), like the reconstruction backbones. Plain single-device modules.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from monai.networks.nets import BasicUNet

from .recon import VarNetBackbone

SEG_FEATURES = (32, 32, 64, 128, 256, 32)  # MONAI BasicUNet's default widths


def standardise(image: torch.Tensor) -> torch.Tensor:
    """Per-image zero mean, unit variance: the segmenter sees reconstructions, targets and zero-filled
    images on one scale."""
    mean = image.mean(dim=(-2, -1), keepdim=True)
    std = image.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    return (image - mean) / std


def _segmenter(structures: list[str], seg_features) -> BasicUNet:
    if not structures or len(structures) < 2:
        raise ValueError(f"structures must list background and at least one structure, got {structures}")
    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=len(structures), features=tuple(seg_features))


class SegNet2d(ModelMixin, ConfigMixin):
    """MONAI ``BasicUNet`` (2D) segmenting one magnitude image into ``structures``."""

    @register_to_config
    def __init__(self, structures: list[str] | None = None, seg_features: list[int] = SEG_FEATURES,
                 seg_input: str = "target", task: str = "segmentation", transform: dict | None = None):
        """``seg_input``: the image it was trained on (``target``: fully sampled, ``zero_filled``)."""
        super().__init__()
        self.seg = _segmenter(list(structures or []), seg_features)

    def block_names(self) -> list[str]:
        return []

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim != 3:
            raise ValueError(f"image must be (batch, rows, cols), got {tuple(image.shape)}")
        return self.seg(standardise(image)[:, None])


class VarNetSegBackbone(ModelMixin, ConfigMixin):
    """VarNet reconstruction -> 2D segmentation, trained jointly (``objective: recon_seg``)."""

    @register_to_config
    def __init__(self, num_cascades: int = 12, sens_chans: int = 8, sens_pools: int = 4, chans: int = 18,
                 pools: int = 4, mask_center: bool = True, structures: list[str] | None = None,
                 seg_features: list[int] = SEG_FEATURES, task: str = "reconstruction+segmentation",
                 transform: dict | None = None):
        super().__init__()
        self.recon = VarNetBackbone(num_cascades=num_cascades, sens_chans=sens_chans, sens_pools=sens_pools,
                                    chans=chans, pools=pools, mask_center=mask_center, transform=transform)
        self.seg = _segmenter(list(structures or []), seg_features)

    def block_names(self) -> list[str]:
        return self.recon.block_names()

    def features(self, masked_kspace, mask, num_low_frequencies=None, blocks=None) -> dict[str, torch.Tensor]:
        """The VarNet's refinement-U-Net maps (:meth:`VarNetBackbone.features`)."""
        return self.recon.features(masked_kspace, mask, num_low_frequencies, blocks)

    def reconstruct(self, masked_kspace, mask, num_low_frequencies=None) -> torch.Tensor:
        return self.recon(masked_kspace, mask, num_low_frequencies)

    def segment(self, image: torch.Tensor) -> torch.Tensor:
        return self.seg(standardise(image)[:, None])

    def forward(self, masked_kspace, mask, num_low_frequencies=None) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.reconstruct(masked_kspace, mask, num_low_frequencies)
        return image, self.segment(image)


RECON_SEG_BACKBONES = {"varnet-seg": VarNetSegBackbone, "seg2d": SegNet2d}
