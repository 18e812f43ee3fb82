"""Retrospective k-space undersampling masks, seeded per slice.

A mask is a boolean array ``(rows, cols)`` over the k-space grid of one slice (the fastMRI layout:
``cols`` is the phase-encode direction that 1D masks subsample, whole columns at a time). Every kind
takes an ``acceleration`` and a ``center_fraction`` (the fully sampled centre: columns for 1D masks,
a ``center_fraction``-sized rectangle for 2D masks) and optionally ``partial_fourier`` (the fraction of
phase-encode columns kept, in (0.5, 1]; the first columns are dropped).

Reference implementations are reused where they exist: fastMRI's ``EquispacedMaskFractionFunc`` and
``RandomMaskFunc`` for the 1D equispaced/random masks and sigpy's ``poisson`` for Poisson-disc. The
Gaussian 1D/2D and equispaced 2D masks are written here. ``stored`` is the prospective case: the
mask that came with the sample; ``full`` samples every point (1x, the reference of acceleration studies).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
from fastmri.data.subsample import EquispacedMaskFractionFunc, RandomMaskFunc
from sigpy.mri import poisson

MASK_KINDS = ("equispaced1d", "random1d", "gaussian1d", "equispaced2d", "gaussian2d", "poisson2d", "stored", "full")


@dataclass
class MaskSpec:
    """One undersampling pattern: kind, nominal acceleration, fully sampled centre, partial Fourier."""

    kind: str = "equispaced1d"
    acceleration: float = 4.0
    center_fraction: float = 0.08
    partial_fourier: float = 1.0
    gaussian_std: float = 0.3  # std of the Gaussian density, as a fraction of the k-space extent

    def validate(self) -> None:
        if self.kind not in MASK_KINDS:
            raise ValueError(f"unknown mask kind '{self.kind}'; known: {', '.join(MASK_KINDS)}")
        if self.kind in ("stored", "full"):
            return
        if self.acceleration <= 1:
            raise ValueError(f"mask acceleration must be > 1, got {self.acceleration}")
        if not 0 < self.center_fraction < 1 / self.acceleration:
            raise ValueError(f"center_fraction must be in (0, 1/acceleration), got {self.center_fraction} "
                             f"for acceleration {self.acceleration}")
        if not 0.5 < self.partial_fourier <= 1:
            raise ValueError(f"partial_fourier must be in (0.5, 1], got {self.partial_fourier}")


def slice_seed(key: str, base_seed: int = 0) -> int:
    """A stable per-slice seed from the sample key, so validation masks are reproducible."""
    return zlib.crc32(f"{base_seed}:{key}".encode()) & 0x7FFFFFFF


def _center_slice(n: int, fraction: float) -> slice:
    """fastMRI's centre: ``round(n * fraction)`` lines starting at ``(n - count + 1) // 2``."""
    count = max(1, round(n * fraction))
    start = (n - count + 1) // 2
    return slice(start, start + count)


def _fastmri_1d(func_cls, spec: MaskSpec, shape: tuple[int, int], seed: int) -> np.ndarray:
    low = round(shape[1] * spec.center_fraction)
    if func_cls is EquispacedMaskFractionFunc and low * spec.acceleration == shape[1]:
        raise ValueError(f"equispaced1d: {low} centre lines x acceleration {spec.acceleration:g} equals the "
                         f"{shape[1]} columns, where fastMRI's equispaced spacing is undefined; "
                         f"change center_fraction ({spec.center_fraction:g})")
    func = func_cls(center_fractions=[spec.center_fraction], accelerations=[spec.acceleration])
    cols, _ = func((1, shape[0], shape[1], 2), seed=seed)
    return np.broadcast_to(cols.numpy().reshape(1, shape[1]) > 0, shape).copy()


