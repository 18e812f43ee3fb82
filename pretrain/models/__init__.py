"""Backbone registry: a plain dict from config name to model class."""

from .diffusion import DiffusionBackbone
from .recon import RECON_BACKBONES, UNetReconBackbone, VarNetBackbone

BACKBONES = {"diffusion3d": DiffusionBackbone, **RECON_BACKBONES}

__all__ = ["BACKBONES", "DiffusionBackbone", "UNetReconBackbone", "VarNetBackbone"]
