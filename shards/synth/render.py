"""Render one plane of a study: label map, tissue signal, findings, scanner effects, noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import CONTRASTS, TISSUE, Anatomy
from .geometry import Blob, PlaneGrid, Sampler, blend, paint
from .vocab import STRUCTURES

# Sites: scanner vendor and field strength; the protocol (contrast per plane) varies by site too.
SITES = {"A": ("SIEMENS", 3.0), "B": ("GE", 1.5), "C": ("PHILIPS", 3.0), "D": ("SIEMENS", 1.5)}
VENDOR_GAIN = {"SIEMENS": 1.0, "GE": 1.18, "PHILIPS": 0.86}
NOISE_SIGMA = {3.0: 0.022, 1.5: 0.042}  # 3 T: higher SNR
PROTOCOLS = {
    "knee": {"sag": ("PD_FS", "PD", "PD_FS", "T2_FS"), "cor": ("PD_FS", "T1", "PD_FS", "T1"),
             "ax": ("T2_FS", "PD_FS", "T2_FS", "PD_FS")},
    "ankle": {"sag": ("T1", "PD_FS", "T2_FS", "T1"), "cor": ("PD_FS", "PD_FS", "T1", "PD_FS"),
              "ax": ("T2_FS", "PD_FS", "T2_FS", "PD")},
    "shoulder": {"sag": ("T2_FS", "T1", "T2_FS", "T1"), "cor": ("PD_FS", "PD_FS", "T2_FS", "PD_FS"),
                 "ax": ("PD_FS", "T2_FS", "PD_FS", "PD_FS")},
    "hip": {"sag": ("PD_FS", "T1", "PD_FS", "T2_FS"), "cor": ("T1", "PD_FS", "T2_FS", "T1"),
            "ax": ("PD_FS", "T2_FS", "PD", "PD_FS")},
    "elbow": {"sag": ("PD_FS", "PD", "T2_FS", "PD_FS"), "cor": ("PD_FS", "T1", "PD_FS", "T2_FS"),
              "ax": ("T2_FS", "PD_FS", "PD", "T1")},
    "wrist": {"sag": ("PD_FS", "T1", "PD_FS", "PD"), "cor": ("T1", "PD_FS", "T2_FS", "PD_FS"),
              "ax": ("PD_FS", "T2_FS", "PD_FS", "T1")},
}


def protocol_contrast(joint: str, plane: str, site: str) -> str:
    options = PROTOCOLS[joint][plane]
    return options[sorted(SITES).index(site) % len(options)] if site in SITES else options[0]


@dataclass
class Scanner:
    vendor: str
    field_strength: float
    bias: np.ndarray  # linear bias-field coefficients (x, y, z) per 100 mm


def _structure_signal(joint: str, contrast: str) -> np.ndarray:
    table = CONTRASTS[contrast]
    return np.array([table[TISSUE[name]] for name in STRUCTURES[joint]], np.float32)


def render_plane(anatomy: Anatomy, grid: PlaneGrid, contrast: str,
                 findings: list[tuple[Blob, tuple[str, ...], float]], scanner: Scanner,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (image, label map, noise-free image), each (slices, rows, cols)."""
    sampler = Sampler(grid)
    labels = np.zeros(grid.dense_shape, np.uint8)
    for name, shape in anatomy.parts:
        paint(labels, sampler, shape, anatomy.structure_index(name))
    image = _structure_signal(anatomy.joint, contrast)[labels]
    fluid = CONTRASTS[contrast]["fluid"]
    names = STRUCTURES[anatomy.joint]
    for blob, host, amount in findings:
        within = np.isin(labels, [names.index(h) for h in host])
        blend(image, sampler, blob, fluid, amount, within=within)
    image *= _bias_field(sampler, scanner.bias)
    if scanner.field_strength < 2.0:  # 1.5 T: flatter contrast
        image = image ** 1.12
    s, sub = grid.shape[0], grid.sub
    image = image.reshape(s, sub, *grid.shape[1:]).mean(axis=1) * VENDOR_GAIN[scanner.vendor]
    seg = labels[sub // 2::sub].copy()
    sigma = NOISE_SIGMA.get(scanner.field_strength, 0.03) * VENDOR_GAIN[scanner.vendor]
    noisy = np.sqrt((image + rng.normal(0, sigma, image.shape)) ** 2 + rng.normal(0, sigma, image.shape) ** 2)
    return noisy.astype(np.float32), seg, image.astype(np.float32)


def _bias_field(sampler: Sampler, coef: np.ndarray) -> np.ndarray:
    """Smooth multiplicative coil-shading field in patient coordinates (same in every plane)."""
    field = np.float32(1.0)
    for dim, axis in enumerate(sampler.axes):
        a = "xyz".index(axis)
        shape = [1, 1, 1]
        shape[dim] = -1
        field = field + coef[a] * sampler.coords[dim].reshape(shape) / 100.0
    return np.clip(field, 0.5, 1.5).astype(np.float32)
