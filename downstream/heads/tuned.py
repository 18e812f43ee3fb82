"""Fine-tuning selected backbone blocks under a head, at a reduced learning rate.

Blocks are named as in the backbone's ``features`` (``down.i``, ``mid_0``..``mid_2``, ``mid``, ``up.i``;
OrthoDiffusion's ``in_i``, ``mid_i``, ``out_i``); only their parameters (``model.block_prefix(name)``)
are unfrozen. The features are recomputed on every step (no cache), with the task's timesteps, noise
draws and seed.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from shards.config import ConfigError


class TunedBackbone(nn.Module):
    """Backbones (one per plane, deep-copied) + a head on their live features."""

    def __init__(self, backbones: dict[str, nn.Module], head: nn.Module, feat, blocks: list[str]):
        super().__init__()
        self.backbones = nn.ModuleDict({p: copy.deepcopy(m) for p, m in backbones.items()})
        self.head, self.feat = head, feat
        for plane, model in self.backbones.items():
            valid = model.block_names()
            unknown = [b for b in blocks if b not in valid]
            if unknown:
                raise ConfigError(f"head.finetune_blocks {unknown} unknown for the {plane} backbone; valid: {', '.join(valid)}")
            prefixes = tuple(model.block_prefix(b) for b in blocks)
            for name, param in model.named_parameters():
                param.requires_grad_(name.startswith(prefixes))

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbones.parameters() if p.requires_grad]

    def forward(self, inputs: dict) -> torch.Tensor:
        maps = {}
        for plane, model in self.backbones.items():
            feat = self.feat.for_plane(plane)
            named = model.features(inputs[plane], list(feat.timesteps), list(feat.blocks), feat.noise_draws, feat.seed)
            maps[plane] = [t for _, t in sorted(named.items())]
        return self.head(maps)

    def param_groups(self, lr: float, scale: float) -> list[dict]:
        return [{"params": list(self.head.parameters()), "lr": lr},
                {"params": self.backbone_parameters(), "lr": lr * scale}]
