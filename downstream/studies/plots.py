"""Study plots (matplotlib, Agg): metric vs a size with confidence bands, and matrix heatmaps."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def plot_bands(agg: pd.DataFrame, x: str, group: str, path: Path, xlabel: str, ylabel: str, title: str,
               logx: bool = True) -> Path:
    """One line per ``group`` of ``mean`` vs ``x``, shaded between ``lo`` and ``hi`` where known."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, g in agg.sort_values(x).groupby(group, sort=True):
        xs = g[x].astype(float).to_numpy()
        line, = ax.plot(xs, g["mean"], marker="o", label=str(name))
        lo, hi = g["lo"].astype(float).to_numpy(), g["hi"].astype(float).to_numpy()
        known = np.isfinite(lo) & np.isfinite(hi)
        if known.any():
            ax.fill_between(xs[known], lo[known], hi[known], alpha=0.2, color=line.get_color())
    if logx:
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ticks = sorted(agg[x].astype(float).unique())
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmap(matrix: pd.DataFrame, path: Path, title: str, xlabel: str, ylabel: str,
                 cmap: str = "viridis", center: float | None = None) -> Path:
    """``matrix`` (rows x columns of floats) as an annotated heatmap; NaN cells stay blank."""
    values = matrix.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 * values.shape[1] + 2.5, 0.6 * values.shape[0] + 1.8))
    kw = {}
    if center is not None and np.isfinite(values).any():
        span = np.nanmax(np.abs(values - center)) or 1.0
        kw = {"vmin": center - span, "vmax": center + span}
    im = ax.imshow(values, cmap=cmap, aspect="auto", **kw)
    ax.set_xticks(range(values.shape[1]), [str(c) for c in matrix.columns], rotation=30, ha="right")
    ax.set_yticks(range(values.shape[0]), [str(r) for r in matrix.index])
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8, color="white")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
