"""Montage of a paired synthetic dataset: each image at its lesion's largest axial slice with
the label outlined (red), so a glance shows whether the painted lesions sit in their labels.
Volumes are shown in RAS order whatever their on-disk voxel order.

Example:
    >>> import tempfile, pathlib, numpy as np
    >>> from medidiff.io import Volume, save_volume
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> img = np.random.default_rng(0).random((16, 16, 8)).astype(np.float32)
    >>> lab = np.zeros((16, 16, 8), np.uint8); lab[5:9, 5:9, 3:5] = 1
    >>> _ = save_volume(Volume(img, np.eye(4)), d / "a_synth.nii.gz")
    >>> _ = save_volume(Volume(lab, np.eye(4)), d / "a_label.nii.gz")
    >>> save_pair_montage(d, [{"name": "a", "image": "a_synth.nii.gz", "label": "a_label.nii.gz",
    ...                        "kind": "tumor", "lesion_ml": "0.032"}], d / "montage.png").name
    'montage.png'
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medidiff.viz.display import draw_contour, new_figure, robust_range, save_figure, show_panel

__all__ = ["save_pair_montage"]


def _ras(volume) -> np.ndarray:
    """The volume's voxels in RAS axis order (so axis 2 is axial whatever the file's order)."""
    import nibabel as nib

    return np.asarray(nib.as_closest_canonical(nib.Nifti1Image(np.asarray(volume.array), volume.affine)).dataobj)


def save_pair_montage(folder: str | os.PathLike, rows: Sequence[Mapping[str, str]],
                      path: str | os.PathLike, *, max_pairs: int = 16, columns: int = 4) -> Path | None:
    """Write a PNG of up to ``max_pairs`` pairs from a pairs manifest's ``rows``.

    Args:
        folder: the pairs folder (the rows' files are relative to it).
        rows: manifest rows (``image``, ``label``, ``name``, ``kind``, ``lesion_ml``).
        path: the PNG to write.
        max_pairs: pairs shown (the first ones).
        columns: panels per row.

    Returns:
        The PNG path, or ``None`` when there is nothing to show.
    """
    from medidiff.io import load_volume

    chosen = list(rows)[:max_pairs]
    if not chosen:
        return None
    n_rows = math.ceil(len(chosen) / columns)
    fig, axes = new_figure(n_rows, min(columns, len(chosen)), (2.4 * min(columns, len(chosen)), 2.6 * n_rows))
    axes = np.atleast_1d(axes).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, row in zip(axes, chosen):
        image = _ras(load_volume(Path(folder) / row["image"])).astype(np.float32)
        label = _ras(load_volume(Path(folder) / row["label"])) > 0
        z = int(np.argmax(label.sum(axis=(0, 1)))) if label.any() else image.shape[2] // 2
        lo, hi = robust_range(image)
        title = f"{row.get('name', '')}\n{row.get('kind', '')} {row.get('lesion_ml', '')} ml"
        show_panel(ax, image[:, :, z], title, vmin=lo, vmax=hi)
        draw_contour(ax, label[:, :, z], "red")
    return save_figure(fig, path)
