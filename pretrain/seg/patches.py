"""Training patches: nnU-Net's foreground oversampling with MONAI's ``RandCropByPosNegLabel``.

A fraction ``pos_fraction`` of patches is centred on a foreground voxel (any structure), the rest
anywhere; volumes smaller than the patch are padded first (image with 0, labels with ``ignore``).
The crop's random state is seeded by the caller, so a run draws the same patches again on resume.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import RandCropByPosNegLabel, SpatialPad


def sample_patches(image: torch.Tensor, label: torch.Tensor, patch, pos_fraction: float, n: int, seed: int,
                   ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` patches of (C, S, R, C) ``image`` and (1, S, R, C) ``label``: ((n, C, *patch), (n, 1, *patch))."""
    patch = [int(p) for p in patch]
    image = SpatialPad(patch, mode="constant", value=0)(image)
    label = SpatialPad(patch, mode="constant", value=ignore_index)(label)
    foreground = (label > 0) & (label != ignore_index)
    crop = RandCropByPosNegLabel(patch, pos=pos_fraction, neg=1.0 - pos_fraction, num_samples=n,
                                 allow_smaller=False)
    crop.set_random_state(seed=int(seed) % (2**32))
    crop.randomize(foreground)
    images = [torch.as_tensor(c) for c in crop(image, label=foreground, randomize=False)]
    labels = [torch.as_tensor(c) for c in crop(label, label=foreground, randomize=False)]
    return torch.stack([i.as_subclass(torch.Tensor) for i in images]), torch.stack(
        [lab.as_subclass(torch.Tensor) for lab in labels])


def centre_on_foreground(labels: torch.Tensor, ignore_index: int = 255) -> np.ndarray:
    """Whether each patch's centre voxel is foreground (for checking the oversampling rate)."""
    c = [s // 2 for s in labels.shape[2:]]
    centre = labels[:, 0, c[0], c[1], c[2]]
    return ((centre > 0) & (centre != ignore_index)).numpy()
