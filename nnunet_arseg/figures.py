"""PNG figures a person would rather look at: samples, consensus, uncertainty, coarse-to-fine scales."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from nnunet_arseg.atomic import write_atomic


def save_panel_figure(path: str, rows: Sequence[tuple[str, Sequence[tuple[str, np.ndarray]]]],
                      image: np.ndarray | None = None) -> None:
    """Write a grid of 2D panels, one row per group (e.g. "raters", "samples"), atomically as PNG.

    Each panel is ``(title, array)``: a bool/int mask (drawn as a contour over ``image`` when given, else in grey)
    or a float map (drawn with a colour bar-free 'magma' map in [0, max]).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = max(len(panels) for _, panels in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.9 * ncols, 2.1 * len(rows)), squeeze=False)
    for ri, (row_title, panels) in enumerate(rows):
        for ci in range(ncols):
            ax = axes[ri, ci]
            ax.axis("off")
            if ci >= len(panels):
                continue
            title, arr = panels[ci]
            arr = np.asarray(arr)
            if arr.dtype.kind == "f" and title != "image":
                ax.imshow(arr, cmap="magma", vmin=0, vmax=max(float(arr.max()), 1e-6))
            elif image is not None and title != "image":
                ax.imshow(image, cmap="gray")
                if arr.any():
                    ax.contour(arr.astype(float), levels=[0.5], colors="tab:red", linewidths=1.0)
            else:
                ax.imshow(arr, cmap="gray")
            ax.set_title(title, fontsize=8)
        axes[ri, 0].text(-0.08, 0.5, row_title, transform=axes[ri, 0].transAxes, rotation=90,
                         ha="right", va="center", fontsize=9)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, bbox_inches="tight"))
    plt.close(fig)
