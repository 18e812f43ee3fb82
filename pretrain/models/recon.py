"""Reconstruction backbones: fastMRI's end-to-end VarNet and a plain image-domain U-Net baseline.

Both are ``diffusers`` ``ModelMixin`` + ``ConfigMixin`` wrappers around the fastMRI reference modules
(``fastmri.models.VarNet``, ``fastmri.models.Unet``), so ``save_pretrained``/``from_pretrained`` and
safetensors come from the library, exactly like :class:`pretrain.models.diffusion.DiffusionBackbone`.

Common interface (fastMRI layout, complex as a trailing dimension of 2):
``forward(masked_kspace (B, coils, rows, cols, 2), mask (B, 1, rows, cols, 1) bool,
num_low_frequencies: int | None) -> image (B, rows, cols)`` (magnitude, on the k-space grid).

``features(masked_kspace, mask, num_low_frequencies, blocks)`` returns the refinement U-Nets'
intermediate maps ``{name: (B, ch, r, c)}``. Names, for ``P = pools`` levels:
VarNet ``cascade{i}/down.{j}`` (j < P, encoder level j before pooling), ``cascade{i}/mid`` (the
bottleneck), ``cascade{i}/up.{j}`` (decoder, deepest first; ``up.{P-1}`` is full resolution);
the U-Net baseline the same names without the ``cascade{i}/`` prefix. VarNet maps live on the
NormUnet's grid (the slice padded to a multiple of 16).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import fastmri
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from fastmri.models import Unet, VarNet
from fastmri.models.varnet import SensitivityModel


def _check_inputs(masked_kspace: torch.Tensor, mask: torch.Tensor) -> None:
    if masked_kspace.ndim != 5 or masked_kspace.shape[-1] != 2:
        raise ValueError(f"masked_kspace must be (batch, coils, rows, cols, 2), got {tuple(masked_kspace.shape)}")
    if mask.ndim != 5 or mask.shape[-3:-1] != masked_kspace.shape[-3:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} must be (batch, 1, rows, cols, 1) on the k-space grid "
                         f"{tuple(masked_kspace.shape[-3:-1])}")


class _PerSampleCentreSensitivity(SensitivityModel):
    """fastMRI's sensitivity net, taking the fully sampled centre width per sample.

    fastMRI trains VarNet at batch size 1 and takes one ``num_low_frequencies`` per batch; a batch that
    mixes 4x and 8x masks would otherwise estimate every sample's sensitivities from the narrowest
    centre in the batch. Same parameters (and parameter names) as fastMRI's module.
    """

    def get_pad_and_num_low_freqs(self, mask, num_low_frequencies=None):
        if torch.is_tensor(num_low_frequencies) and num_low_frequencies.ndim == 1:
            n = num_low_frequencies.to(device=mask.device, dtype=torch.long)
            if len(n) != mask.shape[0]:
                raise ValueError(f"num_low_frequencies has {len(n)} entries for a batch of {mask.shape[0]}")
            return (mask.shape[-2] - n + 1) // 2, n
        return super().get_pad_and_num_low_freqs(mask, num_low_frequencies)


def _low_freqs(num_low_frequencies) -> int | torch.Tensor | None:
    """An int, ``None`` (detect from the mask) or one width per sample as a 1D tensor."""
    if num_low_frequencies is None:
        return None
    if torch.is_tensor(num_low_frequencies):
        return num_low_frequencies.reshape(-1) if num_low_frequencies.numel() > 1 else int(num_low_frequencies)
    return int(num_low_frequencies)


def _unet_block_names(pools: int, prefix: str = "") -> list[str]:
    return ([f"{prefix}down.{j}" for j in range(pools)] + [f"{prefix}mid"]
            + [f"{prefix}up.{j}" for j in range(pools)])


def _hook_unet(unet: Unet, prefix: str, wanted: set[str], store: dict) -> list:
    """Forward hooks storing the named outputs of one fastMRI ``Unet`` into ``store``."""
    def keep(name):
        def hook(_m, _a, out):
            store[name] = out
        return hook

    modules = {f"{prefix}down.{j}": m for j, m in enumerate(unet.down_sample_layers)}
    modules[f"{prefix}mid"] = unet.conv
    for j, m in enumerate(unet.up_conv):
        modules[f"{prefix}up.{j}"] = m[0] if isinstance(m, torch.nn.Sequential) else m
    return [modules[n].register_forward_hook(keep(n)) for n in modules if n in wanted]


class _FeatureMixin:
    """``features()`` over the fastMRI U-Nets that a subclass lists in ``_unets()``."""

    def _resolve(self, blocks: str | Iterable[str] | None) -> list[str]:
        valid = self.block_names()
        names = valid if blocks is None else ([blocks] if isinstance(blocks, str) else list(blocks))
        unknown = [b for b in names if b not in valid]
        if unknown or not names:
            raise ValueError(f"unknown feature block(s) {unknown or names}; valid: {', '.join(valid)}")
        return names

    @contextmanager
    def _capture(self, names: list[str]):
        store: dict[str, torch.Tensor] = {}
        handles = [h for prefix, unet in self._unets() for h in _hook_unet(unet, prefix, set(names), store)]
        try:
            yield store
        finally:
            for h in handles:
                h.remove()

    def features(self, masked_kspace: torch.Tensor, mask: torch.Tensor, num_low_frequencies=None,
                 blocks: str | Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Named intermediate maps of the refinement U-Net(s) for one forward pass."""
        names = self._resolve(blocks)
        with self._capture(names) as store:
            self(masked_kspace, mask, num_low_frequencies)
        return {n: store[n] for n in names}


