"""Coil handling for one slice of multi-coil k-space ``(coils, rows, cols)`` (complex, fastMRI fft2c).

- images: :func:`to_image` / :func:`to_kspace` (fastMRI's centred orthonormal FFT);
- combination: :func:`rss` (fastMRI's ``rss_complex``) and :func:`sense_combine` with sensitivity maps;
- sensitivities: :func:`espirit_maps` (sigpy's ``EspiritCalib``); the learned alternative is VarNet's
  own sensitivity network (:mod:`pretrain.models.recon`);
- :func:`compress_coils`: coil compression to ``n`` virtual coils, by one SVD matrix for the slice
  (``svd``, Huang et al. 2008) or by geometric decomposition (``gcc``, Zhang et al. 2013: one aligned
  matrix per readout position, along the fully sampled readout axis = rows);
- :func:`prewhiten`: noise pre-whitening from a noise scan or, by default, an outer-k-space patch;
- :func:`normalise`: scale a slice by its zero-filled image (``max``/``mean``) or not at all.
"""

from __future__ import annotations

import numpy as np
import torch
from fastmri import fft2c, ifft2c, rss_complex
from sigpy.mri.app import EspiritCalib

NORMALISATIONS = ("none", "max", "mean")
COIL_COMPRESSIONS = ("svd", "gcc")
COIL_COMBINATIONS = ("rss", "sense")
ESPIRIT_KEYS = {"calib_width", "thresh", "crop", "max_iter"}


def to_image(kspace: np.ndarray) -> np.ndarray:
    """Coil images of complex k-space ``(..., rows, cols)``."""
    return torch.view_as_complex(ifft2c(torch.view_as_real(torch.as_tensor(kspace, dtype=torch.complex64)))).numpy()


def to_kspace(image: np.ndarray) -> np.ndarray:
    return torch.view_as_complex(fft2c(torch.view_as_real(torch.as_tensor(image, dtype=torch.complex64)))).numpy()


def rss(coil_images: np.ndarray, axis: int = 0) -> np.ndarray:
    """Root-sum-of-squares over the coil axis."""
    x = torch.view_as_real(torch.as_tensor(coil_images, dtype=torch.complex64))
    return rss_complex(x, dim=axis).numpy()


