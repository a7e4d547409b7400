"""PNG overlay montages of anomaly results: input, reconstruction, map, segmentation contour.

One row per axial slice (the last axis of the RAS model grid), four columns: the input,
its reconstruction, the anomaly map (``hot`` colour map over the input), and the input
with the segmentation's contour (and the ground truth's, when given). Slices are shown
in neurological convention (patient's right on the right, anterior up), as
:func:`medidiff.io.images.display_view` does; :func:`overlay_figure` returns the
:class:`matplotlib.figure.Figure`, :func:`save_overlay` writes it.

Example:
    >>> import numpy as np, tempfile, os
    >>> x = np.zeros((16, 16, 8), np.float32); x[4:12, 4:12, 2:6] = 0.5
    >>> m = np.zeros_like(x); m[6:9, 6:9, 3:5] = 0.4
    >>> path = save_overlay(x, x, m, os.path.join(tempfile.mkdtemp(), "o.png"),
    ...                     segmentation=m > 0.2)
    >>> path.name
    'o.png'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.viz.display import display_view, draw_contour, new_figure, save_figure

__all__ = ["MAP_FLOOR", "choose_slices", "map_scale", "overlay_figure", "save_overlay", "save_result_overlay"]

#: map values at or below this fraction of the colour scale's top are not drawn
MAP_FLOOR = 0.25


def choose_slices(
    anomaly_map: np.ndarray, region: np.ndarray | None, num_slices: int = 4
) -> list[int]:
    """Axial slices worth showing: the one with the largest map mass, plus slices evenly
    spread over the region's (or the whole grid's) axial extent.

    Args:
        anomaly_map: ``(X, Y, Z)``.
        region: ``(X, Y, Z)`` mask that bounds the choice (e.g. the brain), or ``None``.
        num_slices: how many slices (at most Z).

    Returns:
        Sorted, distinct slice indices.
    """
    z_size = anomaly_map.shape[2]
    num_slices = max(1, min(num_slices, z_size))
    if region is not None and np.asarray(region).any():
        zs = np.flatnonzero(np.asarray(region).any(axis=(0, 1)))
        lo, hi = int(zs[0]), int(zs[-1])
    else:
        lo, hi = 0, z_size - 1
    chosen = {round(v) for v in np.linspace(lo, hi, num_slices + 2)[1:-1]}
    mass = np.asarray(anomaly_map, dtype=np.float64).sum(axis=(0, 1))
    if mass.max() > 0:
        best = int(np.argmax(mass))
        if best not in chosen:
            nearest = min(chosen, key=lambda z: abs(z - best))
            chosen.discard(nearest)
            chosen.add(best)
    return sorted(chosen)


def map_scale(thresholds: Any) -> float | None:
    """A colour-scale top shared by every scan scored with the same thresholds.

    Three times the calibrated voxel threshold: voxels at the threshold sit a third of the
    way up the colour map, so a healthy scan looks dark and a lesion bright, scan after
    scan. ``None`` without thresholds (each overlay then scales to its own map).
    """
    value = getattr(thresholds, "voxel_threshold", None)
    return 3.0 * float(value) if value is not None and float(value) > 0 else None


def _map_top(amap: np.ndarray, map_max: float | None) -> float:
    """The top of the map's colour scale: ``map_max``, else the 99.9th percentile of its
    positive values (1 for an all-zero map)."""
    positive = amap[amap > 0]
    vmax = (
        map_max
        if map_max is not None
        else (float(np.percentile(positive, 99.9)) if positive.size else 1.0)
    )
    return vmax if vmax > 0 else 1.0


def _draw_row(
    axes: Any,
    z: int,
    image: np.ndarray,
    reconstruction: np.ndarray,
    amap: np.ndarray,
    vmax: float,
    masks: tuple[tuple[np.ndarray | None, str], ...],
) -> None:
    """One axial slice ``z``: input, reconstruction, map over the input, contours."""
    base = display_view(image[:, :, z])
    panels = [base, display_view(reconstruction[:, :, z])]
    for col, ax in enumerate(axes):
        ax.axis("off")
        if col < 2:
            ax.imshow(panels[col], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        elif col == 2:
            ax.imshow(base, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            # below a quarter of the scale (3/4 of the voxel threshold with map_scale) the
            # input shows through: healthy tissue stays grey instead of dark red
            shown = np.ma.masked_less_equal(display_view(amap[:, :, z]), vmax * MAP_FLOOR)
            ax.imshow(shown, cmap="hot", vmin=0, vmax=vmax, alpha=0.8, interpolation="nearest")
        else:
            ax.imshow(base, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            for mask, colour in masks:
                if mask is not None:
                    draw_contour(ax, mask[:, :, z], colour, linewidth=0.8)
    axes[0].text(1, 3, f"z={z}", color="yellow", fontsize=6, va="top")


def overlay_figure(
    image: np.ndarray,
    reconstruction: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    segmentation: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    region: np.ndarray | None = None,
    slices: list[int] | None = None,
    num_slices: int = 4,
    map_max: float | None = None,
    title: str | None = None,
) -> Any:
    """The overlay montage: one row per axial slice; input, reconstruction, map, contour.

    Args:
        image: the input on the model grid, ``(X, Y, Z)`` RAS, values in [0, 1].
        reconstruction: the reconstruction, same grid.
        anomaly_map: the anomaly map, same grid.
        segmentation: optional bool ``(X, Y, Z)``: its contour is drawn in red.
        truth: optional ground-truth mask: its contour is drawn in green.
        region: mask used to choose slices (default: where the image is non-zero).
        slices: explicit axial slice indices (default :func:`choose_slices`).
        num_slices: how many slices when choosing.
        map_max: top of the map's colour scale (default: its 99.9th percentile). Give a
            fixed value, e.g. :func:`map_scale` of the calibrated thresholds, to make
            overlays of different scans comparable. Values at or below
            :data:`MAP_FLOOR` of it are transparent.
        title: figure title.

    Returns:
        A :class:`matplotlib.figure.Figure` (Agg canvas, no pyplot).
    """
    image = np.asarray(image, dtype=np.float32)
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if region is None:
        region = image > 0
    if slices is None:
        slices = choose_slices(amap, region, num_slices)
    vmax = _map_top(amap, map_max)
    columns = [
        "input",
        "reconstruction",
        "anomaly map",
        "segmentation" if segmentation is not None else "input",
    ]
    fig, axes = new_figure(
        len(slices), 4, (8.0, 2.1 * len(slices) + (0.4 if title else 0.1))
    )
    masks = tuple(
        (None if mask is None else np.asarray(mask), colour)
        for mask, colour in ((truth, "lime"), (segmentation, "red"))
    )
    for row, z in enumerate(slices):
        _draw_row(axes[row], z, image, np.asarray(reconstruction), amap, vmax, masks)
    for col, ax in enumerate(axes[0]):
        ax.set_title(columns[col], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def save_overlay(
    image: np.ndarray,
    reconstruction: np.ndarray,
    anomaly_map: np.ndarray,
    path: str | os.PathLike,
    **options: Any,
) -> Path:
    """Write the montage of :func:`overlay_figure` as PNG (atomically, 80 dpi).

    Args:
        image, reconstruction, anomaly_map: as :func:`overlay_figure`.
        path: the PNG to write.
        **options: the keyword arguments of :func:`overlay_figure` (``segmentation``,
            ``truth``, ``region``, ``slices``, ``num_slices``, ``map_max``, ``title``).

    Returns:
        The written path.
    """
    return save_figure(overlay_figure(image, reconstruction, anomaly_map, **options), path, dpi=80)


def save_result_overlay(
    result: Any,
    out: str | os.PathLike,
    *,
    truth: np.ndarray | None = None,
    map_max: float | None = None,
) -> Path:
    """``out/NAME_overlay.png``: the montage of a scored scan (model grid, axial slices).

    Args:
        result: an :class:`~medidiff.anomaly.results.AnomalyResult`.
        out: the output folder (exists).
        truth: a lesion mask on the model grid, drawn in green; its slices are shown.
        map_max: the colour-scale top (see :func:`map_scale`).

    Returns:
        The file written.
    """
    grid = result.grid
    slices = None  # with a truth: its largest slice plus slices spread over the brain
    if truth is not None and truth.any():
        slices = choose_slices(truth.astype(np.float32), grid.mask, 4)
    flag = "" if result.flagged is None else ("  FLAGGED" if result.flagged else "  not flagged")
    legend = "  (red: segmentation, green: truth)" if truth is not None else ""
    return save_overlay(
        grid.image, grid.reconstruction, grid.anomaly_map, Path(out) / f"{result.name}_overlay.png",
        segmentation=grid.segmentation, truth=truth, region=grid.mask, slices=slices,
        map_max=map_max, title=f"{result.name}  score {result.score:.4g}{flag}{legend}",
    )
