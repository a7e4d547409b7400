"""Shared drawing pieces of the figures and overlays: one panel, a contour, a display range.

The writers and the display orientation live in :mod:`medidiff.io.images` (writing a PNG is
I/O, used below the viz layer too) and are re-exported here: :func:`save_image_grid`,
:func:`save_figure`, :func:`display_view` (RAS ``(X, Y)`` -> screen: anterior up,
neurological convention), :func:`mid_slice`, :func:`new_figure`. Figures are
:class:`matplotlib.figure.Figure` objects on an Agg canvas; nothing here imports pyplot or
switches matplotlib's backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medidiff.io.images import display_view, mid_slice, new_figure, save_figure, save_image_grid

__all__ = [
    "axial",
    "display_view",
    "draw_contour",
    "mid_slice",
    "new_figure",
    "robust_range",
    "save_figure",
    "save_image_grid",
    "show_panel",
]


def axial(x: np.ndarray) -> np.ndarray:
    """(X, Y) as is; (X, Y, Z) -> the axial middle slice."""
    x = np.asarray(x)
    return x[:, :, x.shape[2] // 2] if x.ndim == 3 else x


def show_panel(ax: Any, slice_2d: np.ndarray, title: str, *, vmin: float | None = 0.0,
               vmax: float | None = 1.0, cmap: str = "gray") -> Any:
    """Draw one axial RAS slice as a panel (no axes, small title); return its AxesImage."""
    image = ax.imshow(display_view(slice_2d), cmap=cmap, vmin=vmin, vmax=vmax,
                      interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return image


def draw_contour(ax: Any, mask_2d: np.ndarray, color: str, *, linewidth: float = 0.9) -> None:
    """The 0.5 contour of an axial RAS mask slice, in display orientation (nothing if empty)."""
    view = display_view(np.asarray(mask_2d, dtype=float))
    if view.max() > 0:
        ax.contour(view, levels=[0.5], colors=color, linewidths=linewidth)


def robust_range(x: np.ndarray) -> tuple[float, float]:
    """The 0.5th and 99.5th percentiles (a display range that noise does not blow up)."""
    lo, hi = np.percentile(np.asarray(x, dtype=np.float64), [0.5, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))