def sense_combine(coil_images: np.ndarray, maps: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Least-squares (SENSE, R=1) combination ``sum(conj(S) x) / sum(|S|^2)``; complex image."""
    if coil_images.shape != maps.shape:
        raise ValueError(f"coil images {coil_images.shape} and sensitivity maps {maps.shape} differ in shape")
    num = (np.conj(maps) * coil_images).sum(axis=0)
    den = (np.abs(maps) ** 2).sum(axis=0)
    return np.where(den > eps, num / np.maximum(den, eps), 0).astype(np.complex64)


def espirit_maps(kspace: np.ndarray, calib_width: int = 24, thresh: float = 0.02, crop: float = 0.95,
                 max_iter: int = 100) -> np.ndarray:
    """ESPIRiT sensitivity maps ``(coils, rows, cols)`` from the k-space centre (sigpy)."""
    calib_width = min(calib_width, *kspace.shape[-2:])
    app = EspiritCalib(np.asarray(kspace, np.complex64), calib_width=calib_width, thresh=thresh, crop=crop,
                       max_iter=max_iter, show_pbar=False)
    return np.asarray(app.run(), np.complex64)


def coil_maps(kspace: np.ndarray, how: str, espirit: dict | None = None) -> np.ndarray | None:
    """Sensitivity maps the ``how`` combination needs: ESPIRiT (sigpy) for ``sense``, None for ``rss``."""
    if how not in COIL_COMBINATIONS:
        raise ValueError(f"unknown coil combination '{how}'; known: {', '.join(COIL_COMBINATIONS)}")
    return espirit_maps(kspace, **(espirit or {})) if how == "sense" else None


def combine_coils(kspace: np.ndarray, maps: np.ndarray | None = None) -> np.ndarray:
    """Magnitude image of multi-coil ``kspace``: RSS, or |SENSE combination| when ``maps`` are given."""
    if maps is None:
        return rss(to_image(kspace))
    return np.abs(sense_combine(to_image(kspace), maps)).astype(np.float32)


def _check_virtual(coils: int, n_virtual: int) -> None:
    if not 1 <= n_virtual <= coils:
        raise ValueError(f"virtual coils must be in [1, {coils}], got {n_virtual}")


def compression_matrix(kspace: np.ndarray, n_virtual: int) -> np.ndarray:
    """``(n_virtual, coils)`` matrix of the leading left singular vectors of the coil data."""
    coils = kspace.shape[0]
    _check_virtual(coils, n_virtual)
    u, _, _ = np.linalg.svd(kspace.reshape(coils, -1), full_matrices=False)
    return u[:, :n_virtual].conj().T


def _readout_to_image(kspace: np.ndarray) -> np.ndarray:
    """Centred orthonormal inverse FFT along the readout (rows) axis only: hybrid (x, ky) space."""
    return np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(kspace, axes=-2), axis=-2, norm="ortho"), axes=-2)


def _readout_to_kspace(hybrid: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fft(np.fft.ifftshift(hybrid, axes=-2), axis=-2, norm="ortho"), axes=-2)


def gcc_matrices(kspace: np.ndarray, n_virtual: int, window: int = 5, calib_cols: int | None = None,
                 align: bool = True) -> np.ndarray:
    """Geometric coil compression matrices ``(rows, n_virtual, coils)``, aligned along the readout.

    At each readout position the leading left singular vectors of the hybrid-space coil data in a
    ``window`` of neighbouring positions (over the ``calib_cols`` central phase-encode columns, all
    when ``None``) form that position's matrix; each matrix is then rotated by the unitary ``P`` that
    brings it closest to its neighbour's (``P = V U^H`` for ``A_x A_{x-1}^H = U S V^H``), so virtual
    coils vary smoothly along the readout and stay spatially coherent images.
    """
    coils, rows, cols = kspace.shape
    _check_virtual(coils, n_virtual)
    if window < 1:
        raise ValueError(f"GCC window must be >= 1 readout position, got {window}")
    hybrid = _readout_to_image(kspace)
    if calib_cols is not None:
        c0 = (cols - min(calib_cols, cols)) // 2
        hybrid = hybrid[..., c0:c0 + min(calib_cols, cols)]
    half = window // 2
    mats = np.empty((rows, n_virtual, coils), np.complex128)
    for x in range(rows):
        block = hybrid[:, max(0, x - half):x + half + 1].reshape(coils, -1)
        u, _, _ = np.linalg.svd(block, full_matrices=False)
        mats[x] = u[:, :n_virtual].conj().T
    for x in range(1, rows if align else 1):
        u, _, vh = np.linalg.svd(mats[x] @ mats[x - 1].conj().T)
        mats[x] = (vh.conj().T @ u.conj().T) @ mats[x]
    return mats


def compress_coils(kspace: np.ndarray, n_virtual: int, method: str = "svd", **gcc) -> np.ndarray:
    """Coil compression to ``(n_virtual, rows, cols)`` virtual-coil k-space by ``svd`` or ``gcc``."""
    if method == "svd":
        a = compression_matrix(kspace, n_virtual)
        return np.tensordot(a, kspace, axes=(1, 0)).astype(np.complex64)
    if method == "gcc":
        mats = gcc_matrices(kspace, n_virtual, **gcc)
        hybrid = np.einsum("xvc,cxy->vxy", mats, _readout_to_image(kspace))
        return _readout_to_kspace(hybrid).astype(np.complex64)
    raise ValueError(f"unknown coil compression '{method}'; known: {', '.join(COIL_COMPRESSIONS)}")


def outer_kspace_noise(kspace: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Noise samples ``(coils, n)`` from the four corners of k-space, where signal is negligible."""
    rows, cols = kspace.shape[-2:]
    r, c = max(1, int(rows * fraction)), max(1, int(cols * fraction))
    corners = [kspace[:, :r, :c], kspace[:, :r, -c:], kspace[:, -r:, :c], kspace[:, -r:, -c:]]
    return np.concatenate([x.reshape(kspace.shape[0], -1) for x in corners], axis=1)


def whitening_matrix(noise: np.ndarray) -> np.ndarray:
    """``W`` with ``W Psi W^H = I`` for the coil noise covariance ``Psi`` of ``noise`` ``(coils, n)``."""
    noise = noise.reshape(noise.shape[0], -1)
    if noise.shape[1] < noise.shape[0]:
        raise ValueError(f"need at least {noise.shape[0]} noise samples per coil, got {noise.shape[1]}")
    psi = noise @ noise.conj().T / noise.shape[1]
    return np.linalg.inv(np.linalg.cholesky(psi))


def prewhiten(kspace: np.ndarray, noise: np.ndarray | None = None, fraction: float = 0.1) -> np.ndarray:
    """Decorrelate coil noise to unit variance; ``noise`` is a noise scan, else the outer k-space."""
    w = whitening_matrix(noise if noise is not None else outer_kspace_noise(kspace, fraction))
    return np.tensordot(w, kspace, axes=(1, 0)).astype(np.complex64)


def normalise(kspace: np.ndarray, how: str, reference: np.ndarray) -> tuple[np.ndarray, float]:
    """Scale ``kspace`` so its zero-filled ``reference`` image has max (or mean) 1; returns the scale."""
    if how not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation '{how}'; known: {', '.join(NORMALISATIONS)}")
    if how == "none":
        return kspace, 1.0
    scale = float(reference.max() if how == "max" else reference.mean())
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"cannot normalise by {how} = {scale} of the zero-filled image")
    return (kspace / scale).astype(np.complex64), scale
