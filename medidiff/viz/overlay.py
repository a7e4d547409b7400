"""PNG overlay montages of anomaly results: input, reconstruction, map, segmentation contour.

One row per axial slice (the last axis of the RAS model grid), four columns: the input,
its reconstruction, the anomaly map (``hot`` colour map over the input), and the input
with the segmentation's contour (and the ground truth's, when given). Slices are shown
in neurological convention (patient's right on the right, anterior up), as
:func:`medidiff.io.images.display_view` does; :func:`overlay_figure` returns the
:class:`matplotlib.figure.Figure`, :func:`save_overlay` writes it.

So that a figure reads on its own, it carries a colour bar in the map's units (with the
calibrated threshold marked), orientation letters (R/L, A/P, from the grid's affine), a
label per slice naming the grid, the slice's world coordinate and the input's voxel slice,
and a caption saying how the colour scale was chosen. The scale is the same for every scan
of a run (:func:`map_scale`): three times the calibrated voxel threshold, or without
thresholds a fixed value in the map's units; never each scan's own maximum.

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
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.viz.display import display_view, draw_contour, new_figure, save_figure

__all__ = [
    "MAP_FLOOR",
    "MapScale",
    "RESIDUAL_UNITS",
    "UNCALIBRATED_TOP",
    "choose_slices",
    "map_scale",
    "orientation_letters",
    "overlay_figure",
    "save_overlay",
    "save_result_overlay",
    "slice_label",
]

#: map values at or below this fraction of the colour scale's top are not drawn
MAP_FLOOR = 0.25
#: what an anomaly map's values are, by residual (post-processing's ``residual``)
RESIDUAL_UNITS = {
    "l1": "|x - x_hat| (model intensity scale, 0-1)",
    "l2": "(x - x_hat)^2 (model intensity scale, 0-1)",
}
#: the colour-scale top without thresholds: 0.4 of the model's intensity range for the L1
#: residual (its square for L2). Healthy tissue of the default model stays below a quarter
#: of it (transparent) and a tumour reaches about half.
UNCALIBRATED_TOP = {"l1": 0.4, "l2": 0.16}


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


@dataclass(frozen=True)
class MapScale:
    """The colour scale of the anomaly map, the same for every scan of a run.

    Attributes:
        top: the value at the top of the colour bar (0 at the bottom).
        how: how ``top`` was chosen, as the figure states it.
        units: what the map's values are.
        threshold: the calibrated voxel threshold (marked on the colour bar), if any.
    """

    top: float
    how: str
    units: str = RESIDUAL_UNITS["l1"]
    threshold: float | None = None


def map_scale(thresholds: Any = None, residual: str = "l1") -> MapScale:
    """The colour scale shared by every overlay of a run.

    With calibrated thresholds: 0 to three times the voxel threshold, so voxels at the
    threshold sit a third of the way up and a healthy scan looks dark, scan after scan.
    Without: a fixed scale in the map's own units (:data:`UNCALIBRATED_TOP`: 0.4 of the
    model's 0-1 intensity range for the L1 residual), the same for every scan and every
    run, so maps stay comparable; what counts as anomalous is then not known.

    Args:
        thresholds: calibrated :class:`~medidiff.anomaly.thresholds.Thresholds` or ``None``.
        residual: ``"l1"`` or ``"l2"`` (the post-processing's residual: the map's units).
    """
    units = RESIDUAL_UNITS.get(residual, RESIDUAL_UNITS["l1"])
    value = getattr(thresholds, "voxel_threshold", None)
    if value is not None and float(value) > 0:
        top = 3.0 * float(value)
        return MapScale(top, f"0-{top:.3g} = 3x the calibrated voxel threshold {float(value):.3g}",
                        units, float(value))
    top = UNCALIBRATED_TOP.get(residual, UNCALIBRATED_TOP["l1"])
    return MapScale(top, f"fixed 0-{top:g}, the same for every scan (not calibrated: "
                    "no threshold known)", units)


def _axis_letter(vector: np.ndarray) -> str:
    """The RAS letter a voxel axis points to (its largest world component)."""
    i = int(np.argmax(np.abs(vector[:3])))
    return "RAS"[i] if vector[i] > 0 else "LPI"[i]


def orientation_letters(affine: np.ndarray | None) -> dict[str, str]:
    """The letters at the edges of an axial panel of a grid with ``affine``, as
    :func:`~medidiff.io.images.display_view` shows it (x to the right, y up).

    Returns:
        ``{"left", "right", "top", "bottom"}``: e.g. L, R, A, P for a RAS grid.
    """
    a = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    opposite = dict(zip("RASLPI", "LPIRAS"))
    x, y = _axis_letter(a[:3, 0]), _axis_letter(a[:3, 1])
    return {"left": opposite[x], "right": x, "top": y, "bottom": opposite[y]}


def slice_label(z: int, size: int, affine: np.ndarray | None = None,
                native_affine: np.ndarray | None = None, grid: str = "model grid") -> str:
    """``axial slice 30 of 72 (model grid)`` and, with the affines, the slice centre's
    world coordinate along the slice axis and the input's voxel slice there."""
    text = f"axial slice {z} of {size} ({grid})"
    if affine is None:
        return text
    a = np.asarray(affine, dtype=np.float64)
    i = int(np.argmax(np.abs(a[:3, 2])))
    world = a @ np.array([0.0, 0.0, z, 1.0])  # the slice axis' coordinate is the same at any x, y
    text += f"\n{'xyz'[i]} = {world[i]:+.1f} mm"
    if native_affine is not None:
        voxel = np.linalg.solve(np.asarray(native_affine, dtype=np.float64), world)
        k = int(np.argmax(np.abs(np.linalg.solve(np.asarray(native_affine), a)[:3, 2])))
        text += f", input {'ijk'[k]} = {voxel[k]:.0f}"
    return text


