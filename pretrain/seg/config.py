"""Typed schema of the ``seg3d`` objective (``model.seg`` of a pretraining run config)."""

from __future__ import annotations

from dataclasses import dataclass, field

ARCHS = ("dynunet", "diffusion_unet")


@dataclass
class SegConfig:
    arch: str = "dynunet"               # dynunet (MONAI, nnU-Net's network) | diffusion_unet (a backbone's U-Net)
    init_from: str = ""                 # diffusion_unet: published backbone whose encoder + bottleneck are loaded
    load_weights: bool = True           # false: the backbone's architecture, random weights (the fair scratch arm)
    filters: list[int] = field(default_factory=lambda: [8, 16, 32])  # per level (diffusion_unet from scratch too)
    patch: list[int] = field(default_factory=lambda: [8, 32, 32])    # (slices, rows, cols) training/inference patch
    pos_fraction: float = 0.33          # patches centred on foreground (nnU-Net: oversample_foreground_percent)
    patches_per_volume: int = 2
    deep_supervision: int = 1           # auxiliary outputs at 1/2, 1/4, ... resolution (0: off)
    mirror_axes: list[int] = field(default_factory=list)  # test-time mirroring; off by default (laterality)
    overlap: float = 0.5                # sliding-window overlap
    structures: list[str] = field(default_factory=list)   # classes 1..K; empty: union of the joints' structures
    ignore_index: int = 255

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"model.seg.arch '{self.arch}' is unknown; known: {', '.join(ARCHS)}")
        if self.init_from and self.arch != "diffusion_unet":
            raise ValueError("model.seg.init_from needs arch 'diffusion_unet' (a DynUNet has no diffusion encoder)")
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise ValueError(f"model.seg.patch must be three positive sizes, got {self.patch}")
        if not 0.0 <= self.pos_fraction <= 1.0:
            raise ValueError(f"model.seg.pos_fraction must be in [0, 1], got {self.pos_fraction}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"model.seg.overlap must be in [0, 1), got {self.overlap}")
        if any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise ValueError(f"model.seg.mirror_axes must be spatial axes 0, 1, 2, got {self.mirror_axes}")
        if self.patches_per_volume < 1 or len(self.filters) < 2:
            raise ValueError("model.seg.patches_per_volume must be >= 1 and filters list >= 2 levels")
