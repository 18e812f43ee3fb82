"""Per-plane preprocessing of a volume before it reaches a backbone.

A :class:`PlanePreprocessing` spec fixes the grid (slices, rows, cols) and the intensity normalisation:
a dataset-wide window from the shard manifest's data fingerprint (:func:`spec_from_manifest`), a fixed
window, or a per-volume percentile clip and z-score. The spec is
stored in the backbone's ``config.json``, and downstream code reads it back from there — so training
and feature extraction apply exactly the same transform.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from monai.transforms import (ClipIntensityPercentiles, Compose, NormalizeIntensity, Resize, ResizeWithPadOrCrop,
                              ScaleIntensity, ScaleIntensityRange)
from monai.utils import convert_to_tensor

from shards.schema import PLANES

INTENSITY_MODES = ("percentile", "fixed", "volume", "minmax")
SPATIAL_MODES = ("resize", "pad_crop", "crop_resize")


@dataclass
class PlanePreprocessing:
    """How one plane's stack becomes a network input of shape (1, *shape).

    intensity: ``percentile`` (window = dataset percentiles ``p_low``/``p_high`` from the manifest,
    resolved into ``low``/``high`` by :func:`spec_from_manifest`), ``fixed`` (``low``/``high`` given),
    both scaled to [``out_min``, ``out_max``]; ``volume``: each volume clipped at its own
    ``p_low``/``p_high`` percentiles, then z-scored with its own mean and standard deviation (before the
    spatial step, so padding is 0 = the volume's mean; ``low``/``high``/``out_*``/``clip`` unused); or
    ``minmax``: each volume's own min/max to [``out_min``, ``out_max``] (OrthoDiffusion's; no window).
    spatial: ``resize`` (trilinear to ``shape``), ``pad_crop`` (centred pad/crop, no resampling) or
    ``crop_resize`` (centred crop/pad of the slices, bilinear in-plane resize; OrthoDiffusion's).
    """

    plane: str = "sag"
    shape: list[int] = field(default_factory=lambda: [8, 32, 32])
    spatial: str = "resize"
    intensity: str = "percentile"
    p_low: float = 0.5
    p_high: float = 99.5
    low: float | None = None
    high: float | None = None
    out_min: float = -1.0
    out_max: float = 1.0
    clip: bool = True

    def validate(self) -> None:
        if self.plane not in PLANES:
            raise ValueError(f"preprocessing.plane '{self.plane}' is unknown; known: {', '.join(PLANES)}")
        if len(self.shape) != 3 or any(int(s) < 1 for s in self.shape):
            raise ValueError(f"preprocessing.shape must be 3 positive ints (slices, rows, cols), got {self.shape}")
        if self.spatial not in SPATIAL_MODES:
            raise ValueError(f"preprocessing.spatial '{self.spatial}' is unknown; known: {', '.join(SPATIAL_MODES)}")
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"preprocessing.intensity '{self.intensity}' is unknown; "
                             f"known: {', '.join(INTENSITY_MODES)}")
        if not 0 <= self.p_low < self.p_high <= 100:
            raise ValueError(f"preprocessing.p_low/p_high must satisfy 0 <= p_low < p_high <= 100, "
                             f"got {self.p_low}, {self.p_high}")
        if self.intensity in ("volume", "minmax"):
            return
        if self.low is None or self.high is None:
            raise ValueError("preprocessing.low/high are unset: build the spec with spec_from_manifest() "
                             "or give intensity=fixed with low and high")
        if not self.high > self.low:
            raise ValueError(f"preprocessing.high ({self.high}) must be greater than low ({self.low})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = [int(s) for s in self.shape]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PlanePreprocessing":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"preprocessing has unknown keys {unknown}; known: {sorted(known)}")
        spec = cls(**{k: (list(v) if k == "shape" else v) for k, v in d.items()})
        spec.validate()
        return spec


def spec_from_manifest(manifest: dict, plane: str, shape=None, **overrides) -> PlanePreprocessing:
    """A resolved spec whose intensity window is the dataset percentiles recorded in the manifest.

    ``shape`` defaults to the plane's most common shape in the shards (``common_shape``).
    """
    planes = manifest.get("stats", {}).get("planes", {})
    if plane not in planes:
        raise ValueError(f"shard manifest has no statistics for plane '{plane}' "
                         f"(planes with data: {', '.join(sorted(planes)) or 'none'})")
    stats = planes[plane]
    spec = PlanePreprocessing(plane=plane, shape=list(shape or stats["common_shape"]), **overrides)
    if spec.intensity == "percentile":
        intensity = stats["intensity"]
        lo_key, hi_key = f"p{spec.p_low:g}", f"p{spec.p_high:g}"
        missing = [k for k in (lo_key, hi_key) if k not in intensity]
        if missing:
            raise ValueError(f"manifest stats for plane '{plane}' lack intensity percentiles {missing}; "
                             f"recorded: {', '.join(sorted(intensity))}")
        spec.low, spec.high = float(intensity[lo_key]), float(intensity[hi_key])
    spec.validate()
    return spec


def _as_spec(spec: PlanePreprocessing | dict) -> PlanePreprocessing:
    if isinstance(spec, dict):
        return PlanePreprocessing.from_dict(spec)
    spec.validate()
    return spec


def build_transform(spec: PlanePreprocessing | dict) -> Compose:
    """The MONAI transform for ``spec``; input and output are channel-first (1, S, R, C)."""
    spec = _as_spec(spec)
    size = [int(s) for s in spec.shape]
    if spec.spatial == "resize":
        spatial = [Resize(size, mode="trilinear", anti_aliasing=False)]
    elif spec.spatial == "pad_crop":
        spatial = [ResizeWithPadOrCrop(size, mode="constant")]
    else:  # slices cropped/padded, never resampled; trilinear with the slice count kept is per-slice bilinear
        spatial = [ResizeWithPadOrCrop([size[0], -1, -1], mode="constant"),
                   Resize([-1, *size[1:]], mode="trilinear", anti_aliasing=False)]
    if spec.intensity == "volume":
        return Compose([ClipIntensityPercentiles(spec.p_low, spec.p_high), NormalizeIntensity(), *spatial])
    scale = (ScaleIntensity(minv=spec.out_min, maxv=spec.out_max) if spec.intensity == "minmax"
             else ScaleIntensityRange(a_min=spec.low, a_max=spec.high, b_min=spec.out_min, b_max=spec.out_max,
                                      clip=spec.clip))
    return Compose([*spatial, scale])  # pad with raw zeros, then window / min-max


def preprocess_volume(vol: np.ndarray | torch.Tensor, spec: PlanePreprocessing | dict) -> torch.Tensor:
    """A plane stack (S, R, C) -> float32 tensor (1, *spec.shape), windowed to [out_min, out_max] or
    (``intensity: volume``) z-scored per volume."""
    if vol.ndim != 3:
        raise ValueError(f"expected a (slices, rows, cols) volume for plane '{_as_spec(spec).plane}', "
                         f"got shape {tuple(vol.shape)}")
    x = torch.as_tensor(np.asarray(vol, dtype=np.float32) if isinstance(vol, np.ndarray) else vol.float())
    if not torch.isfinite(x).all():
        raise ValueError("volume contains NaN or infinite values")
    out = build_transform(spec)(x[None])
    return convert_to_tensor(out, dtype=torch.float32, track_meta=False)
