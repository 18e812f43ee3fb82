"""A PNG of a study's middle slices and label maps, for a quick look."""

from __future__ import annotations

from pathlib import Path

from .schema import PLANES


def save_preview(sample: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    planes = [p for p in PLANES if p in sample]
    fig, axes = plt.subplots(2, len(planes), figsize=(3 * len(planes), 6), squeeze=False)
    for i, plane in enumerate(planes):
        mid = sample[plane].shape[0] // 2
        contrast = sample["meta"]["planes"][plane]["contrast"]
        axes[0, i].imshow(sample[plane][mid], cmap="gray")
        axes[0, i].set_title(f"{plane} {contrast}")
        if f"{plane}.seg" in sample:
            axes[1, i].imshow(sample[f"{plane}.seg"][mid], cmap="tab20", interpolation="nearest")
    for ax in axes.flat:
        ax.axis("off")
    pos = [k for k, v in (sample.get("labels") or {}).items() if v]
    fig.suptitle(f"{sample['meta']['joint']} {sample['__key__']}  positive: {', '.join(pos) or 'none'}")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