def _gaussian_1d(spec: MaskSpec, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    rows, cols = shape
    line = np.zeros(cols, bool)
    line[_center_slice(cols, spec.center_fraction)] = True
    _sample_by_density(line, _gaussian_density((cols,), spec.gaussian_std), round(cols / spec.acceleration), rng)
    return np.broadcast_to(line[None], shape).copy()


def _gaussian_2d(spec: MaskSpec, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    mask = _center_block(shape, spec.center_fraction)
    target = round(mask.size / spec.acceleration)
    _sample_by_density(mask.reshape(-1), _gaussian_density(shape, spec.gaussian_std).reshape(-1), target, rng)
    return mask


def _gaussian_density(shape: tuple[int, ...], std: float) -> np.ndarray:
    grids = np.meshgrid(*[(np.arange(n) - n / 2) / n for n in shape], indexing="ij")
    return np.exp(-sum(g ** 2 for g in grids) / (2 * std ** 2))


def _sample_by_density(mask: np.ndarray, density: np.ndarray, target: int, rng: np.random.Generator) -> None:
    """Add ``target - mask.sum()`` unsampled points to the flat ``mask`` in place, drawn by density."""
    free = np.flatnonzero(~mask)
    need = min(max(target - int(mask.sum()), 0), free.size)
    if need:
        p = density[free] / density[free].sum()
        mask[rng.choice(free, size=need, replace=False, p=p)] = True


def _center_block(shape: tuple[int, int], fraction: float) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[_center_slice(shape[0], fraction), _center_slice(shape[1], fraction)] = True
    return mask


def _equispaced_2d(spec: MaskSpec, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A regular lattice plus the centre block; the lattice step is set so the total hits the target."""
    mask = _center_block(shape, spec.center_fraction)
    n, centre = mask.size, int(mask.sum())
    adjusted = (n - centre) / max(n / spec.acceleration - centre, 1.0)
    step = math.sqrt(adjusted)
    offset = rng.uniform(0, step, size=2)
    r = np.unique(np.floor(np.arange(offset[0], shape[0], step)).astype(int))
    c = np.unique(np.floor(np.arange(offset[1], shape[1], step)).astype(int))
    mask[np.ix_(r, c)] = True
    return mask


def _poisson_2d(spec: MaskSpec, shape: tuple[int, int], seed: int) -> np.ndarray:
    calib = (max(1, round(shape[0] * spec.center_fraction)), max(1, round(shape[1] * spec.center_fraction)))
    m = poisson(shape, spec.acceleration, calib=calib, dtype=np.float32, crop_corner=False, seed=seed)
    return m > 0


def apply_partial_fourier(mask: np.ndarray, fraction: float) -> np.ndarray:
    """Drop the first ``1 - fraction`` of phase-encode columns (the centre is never dropped)."""
    if fraction >= 1:
        return mask
    out = mask.copy()
    out[:, : int(round((1 - fraction) * mask.shape[1]))] = False
    return out


def make_mask(spec: MaskSpec, shape: tuple[int, int], seed: int, stored: np.ndarray | None = None) -> np.ndarray:
    """The boolean ``(rows, cols)`` mask of ``spec`` for one slice; same seed, same mask."""
    spec.validate()
    shape = (int(shape[0]), int(shape[1]))
    if spec.kind == "stored":
        if stored is None:
            raise ValueError("mask kind 'stored' needs a mask stored with the sample, and there is none")
        check_mask_shape(stored, shape, "stored mask")
        return apply_partial_fourier(np.broadcast_to(np.asarray(stored) > 0, shape).copy(), spec.partial_fourier)
    if spec.kind == "full":
        return np.ones(shape, bool)
    rng = np.random.default_rng(seed)
    if spec.kind == "equispaced1d":
        mask = _fastmri_1d(EquispacedMaskFractionFunc, spec, shape, seed)
    elif spec.kind == "random1d":
        mask = _fastmri_1d(RandomMaskFunc, spec, shape, seed)
    elif spec.kind == "gaussian1d":
        mask = _gaussian_1d(spec, shape, rng)
    elif spec.kind == "equispaced2d":
        mask = _equispaced_2d(spec, shape, rng)
    elif spec.kind == "gaussian2d":
        mask = _gaussian_2d(spec, shape, rng)
    else:
        mask = _poisson_2d(spec, shape, seed)
    return apply_partial_fourier(mask, spec.partial_fourier)


def num_low_frequencies(mask: np.ndarray) -> int:
    """Width in columns of the contiguous sampled run through the k-space centre on the centre row
    (what VarNet's sensitivity net calibrates on); works for 1D, 2D and stored masks alike."""
    row = np.asarray(mask)[mask.shape[0] // 2]
    mid = row.shape[0] // 2
    if not row[mid]:
        return 0
    left = mid - np.flatnonzero(~row[:mid][::-1])[:1].tolist()[0] if (~row[:mid]).any() else 0
    right = mid + (np.flatnonzero(~row[mid:])[:1].tolist() or [row.shape[0] - mid])[0]
    return int(right - left)


def acceleration_of(mask: np.ndarray) -> float:
    """Achieved acceleration: grid points over sampled points."""
    return mask.size / max(int(np.count_nonzero(mask)), 1)


def check_mask_shape(mask: np.ndarray, kspace_shape: tuple[int, ...], where: str) -> None:
    """A mask must cover the slice's (rows, cols) grid (or broadcast to it)."""
    grid = tuple(kspace_shape[-2:])
    if np.ndim(mask) == 0:
        raise ValueError(f"{where}: mask must be an array over the k-space grid {grid}, got a scalar")
    try:
        np.broadcast_shapes(np.shape(mask)[-2:], grid)
    except ValueError:
        raise ValueError(f"{where}: mask shape {np.shape(mask)} does not match k-space grid {grid}") from None
    if np.ndim(mask) > 2 and any(d != 1 for d in np.shape(mask)[:-2]):
        raise ValueError(f"{where}: mask shape {np.shape(mask)} has extra leading dimensions for k-space {kspace_shape}")