class VarNetBackbone(_FeatureMixin, ModelMixin, ConfigMixin):
    """End-to-end VarNet (Sriram et al. 2020): learned sensitivities + unrolled cascades."""

    @register_to_config
    def __init__(self, num_cascades: int = 12, sens_chans: int = 8, sens_pools: int = 4, chans: int = 18,
                 pools: int = 4, mask_center: bool = True, task: str = "reconstruction",
                 transform: dict | None = None):
        """``transform``: the ``ReconTransformConfig`` fields the backbone was trained with (coil
        handling, normalisation, masks), carried in ``config.json`` so evaluation applies the same."""
        super().__init__()
        self.net = VarNet(num_cascades=num_cascades, sens_chans=sens_chans, sens_pools=sens_pools,
                          chans=chans, pools=pools, mask_center=mask_center)
        self.net.sens_net = _PerSampleCentreSensitivity(chans=sens_chans, num_pools=sens_pools,
                                                        mask_center=mask_center)

    def block_names(self) -> list[str]:
        return [n for i in range(self.config.num_cascades)
                for n in _unet_block_names(self.config.pools, f"cascade{i}/")]

    def _unets(self):
        return [(f"cascade{i}/", c.model.unet) for i, c in enumerate(self.net.cascades)]

    def forward(self, masked_kspace: torch.Tensor, mask: torch.Tensor, num_low_frequencies=None) -> torch.Tensor:
        _check_inputs(masked_kspace, mask)
        return self.net(masked_kspace, mask.bool(), _low_freqs(num_low_frequencies))


class UNetReconBackbone(_FeatureMixin, ModelMixin, ConfigMixin):
    """Image-domain baseline: fastMRI's U-Net on the normalised zero-filled RSS image."""

    @register_to_config
    def __init__(self, chans: int = 32, pools: int = 4, drop_prob: float = 0.0, task: str = "reconstruction",
                 transform: dict | None = None):
        super().__init__()
        self.unet = Unet(in_chans=1, out_chans=1, chans=chans, num_pool_layers=pools, drop_prob=drop_prob)

    def block_names(self) -> list[str]:
        return _unet_block_names(self.config.pools)

    def _unets(self):
        return [("", self.unet)]

    def forward(self, masked_kspace: torch.Tensor, mask: torch.Tensor, num_low_frequencies=None) -> torch.Tensor:
        _check_inputs(masked_kspace, mask)
        zf = fastmri.rss(fastmri.complex_abs(fastmri.ifft2c(masked_kspace)), dim=1)[:, None]
        mean = zf.mean(dim=(-2, -1), keepdim=True)
        std = zf.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
        return (self.unet((zf - mean) / std) * std + mean)[:, 0]


RECON_BACKBONES = {"varnet": VarNetBackbone, "unet-recon": UNetReconBackbone}