def _draw_row(
    axes: Any,
    z: int,
    image: np.ndarray,
    reconstruction: np.ndarray,
    amap: np.ndarray,
    scale: MapScale,
    masks: tuple[tuple[np.ndarray | None, str], ...],
    label: str,
    letters: dict[str, str],
) -> Any:
    """One axial slice ``z``: input, reconstruction, map over the input, contours.
    Returns the map's image (for the colour bar)."""
    base = display_view(image[:, :, z])
    panels = [base, display_view(reconstruction[:, :, z])]
    mapped = None
    for col, ax in enumerate(axes):
        ax.axis("off")
        if col < 2:
            ax.imshow(panels[col], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        elif col == 2:
            ax.imshow(base, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            # below a quarter of the scale (3/4 of the voxel threshold with thresholds) the
            # input shows through: healthy tissue stays grey instead of dark red
            shown = np.ma.masked_less_equal(display_view(amap[:, :, z]), scale.top * MAP_FLOOR)
            mapped = ax.imshow(shown, cmap="hot", vmin=0, vmax=scale.top, alpha=0.8,
                               interpolation="nearest")
        else:
            ax.imshow(base, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            for mask, colour in masks:
                if mask is not None:
                    draw_contour(ax, mask[:, :, z], colour, linewidth=0.8)
    ax0 = axes[0]
    ax0.text(0.0, -0.02, label, color="black", fontsize=5.5, va="top", ha="left",
             transform=ax0.transAxes)
    style = dict(color="cyan", fontsize=6, fontweight="bold", transform=ax0.transAxes,
                 bbox=dict(facecolor="black", edgecolor="none", alpha=0.7, pad=0.6))
    ax0.text(0.01, 0.5, letters["left"], ha="left", va="center", **style)
    ax0.text(0.99, 0.5, letters["right"], ha="right", va="center", **style)
    ax0.text(0.5, 0.99, letters["top"], ha="center", va="top", **style)
    ax0.text(0.5, 0.01, letters["bottom"], ha="center", va="bottom", **style)
    return mapped


def _colour_bar(fig: Any, mapped: Any, scale: MapScale) -> Any:
    """The map's colour bar at the figure's right edge, in the map's units, with the
    threshold marked when calibrated."""
    box = fig.subplotpars
    height = box.top - box.bottom
    cax = fig.add_axes((box.right + 0.015, box.bottom + 0.15 * height, 0.013, 0.7 * height))
    bar = fig.colorbar(mapped, cax=cax)
    bar.set_label(scale.units, fontsize=6)
    bar.ax.tick_params(labelsize=5)
    if scale.threshold is not None:
        bar.ax.axhline(scale.threshold, color="cyan", linewidth=1.5)
        cax.text(0.5, -0.03, f"cyan line:\nthreshold\n{scale.threshold:.3g}", fontsize=5,
                 ha="center", va="top", transform=cax.transAxes)
    return cax


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
    scale: MapScale | None = None,
    affine: np.ndarray | None = None,
    native_affine: np.ndarray | None = None,
    grid_note: str | None = None,
    title: str | None = None,
) -> Any:
    """The overlay montage: one row per axial slice; input, reconstruction, map, contour.

    Every figure carries a colour bar in the map's units, orientation letters on the
    input panels (from ``affine``), a label naming each slice's grid and position, and a
    caption saying how the colour scale was chosen.

    Args:
        image: the input on the model grid, ``(X, Y, Z)`` RAS, values in [0, 1].
        reconstruction: the reconstruction, same grid.
        anomaly_map: the anomaly map, same grid.
        segmentation: optional bool ``(X, Y, Z)``: its contour is drawn in red.
        truth: optional ground-truth mask: its contour is drawn in green.
        region: mask used to choose slices (default: where the image is non-zero).
        slices: explicit axial slice indices (default :func:`choose_slices`).
        num_slices: how many slices when choosing.
        map_max: a fixed top of the map's colour scale (units as ``scale``'s).
        scale: the run's :class:`MapScale` (default: :func:`map_scale` without
            thresholds, a fixed scale); ``map_max`` overrides its top. Values at or below
            :data:`MAP_FLOOR` of the top are transparent.
        affine: the grid's voxel-to-world matrix (the model grid's, RAS): orientation
            letters and each slice's world coordinate.
        native_affine: the input's own affine: each slice's input voxel index.
        grid_note: a caption line describing the grid (default: none).
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
    scale = scale or map_scale(None)
    if map_max is not None and map_max > 0:
        scale = MapScale(float(map_max), f"fixed 0-{float(map_max):.3g}", scale.units, scale.threshold)
    columns = [
        "input",
        "reconstruction",
        "anomaly map",
        "segmentation" if segmentation is not None else "input",
    ]
    caption = [f"anomaly map colour: {scale.how}"]
    if grid_note:
        caption = [*grid_note.splitlines(), *caption]
    caption = [part for line in caption for part in textwrap.wrap(line, 190)]
    height = 2.35 * len(slices) + 0.75 + 0.1 * len(caption)
    fig, axes = new_figure(len(slices), 4, (8.6, height))
    fig.subplots_adjust(left=0.01, right=0.89, top=1 - 0.7 / height,
                        bottom=(0.25 + 0.1 * len(caption)) / height, wspace=0.03,
                        hspace=0.35 / 2.35 * 1.0)
    masks = tuple(
        (None if mask is None else np.asarray(mask), colour)
        for mask, colour in ((truth, "lime"), (segmentation, "red"))
    )
    letters = orientation_letters(affine)
    mapped = None
    for row, z in enumerate(slices):
        label = slice_label(z, image.shape[2], affine, native_affine)
        mapped = _draw_row(axes[row], z, image, np.asarray(reconstruction), amap, scale, masks,
                           label, letters)
    for col, ax in enumerate(axes[0]):
        ax.set_title(columns[col], fontsize=8)
    _colour_bar(fig, mapped, scale)
    fig.text(0.01, 0.06 / height, "\n".join(caption), fontsize=5.5, va="bottom", ha="left")
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.12 / height)
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
            ``truth``, ``region``, ``slices``, ``num_slices``, ``map_max``, ``scale``,
            ``affine``, ``native_affine``, ``grid_note``, ``title``).

    Returns:
        The written path.
    """
    return save_figure(overlay_figure(image, reconstruction, anomaly_map, **options), path, dpi=80,
                       tight=False)


def save_result_overlay(
    result: Any,
    out: str | os.PathLike,
    *,
    truth: np.ndarray | None = None,
    scale: MapScale | None = None,
) -> Path:
    """``out/NAME_overlay.png``: the montage of a scored scan (model grid, axial slices).

    Args:
        result: an :class:`~medidiff.anomaly.results.AnomalyResult`.
        out: the output folder (exists).
        truth: a lesion mask on the model grid, drawn in green; its slices are shown.
        scale: the run's colour scale (:func:`map_scale`; default: without thresholds).

    Returns:
        The file written.
    """
    grid = result.grid
    slices = None  # with a truth: its largest slice plus slices spread over the brain
    if truth is not None and truth.any():
        slices = choose_slices(truth.astype(np.float32), grid.mask, 4)
    flag = "  not calibrated" if result.flagged is None else (
        "  FLAGGED" if result.flagged else "  not flagged")
    legend = "  (red: segmentation, green: truth)" if truth is not None else ""
    pre = result.preprocessed
    spacing = np.linalg.norm(np.asarray(pre.affine)[:3, :3], axis=0)
    note = (f"model grid: the input resampled to {' x '.join(f'{s:g}' for s in spacing)} mm, "
            f"RAS, {' x '.join(str(n) for n in grid.image.shape)} voxels; axial slices seen "
            "from above (patient's right on the right); z: world (scanner) coordinate")
    if getattr(result, "input_check", None) is not None and not result.input_check.ok:
        note += "\nINPUT OUT OF PROFILE: " + "; ".join(result.input_check.problems)[:160]
    return save_overlay(
        grid.image, grid.reconstruction, grid.anomaly_map, Path(out) / f"{result.name}_overlay.png",
        segmentation=grid.segmentation, truth=truth, region=grid.mask, slices=slices,
        scale=scale, affine=pre.affine, native_affine=pre.native_affine, grid_note=note,
        title=f"{result.name}  score {result.score:.4g}{flag}{legend}",
    )


def write_overlay(result: Any, entry: Any, out: str | os.PathLike, *, scale: MapScale) -> dict[str, Any]:
    """``on_result`` of :func:`medidiff.anomaly.runner.score_folder`: ``NAME_overlay.png``
    (``scale``: the run's colour scale, :func:`map_scale`); used by ``medidiff anomaly`` and
    MONAI bundles alike."""
    return {"files": {"overlay": save_result_overlay(result, out, scale=scale)}}
