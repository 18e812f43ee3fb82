"""Run plots (matplotlib, Agg): ROC curves per label, fusion weights per label, segmentation overlays."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _grid(n: int) -> tuple[int, int]:
    cols = min(4, n)
    return math.ceil(n / cols), cols


def plot_roc(curves: dict[str, dict[str, tuple]], labels: list[str], path: Path) -> Path:
    """``curves[model][label] = (fpr, tpr)``; one panel per label, one line per model."""
    rows, cols = _grid(len(labels))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, labels):
        for model, per_label in curves.items():
            if name in per_label:
                fpr, tpr = per_label[name]
                ax.plot(fpr, tpr, label=model, lw=1.2)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.6, ls="--")
        ax.set(title=name, xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1))
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_fusion_weights(weights: pd.DataFrame, path: Path, title: str) -> Path:
    """Mean weight per label and source (plane, or image/EHR) with the per-patient spread."""
    stats = weights.groupby(["label", "plane"], sort=False)["weight"].agg(["mean", "std"]).reset_index()
    labels = list(dict.fromkeys(stats["label"]))
    sources = list(dict.fromkeys(stats["plane"]))
    width = 0.8 / len(sources)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 1.5), 3.2))
    x = np.arange(len(labels))
    for j, src in enumerate(sources):
        sub = stats[stats["plane"] == src].set_index("label").reindex(labels)
        ax.bar(x + j * width, sub["mean"], width, yerr=sub["std"].fillna(0), label=src, capsize=2)
    ax.set_xticks(x + width * (len(sources) - 1) / 2, labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="weight", ylim=(0, 1), title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_overlays(images: np.ndarray, truth: np.ndarray, pred: np.ndarray, keys: list[str], path: Path) -> Path:
    """Middle slice of a few cases: image, ground truth, prediction."""
    n = len(keys)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    vmax = max(int(truth.max()), int(pred.max()), 1)
    for i, key in enumerate(keys):
        s = images.shape[1] // 2
        for ax, img, title in zip(axes[i], (images[i][s], truth[i][s], pred[i][s]), ("image", "truth", "prediction")):
            ax.imshow(images[i][s], cmap="gray")
            if title != "image":
                ax.imshow(np.ma.masked_equal(img, 0), cmap="tab20", vmin=0, vmax=vmax, alpha=0.6,
                          interpolation="nearest")
            ax.set_title(f"{key} {title}" if title == "image" else title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
