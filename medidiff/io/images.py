"""Image files: figures and image grids written as PNG, atomically.

Figures are built with matplotlib's object API (:class:`matplotlib.figure.Figure` on a
``FigureCanvasAgg``), never through ``pyplot``: writing a PNG neither switches the global
backend (a notebook keeps its own) nor leaves figures registered in pyplot.

Arrays are in RAS order (index x increases towards the patient's Right, y towards
Anterior). :func:`display_view` is the one place that turns an axial slice into screen
orientation: anterior up, the patient's right on the right (neurological convention).

Example:
    >>> import numpy as np, tempfile, os
    >>> images = np.random.default_rng(0).uniform(0, 1, (3, 1, 16, 20))
    >>> path = save_image_grid(images, os.path.join(tempfile.mkdtemp(), "grid.png"))
    >>> path.read_bytes()[:4] == b"\\x89PNG"
    True
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["display_view", "mid_slice", "new_figure", "save_figure", "save_image_grid"]


def display_view(slice_2d: np.ndarray) -> np.ndarray:
    """An axial RAS slice ``(X, Y)`` in display orientation ``(Y, X)``: anterior up.

    Rows become y (flipped so that the largest y, anterior, is the top row) and columns x
    (the patient's right on the right: neurological convention).

    Args:
        slice_2d: ``(X, Y)`` array of the RAS model grid.

    Returns:
        ``flipud(slice_2d.T)``, the array a panel shows.
    """
    return np.flipud(np.asarray(slice_2d).T)


def mid_slice(img: np.ndarray) -> np.ndarray:
    """A 2D view of one sample: ``(C, H, W)`` -> channel 0; ``(C, X, Y, Z)`` -> axial middle."""
    img = np.asarray(img)
    if img.ndim == 4:
        img = img[0, :, :, img.shape[-1] // 2]
    elif img.ndim == 3:
        img = img[0]
    return img


def new_figure(rows: int, columns: int, figsize: tuple[float, float]) -> tuple[Any, np.ndarray]:
    """A figure with a ``rows`` x ``columns`` grid of axes, on an Agg canvas (no pyplot).

    Args:
        rows, columns: the axes grid.
        figsize: width and height in inches.

    Returns:
        ``(figure, axes)``, ``axes`` a ``(rows, columns)`` object array.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    return fig, axes


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
            arrays are in RAS order, so they are shown with :func:`display_view`.
        path: the PNG to write.
        title: optional figure title.
        columns: images per row.
        vmin, vmax: display range (``None``: per-image range).
    """
    n = len(images)
    cols = max(1, min(columns, n))
    rows = int(np.ceil(n / cols))
    fig, axes = new_figure(rows, cols, (1.6 * cols, 1.6 * rows + (0.3 if title else 0)))
    for ax in axes.ravel():
        ax.axis("off")
    for i, img in enumerate(images):
        axes.ravel()[i].imshow(display_view(mid_slice(img)), cmap="gray", vmin=vmin, vmax=vmax,
                               interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=100)


def save_figure(fig: Any, path: str | os.PathLike, *, dpi: int = 100, tight: bool = True) -> Path:
    """Lay out ``fig`` and write it as PNG atomically.

    Works for any :class:`matplotlib.figure.Figure`; one made with ``pyplot`` is also
    closed (released from pyplot's registry), as pyplot keeps it alive otherwise.

    Args:
        fig: the figure.
        path: the PNG to write.
        dpi: resolution.
        tight: apply ``tight_layout`` first; ``False`` for a figure laid out by hand (e.g.
            one with a colour bar axes, which ``tight_layout`` cannot place).

    Returns:
        ``path``.
    """
    from medidiff.io.atomic import atomic_path

    if tight:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot = sys.modules.get("matplotlib.pyplot")  # only if the caller imported it
    if pyplot is not None:
        pyplot.close(fig)
    return Path(path)
