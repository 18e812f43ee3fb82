"""Backbone registry: a plain dict from config name to model class."""

from .diffusion import DiffusionBackbone
from .orthodiffusion import OrthoDiffusionBackbone
from .recon import RECON_BACKBONES, UNetReconBackbone, VarNetBackbone
from .recon_seg import RECON_SEG_BACKBONES, SegNet2d, VarNetSegBackbone

BACKBONES = {"diffusion3d": DiffusionBackbone, "orthodiffusion": OrthoDiffusionBackbone, **RECON_BACKBONES,
             **RECON_SEG_BACKBONES}

__all__ = ["BACKBONES", "DiffusionBackbone", "OrthoDiffusionBackbone", "SegNet2d", "UNetReconBackbone",
           "VarNetBackbone", "VarNetSegBackbone"]
