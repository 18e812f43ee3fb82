"""The 3D segmentation network: a ``diffusers`` model class around MONAI's ``DynUNet`` (the
network nnU-Net plans) or a diffusion backbone's ``DiffusionModelUNet`` (run at timestep 0); its
``config.json`` records everything inference needs (classes, patch, overlap, mirroring). DynUNet
registers its blocks twice (its skip layers), so weights go through safetensors' ``save_model`` /
``load_model``, which handle shared tensors (:func:`save_seg`, :func:`load_seg`).

In training mode with deep supervision ``forward`` returns ``[full, 1/2, 1/4, ...]`` logits, all
upsampled to the input size (as DynUNet does); in eval mode the full-resolution logits only.
:func:`load_encoder` copies a published backbone's encoder and bottleneck (``conv_in``,
``time_embed``, ``down_blocks``, ``middle_block``) into a ``diffusion_unet``; the decoder stays new
(OrthoDiffusion's segmentation fine-tuning).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from monai.networks.nets import DiffusionModelUNet, DynUNet
from torch import nn
from torch.nn import functional as F

ENCODER_PREFIXES = ("conv_in.", "time_embed.", "down_blocks.", "middle_block.")
UNET_KEYS = ("channels", "attention_levels", "num_res_blocks", "num_head_channels", "norm_num_groups",
             "resblock_updown", "use_flash_attention")


def plan_strides(patch: Sequence[int], levels: int) -> list[list[int]]:
    """nnU-Net-style strides: halve an axis at a level while it stays >= 4 voxels there."""
    size, strides = [int(p) for p in patch], [[1, 1, 1]]
    for _ in range(levels - 1):
        s = [2 if n >= 8 else 1 for n in size]
        size = [n // k for n, k in zip(size, s)]
        strides.append(s)
    return strides


def scratch_unet(filters: Sequence[int]) -> dict:
    """DiffusionModelUNet arguments for a from-scratch ``diffusion_unet`` of the given widths."""
    groups = min(8, *filters)
    return {"channels": list(filters), "attention_levels": [False] * len(filters), "num_res_blocks": 1,
            "num_head_channels": int(filters[-1]), "norm_num_groups": groups}


class SegNetwork(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, arch: str = "dynunet", n_classes: int = 2, in_channels: int = 1,
                 filters: Sequence[int] = (8, 16, 32), patch: Sequence[int] = (8, 32, 32),
                 deep_supervision: int = 1, unet: dict | None = None, structures: Sequence[str] = (),
                 overlap: float = 0.5, mirror_axes: Sequence[int] = (), init_from: str = "",
                 pretrained: bool = False, plane: str = "sag"):
        super().__init__()
        self.arch = arch
        if arch == "dynunet":
            strides = plan_strides(patch, len(filters))
            self.n_aux = min(int(deep_supervision), len(filters) - 2)
            self.net = DynUNet(3, in_channels, n_classes, [[3, 3, 3]] * len(filters), strides, strides[1:],
                               filters=list(filters), norm_name=("instance", {"affine": True}),
                               deep_supervision=self.n_aux > 0, deep_supr_num=max(1, self.n_aux))
        elif arch == "diffusion_unet":
            kw = dict(unet or scratch_unet(filters))
            self.net = DiffusionModelUNet(spatial_dims=3, in_channels=in_channels, out_channels=n_classes,
                                          **{k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items()})
            ch, n = list(kw["channels"]), len(kw["channels"])
            self.n_aux = min(int(deep_supervision), n - 2)
            # up_blocks[i] outputs channels[n-1-i] at 1/2**(n-2-i): aux heads on i = n-3, n-4, ...
            self.aux_blocks = [n - 3 - k for k in range(self.n_aux)]
            self.aux = nn.ModuleList(nn.Conv3d(ch[n - 1 - i], n_classes, 1) for i in self.aux_blocks)
        else:
            raise ValueError(f"unknown segmentation arch '{arch}'; known: dynunet, diffusion_unet")

    def forward(self, x: torch.Tensor):
        if self.arch == "dynunet":
            out = self.net(x)
            return list(torch.unbind(out, dim=1)) if out.ndim == 6 else out
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        if not (self.training and self.n_aux):
            return self.net(x, t)
        store: dict[int, torch.Tensor] = {}
        handles = [self.net.up_blocks[i].register_forward_hook(lambda m, a, o, i=i: store.__setitem__(i, o))
                   for i in self.aux_blocks]
        try:
            main = self.net(x, t)
        finally:
            for h in handles:
                h.remove()
        aux = [F.interpolate(head(store[i]), size=x.shape[2:], mode="trilinear", align_corners=False)
               for head, i in zip(self.aux, self.aux_blocks)]
        return [main, *aux]


WEIGHTS = "model.safetensors"


def save_seg(model: SegNetwork, folder) -> None:
    from safetensors.torch import save_model

    Path(folder).mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    save_model(model, str(Path(folder) / WEIGHTS))


def load_seg(folder) -> SegNetwork:
    from safetensors.torch import load_model

    model = SegNetwork.from_config(SegNetwork.load_config(str(folder)))
    load_model(model, str(Path(folder) / WEIGHTS))
    return model


def backbone_unet_kwargs(url: str) -> dict:
    """The U-Net arguments of a published diffusion backbone (its ``config.json`` only)."""
    from ..hub import fetch_folder, is_local
    from ..models.diffusion import DiffusionBackbone

    folder = url if is_local(url) else str(fetch_folder(url))
    config = DiffusionBackbone.load_config(folder)
    return {k: config[k] for k in UNET_KEYS if k in config}


def load_encoder(model: SegNetwork, url: str) -> list[str]:
    """Copy the encoder and bottleneck of the published backbone at ``url`` into ``model``;
    returns the names of the loaded tensors. Shapes must match (build ``model`` with
    :func:`backbone_unet_kwargs`)."""
    from ..models.diffusion import DiffusionBackbone

    if model.arch != "diffusion_unet":
        raise ValueError("only a diffusion_unet segmentation network has a diffusion encoder to load")
    backbone = DiffusionBackbone.from_pretrained(url)
    source = {k[len("unet."):]: v for k, v in backbone.state_dict().items()
              if k.startswith("unet.") and k[len("unet."):].startswith(ENCODER_PREFIXES)}
    target = model.net.state_dict()
    bad = [k for k, v in source.items() if k not in target or target[k].shape != v.shape]
    if bad or not source:
        raise ValueError(f"backbone at {url} does not fit the segmentation encoder: {bad[:5] or 'no encoder tensors'}")
    model.net.load_state_dict(source, strict=False)
    return sorted(source)
