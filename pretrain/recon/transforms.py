"""Per-slice reconstruction transforms: check, bring to a grid, compress, undersample, normalise, batch.

Batching rule (varying coil counts and matrix sizes across anatomies): a batch holds one shape.
For training with retrospective masks, :class:`ReconTransform` brings every slice to the configured
``grid`` (rows, cols) by centre-cropping or zero-padding its *fully sampled* coil images, and to
``virtual_coils`` coils by SVD or geometric (GCC) coil compression, before the mask is drawn; so any mix of anatomies batches.
Slices with fewer coils than ``virtual_coils`` are an error naming the slice (zero coils would break
the sensitivity network's normalisation). Evaluation keeps every slice at its native shape with
batch size 1. :func:`collate_recon` refuses a batch of mixed shapes with a message that says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .coils import (COIL_COMBINATIONS, COIL_COMPRESSIONS, ESPIRIT_KEYS, coil_maps, combine_coils, compress_coils,
                    normalise, prewhiten, to_image, to_kspace)
from .masks import MaskSpec, check_mask_shape, make_mask, num_low_frequencies, slice_seed


class ReconInputError(ValueError):
    """A reconstruction sample that cannot be used; the message names the slice and its source."""


def describe(sample: dict) -> str:
    meta = sample.get("meta", {}) or {}
    where = f"sample '{sample.get('__key__', '?')}'"
    if meta.get("file"):  # shards written before ingests stopped recording file names
        where += f" (file {meta['file']}"
        where += f", slice {meta['slice']})" if "slice" in meta else ")"
    elif "slice" in meta:
        where += f" (study {meta.get('study', '?')}, slice {meta['slice']})"
    return where


def check_recon_sample(sample: dict) -> None:
    """Finite k-space and target, consistent shapes and metadata; else :class:`ReconInputError`."""
    where = describe(sample)
    k = sample.get("kspace")
    if k is None or np.ndim(k) != 3:
        raise ReconInputError(f"{where}: kspace must be (coils, rows, cols), got "
                              f"{None if k is None else np.shape(k)}")
    if not np.isfinite(k).all():
        raise ReconInputError(f"{where}: kspace contains NaN or infinite values")
    target = sample.get("target")
    if target is not None:
        if np.ndim(target) != 2 or any(t > s for t, s in zip(np.shape(target), k.shape[-2:])):
            raise ReconInputError(f"{where}: target shape {np.shape(target)} does not fit the k-space grid "
                                  f"{k.shape[-2:]}")
        if not np.isfinite(target).all():
            raise ReconInputError(f"{where}: target contains NaN or infinite values")
    meta = sample.get("meta") or {}
    if "coils" in meta and int(meta["coils"]) != k.shape[0]:
        raise ReconInputError(f"{where}: meta says {meta['coils']} coils, k-space has {k.shape[0]}")
    if sample.get("mask") is not None:
        try:
            check_mask_shape(sample["mask"], k.shape, where)
        except ValueError as exc:
            raise ReconInputError(str(exc)) from None


def resize_grid(coil_images: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Centre-crop or zero-pad the last two axes to ``grid``."""
    out = np.zeros(coil_images.shape[:-2] + tuple(grid), coil_images.dtype)
    src, dst = [], []
    for n, m in zip(coil_images.shape[-2:], grid):
        k = min(n, m)
        src.append(slice((n - k) // 2, (n - k) // 2 + k))
        dst.append(slice((m - k) // 2, (m - k) // 2 + k))
    out[(..., *dst)] = coil_images[(..., *src)]
    return out


@dataclass
class ReconTransformConfig:
    """How a slice becomes a training/evaluation example."""

    masks: list[dict] = field(default_factory=lambda: [{"kind": "equispaced1d", "acceleration": 4.0,
                                                         "center_fraction": 0.08}])
    grid: list[int] | None = None          # [rows, cols]; None keeps the native grid
    virtual_coils: int | None = None       # coil compression target; None keeps all coils
    coil_compression: str = "svd"          # svd (one matrix per slice) | gcc (per readout position)
    prewhiten: bool = False                # noise pre-whitening from the outer k-space
    normalisation: str = "max"             # none | max | mean of the zero-filled RSS image
    # how target and zero-filled images are formed: rss | sense (|SENSE| with sigpy ESPIRiT maps from the
    # fully sampled centre, i.e. the calibration lines of a prospective scan)
    combine: str = "rss"
    espirit: dict = field(default_factory=dict)   # espirit_maps keyword arguments: calib_width, thresh, crop, max_iter
    seed: int = 0


class ReconTransform:
    """Decoded recon sample -> model inputs. Pure: the mask seed is ``(seed, epoch, key)``."""

    def __init__(self, cfg: ReconTransformConfig, epoch: int | None = None):
        if cfg.coil_compression not in COIL_COMPRESSIONS:
            raise ValueError(f"unknown coil_compression '{cfg.coil_compression}'; known: {', '.join(COIL_COMPRESSIONS)}")
        if cfg.combine not in COIL_COMBINATIONS:
            raise ValueError(f"unknown combine '{cfg.combine}'; known: {', '.join(COIL_COMBINATIONS)}")
        unknown = set(cfg.espirit) - ESPIRIT_KEYS
        if unknown:
            raise ValueError(f"unknown espirit key(s) {sorted(unknown)}; known: {', '.join(sorted(ESPIRIT_KEYS))}")
        self.cfg = cfg
        self.specs = [MaskSpec(**m) for m in cfg.masks]
        for spec in self.specs:
            spec.validate()
        self.epoch = epoch

    def _fully_sampled(self, sample: dict):
        """(k-space, target, label map or None, sensitivity maps or None) at the configured grid/coils."""
        k = np.asarray(sample["kspace"], np.complex64)
        target, seg = sample.get("target"), sample.get("seg")
        if self.cfg.prewhiten:
            k = prewhiten(k)
        if self.cfg.virtual_coils:
            if k.shape[0] < self.cfg.virtual_coils:
                raise ReconInputError(f"{describe(sample)}: {k.shape[0]} coils, fewer than "
                                      f"virtual_coils={self.cfg.virtual_coils}")
            k = compress_coils(k, self.cfg.virtual_coils, self.cfg.coil_compression)
        if self.cfg.grid is not None:
            k = to_kspace(resize_grid(to_image(k), tuple(self.cfg.grid)))
            target = None
            seg = None if seg is None else resize_grid(np.asarray(seg), tuple(self.cfg.grid))
        maps = coil_maps(k, self.cfg.combine, self.cfg.espirit)
        if target is None or self.cfg.prewhiten or maps is not None:
            target = combine_coils(k, maps)
        return k, np.asarray(target, np.float32), seg, maps

    def __call__(self, sample: dict) -> dict:
        check_recon_sample(sample)
        key = sample["__key__"]
        k, target, seg, maps = self._fully_sampled(sample)
        seed = slice_seed(key if self.epoch is None else f"{key}:{self.epoch}", self.cfg.seed)
        spec = self.specs[seed % len(self.specs)]
        if spec.kind == "stored" and self.cfg.grid is not None:
            raise ReconInputError(f"{describe(sample)}: a stored (prospective) mask cannot be resized to a grid")
        mask = make_mask(spec, k.shape[-2:], seed, stored=sample.get("mask"))
        masked = np.where(mask[None], k, 0).astype(np.complex64)
        zero_filled = combine_coils(masked, maps)
        masked, scale = normalise(masked, self.cfg.normalisation, zero_filled)
        extra = {} if seg is None else {"seg": torch.from_numpy(np.asarray(seg, np.int64))}
        return extra | {"masked_kspace": torch.view_as_real(torch.from_numpy(masked)),
                "mask": torch.from_numpy(mask)[None],
                "num_low_frequencies": num_low_frequencies(mask),
                "target": torch.from_numpy(target / scale),
                "zero_filled": torch.from_numpy(zero_filled / scale),
                "scale": scale, "key": key, "meta": sample.get("meta", {}),
                "acceleration": spec.acceleration if spec.kind not in ("stored", "full") else float(mask.size / mask.sum())}


def collate_recon(items: list[dict]) -> dict:
    """Stack same-shape examples; mixed shapes are an error (set ``grid``/``virtual_coils`` or batch 1)."""
    shapes = {tuple(it["masked_kspace"].shape) for it in items}
    tshapes = {tuple(it["target"].shape) for it in items}
    if len(shapes) > 1 or len(tshapes) > 1:
        raise ReconInputError(f"batch mixes k-space shapes {sorted(shapes)} / targets {sorted(tshapes)} "
                              f"(samples {[it['key'] for it in items]}): set grid and virtual_coils, "
                              f"or use batch size 1")
    return {"masked_kspace": torch.stack([it["masked_kspace"] for it in items]),
            "mask": torch.stack([it["mask"] for it in items])[..., None],
            "num_low_frequencies": torch.tensor([it["num_low_frequencies"] for it in items]),
            "target": torch.stack([it["target"] for it in items]),
            "zero_filled": torch.stack([it["zero_filled"] for it in items]),
            "scale": torch.tensor([it["scale"] for it in items], dtype=torch.float32),
            **({"seg": torch.stack([it["seg"] for it in items])} if all("seg" in it for it in items) else {}),
            "keys": [it["key"] for it in items], "meta": [it["meta"] for it in items]}
