"""Small synthetic multi-coil slices and fastMRI-layout HDF5 files for the reconstruction tests."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import sigpy as sp
import sigpy.mri

from pretrain.recon.coils import rss, to_image, to_kspace

HEADER = """<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
 <encoding>
  <encodedSpace><matrixSize><x>{ex}</x><y>{ey}</y><z>1</z></matrixSize></encodedSpace>
  <reconSpace><matrixSize><x>{rx}</x><y>{ry}</y><z>1</z></matrixSize></reconSpace>
 </encoding>
</ismrmrdHeader>"""


def phantom_slice(shape=(48, 40), coils=6, noise=0.0, seed=0):
    """(kspace (coils, rows, cols) complex64, maps, image) of a Shepp-Logan phantom with birdcage coils."""
    rng = np.random.default_rng(seed)
    maps = sp.mri.birdcage_maps((coils, *shape)).astype(np.complex64)
    image = sp.shepp_logan(shape).astype(np.complex64) * np.exp(1j * rng.uniform(0, 0.3))
    k = to_kspace(maps * image)
    if noise:
        k = k + noise * (rng.normal(size=k.shape) + 1j * rng.normal(size=k.shape))
    return k.astype(np.complex64), maps, image


def write_fastmri_file(path: Path, slices=3, coils=4, grid=(40, 32), recon=(32, 32), seed=0,
                       acquisition="CORPD_FBK", header_grid=None, nan_slice=None, mask=None):
    """A fastMRI-layout multi-coil file: kspace, reconstruction_rss, ismrmrd_header, attrs."""
    ks, rsss = [], []
    for s in range(slices):
        k, _, _ = phantom_slice(grid, coils, noise=1e-4, seed=seed + s)
        img = rss(to_image(k))
        r0, c0 = (grid[0] - recon[0]) // 2, (grid[1] - recon[1]) // 2
        ks.append(k)
        rsss.append(img[r0:r0 + recon[0], c0:c0 + recon[1]])
    kspace = np.stack(ks)
    if nan_slice is not None:
        kspace[nan_slice, 0, 0, 0] = np.nan
    hx, hy = header_grid or grid
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=kspace)
        f.create_dataset("reconstruction_rss", data=np.stack(rsss).astype(np.float32))
        f.create_dataset("ismrmrd_header", data=HEADER.format(ex=hx, ey=hy, rx=recon[0], ry=recon[1]).encode())
        if mask is not None:
            f.create_dataset("mask", data=mask)
        f.attrs["acquisition"] = acquisition
        f.attrs["max"] = float(np.max(rsss))
        f.attrs["patient_id"] = f"p{seed}"
    return path
