"""fastMRI's reconstruction metrics, per volume: NMSE, PSNR, SSIM from ``fastmri.evaluate``.

fastMRI computes them on whole volumes ``(slices, rows, cols)`` with the data range set to the
*volume* maximum of the target, after centre-cropping the reconstruction to the target's size. We
call its functions unchanged; this module only groups slices into volumes and crops.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from fastmri.evaluate import nmse, psnr, ssim

METRICS = {"nmse": nmse, "psnr": psnr, "ssim": ssim}


def center_crop(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Crop the last two axes to ``shape`` around the centre (fastMRI's ``center_crop`` rule)."""
    rows, cols = image.shape[-2:]
    if shape[0] > rows or shape[1] > cols:
        raise ValueError(f"cannot centre-crop {image.shape[-2:]} to a larger {tuple(shape)}")
    r0, c0 = (rows - shape[0]) // 2, (cols - shape[1]) // 2
    return image[..., r0:r0 + shape[0], c0:c0 + shape[1]]


def volume_metrics(target: np.ndarray, recon: np.ndarray) -> dict[str, float]:
    """NMSE, PSNR, SSIM of one volume (``(slices, rows, cols)``), recon cropped to the target."""
    target = np.asarray(target, np.float64)
    recon = center_crop(np.asarray(recon, np.float64), target.shape[-2:])
    return {name: float(np.asarray(fn(target, recon)).reshape(-1)[0]) for name, fn in METRICS.items()}


class VolumeAccumulator:
    """Collect slices per (volume, method) and score whole volumes at the end."""

    def __init__(self):
        self.slices: dict[tuple[str, str], list[tuple[int, np.ndarray, np.ndarray]]] = defaultdict(list)
        self.group_of: dict[str, str] = {}

    def add(self, volume: str, group: str, method: str, index: int, target: np.ndarray, recon: np.ndarray) -> None:
        self.group_of[volume] = group
        self.slices[(volume, method)].append((index, target, recon))

    def per_volume(self) -> list[dict]:
        rows = []
        for (volume, method), items in sorted(self.slices.items()):
            items.sort(key=lambda t: t[0])
            target = np.stack([t for _, t, _ in items])
            recon = np.stack([center_crop(r, t.shape) for _, t, r in items])
            rows.append({"volume": volume, "group": self.group_of[volume], "method": method,
                         "slices": len(items), **volume_metrics(target, recon)})
        return rows


def summarise(rows: list[dict], by: tuple[str, ...] = ("method",)) -> list[dict]:
    """Mean (and count) of each metric over the volumes of each ``by`` group."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in by)].append(r)
    out = []
    for key, items in sorted(groups.items()):
        out.append({**dict(zip(by, key)), "volumes": len(items),
                    **{m: float(np.mean([i[m] for i in items])) for m in METRICS}})
    return out
