"""Backbone registry: a plain dict from config name to model class."""

from .diffusion import DiffusionBackbone

BACKBONES = {"diffusion3d": DiffusionBackbone}

__all__ = ["BACKBONES", "DiffusionBackbone"]
