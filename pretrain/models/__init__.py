"""Backbone registry: a plain dict from config name to model class."""

from .diffusion import DiffusionBackbone
from .orthodiffusion import OrthoDiffusionBackbone
from .recon import RECON_BACKBONES, UNetReconBackbone, VarNetBackbone

BACKBONES = {"diffusion3d": DiffusionBackbone, "orthodiffusion": OrthoDiffusionBackbone, **RECON_BACKBONES}

__all__ = ["BACKBONES", "DiffusionBackbone", "OrthoDiffusionBackbone", "UNetReconBackbone", "VarNetBackbone"]
