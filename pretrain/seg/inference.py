"""Inference on a whole study at its native grid: MONAI sliding windows of the training patch,
blended with Gaussian weights, optionally averaged over mirrored copies (off by default: mirroring
would teach the model that left and right look alike)."""

from __future__ import annotations

import itertools

import torch
from monai.inferers import sliding_window_inference


def predict_logits(model: torch.nn.Module, image: torch.Tensor, patch, overlap: float = 0.5,
                   mirror_axes=(), sw_batch_size: int = 2) -> torch.Tensor:
    """Logits (B, K, S, R, C) of ``image`` (B, 1, S, R, C), same grid as the input."""
    patch = [int(p) for p in patch]

    def window(x):
        return sliding_window_inference(x, patch, sw_batch_size, model, overlap=overlap, mode="gaussian",
                                        padding_mode="constant", cval=0.0)

    with torch.no_grad():
        out = window(image)
        flips = [list(c) for r in range(1, len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]
        for axes in flips:
            dims = [a + 2 for a in axes]
            out = out + torch.flip(window(torch.flip(image, dims)), dims)
    return out / (1 + len(flips))


def predict_labels(model, image, patch, overlap=0.5, mirror_axes=()) -> torch.Tensor:
    """Integer label map (B, S, R, C)."""
    return predict_logits(model, image, patch, overlap, mirror_axes).argmax(dim=1)
