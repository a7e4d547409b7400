"""PNG montages, overlays and (later) the HTML report. Matplotlib with the Agg backend."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _mid_slice(img: np.ndarray) -> np.ndarray:
    """A 2D view of one sample: ``(C, H, W)`` -> channel 0; ``(C, X, Y, Z)`` -> axial middle."""
    img = np.asarray(img)
    if img.ndim == 4:
        img = img[0, :, :, img.shape[-1] // 2]
    elif img.ndim == 3:
        img = img[0]
    return img


def save_image_grid(
    images: np.ndarray,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    columns: int = 8,
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
) -> Path:
    """Write a grid of images as PNG (atomically).

    Args:
        images: ``(N, C, H, W)`` or ``(N, C, X, Y, Z)`` (the axial middle slice is shown);
            arrays are in RAS order, so they are shown transposed with anterior up.
        path: the PNG to write.
        title: optional figure title.
        columns: images per row.
        vmin, vmax: display range (``None``: per-image range).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = max(1, min(columns, n))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows + (0.3 if title else 0)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, img in enumerate(images):
        ax = axes.ravel()[i]
        # RAS (x, y): transpose so rows are y, flip so anterior is up; neurological
        # convention (patient's right on the right).
        ax.imshow(np.flipud(_mid_slice(img).T), cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=100)


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 100) -> Path:
    """Lay out ``fig``, write it as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    from medidiff.io import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return Path(path)
