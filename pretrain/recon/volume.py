"""A published reconstruction backbone (VarNet, U-Net) as an image-volume feature extractor, so the
downstream heads use it like a diffusion backbone (``pretrain.publish.load_backbone`` returns this).

Each slice of a preprocessed volume ``(B, 1, slices, rows, cols)`` is shifted to be non-negative and
scaled to a maximum of 1 per volume (the backbones' ``max`` normalisation), turned into fully sampled
single-coil k-space (fastMRI's centred orthonormal FFT, a mask of ones), and passed through the
backbone; the maps of ``blocks`` (:meth:`block_names`, e.g. ``cascade1/mid``) are stacked along the slice
axis: ``{block: (B, channels, slices, r, c)}`` (VarNet maps on its padded grid, multiples of 16). Reconstruction backbones have no noise schedule:
``timesteps``, ``noise_draws`` and ``seed`` of the downstream feature spec do not apply and are ignored.
Slices pass through the network the backbone was trained for (multi-coil, undersampled): the features are
those of a fully sampled single-coil input, out of its training distribution, stated in the model card.
"""

from __future__ import annotations

from typing import Iterable

import fastmri
import torch


class ReconVolumeFeatures(torch.nn.Module):
    """``features(volume, timesteps, blocks, noise_draws, seed)`` over a reconstruction backbone."""

    def __init__(self, recon: torch.nn.Module):
        super().__init__()
        self.recon = recon

    @property
    def config(self):
        return self.recon.config

    @classmethod
    def from_config(cls, config) -> "ReconVolumeFeatures":
        """A fresh (randomly initialised) one of the same architecture (the random-backbone baseline)."""
        from ..models.recon import RECON_BACKBONES

        classes = {c.__name__: c for c in RECON_BACKBONES.values()}
        return cls(classes[config["_class_name"]].from_config(config))

    def block_names(self) -> list[str]:
        return self.recon.block_names()

    def block_prefix(self, block: str) -> str:
        """Parameter-name prefix of the module a block belongs to (its cascade, or the whole U-Net)."""
        if block.startswith("cascade"):
            return f"recon.net.cascades.{int(block.split('/')[0][len('cascade'):])}."
        return "recon.unet."

    def features(self, volume: torch.Tensor, timesteps=None, blocks: str | Iterable[str] | None = None,
                 noise_draws: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
        if volume.ndim == 4:
            volume = volume[None]
        if volume.ndim != 5 or volume.shape[1] != 1:
            raise ValueError(f"volume must be (batch, 1, slices, rows, cols), got {tuple(volume.shape)}")
        b, _, s, r, c = volume.shape
        low = volume.flatten(1).amin(dim=1).view(b, 1, 1, 1, 1)
        x = volume - low
        x = x / x.flatten(1).amax(dim=1).clamp_min(1e-6).view(b, 1, 1, 1, 1)
        image = torch.stack([x.reshape(b * s, 1, r, c), torch.zeros_like(x.reshape(b * s, 1, r, c))], dim=-1)
        kspace = fastmri.fft2c(image.float())
        mask = torch.ones(b * s, 1, r, c, 1, dtype=torch.bool, device=volume.device)
        maps = self.recon.features(kspace, mask, c, blocks)
        return {name: m.reshape(b, s, *m.shape[1:]).transpose(1, 2) for name, m in maps.items()}
