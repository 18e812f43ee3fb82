"""Multi-coil k-space from a synthetic slice, for reconstruction pretraining.

Convention (fastMRI): centred, orthonormal 2D FFT over the last two axes; ``target`` is the
root-sum-of-squares of the fully sampled (noisy) coil images, like fastMRI's
``reconstruction_rss``. Coil sensitivities are sigpy's smooth birdcage maps.
"""

from __future__ import annotations

import numpy as np


def fft2c(x: np.ndarray) -> np.ndarray:
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=axes), norm="ortho"), axes=axes)


def ifft2c(k: np.ndarray) -> np.ndarray:
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=axes), norm="ortho"), axes=axes)


def rss(coil_images: np.ndarray, axis: int = 0) -> np.ndarray:
    return np.sqrt((np.abs(coil_images) ** 2).sum(axis=axis))


def coil_maps(n_coils: int, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Smooth complex coil sensitivities (coils, rows, cols), slightly varied per study."""
    import sigpy.mri  # slow to import (numba); only needed when k-space is simulated

    maps = sigpy.mri.birdcage_maps((n_coils, *shape), r=float(rng.uniform(1.3, 1.7)))
    return maps.astype(np.complex64)


def smooth_phase(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    a, b, c = rng.normal(0, 0.6, 3)
    return np.exp(1j * (a * yy + b * xx + c * xx * yy)).astype(np.complex64)


def simulate_kspace(image: np.ndarray, n_coils: int, noise: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(kspace complex64 (coils, rows, cols), target float32 (rows, cols)) from a magnitude slice."""
    maps = coil_maps(n_coils, image.shape, rng)
    coils = maps * (image * smooth_phase(image.shape, rng))[None]
    kspace = fft2c(coils)
    kspace = kspace + noise * (rng.normal(size=kspace.shape) + 1j * rng.normal(size=kspace.shape))
    kspace = kspace.astype(np.complex64)
    return kspace, rss(ifft2c(kspace)).astype(np.float32)
