"""What scoring a scan gives: its model-grid scores and its native-grid outputs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from medidiff.data.profile import InputCheck
    from medidiff.data.transforms import Preprocessed
    from medidiff.io.volume import Volume

__all__ = ["NOT_CALIBRATED", "AnomalyResult", "GridScore", "Reconstruction", "scan_output_paths"]

#: the ``flagged`` cell of a scan scored without thresholds
NOT_CALIBRATED = "not calibrated"


@dataclass(frozen=True, eq=False)
class Reconstruction:
    """A reconstructor's output for one scan on the model grid.

    Attributes:
        images: x_hat, ``(K, X, Y, Z)`` float32, one reconstruction per start of the method.
        network_evaluations: network inputs (slices, volumes or windows) evaluated, counted.
    """

    images: np.ndarray
    network_evaluations: int


@dataclass(frozen=True, eq=False)
class GridScore:
    """A scan scored on the model grid (RAS, the checkpoint's spacing and shape).

    Attributes:
        image: x, the preprocessed scan, ``(X, Y, Z)`` float32 in [0, 1].
        reconstruction: x_hat (the mean over an ensemble's starts), ``(X, Y, Z)``.
        anomaly_map: the post-processed map, ``(X, Y, Z)`` float32, 0 outside ``mask``.
        mask: the scored region (brain mask or foreground, eroded), ``(X, Y, Z)`` bool.
        segmentation: ``anomaly_map > voxel_threshold`` inside ``mask`` after the
            component filter, ``(X, Y, Z)`` bool; ``None`` without thresholds.
        score: mean of the top fraction of ``anomaly_map`` inside ``mask``.
        network_evaluations: network inputs (slices, volumes or windows) evaluated,
            counted: nfe per input x number of inputs.
    """

    image: np.ndarray
    reconstruction: np.ndarray
    anomaly_map: np.ndarray
    mask: np.ndarray
    segmentation: np.ndarray | None
    score: float
    network_evaluations: int


@dataclass(frozen=True, eq=False)
class AnomalyResult:
    """A scored scan, on the input's own grid.

    Attributes:
        name: the scan's name (file name without suffix).
        anomaly_map: ``(X, Y, Z)`` float32 on the input's grid (0 outside the scored
            region, outside the brain mask / foreground of the input's own grid, and
            outside the model grid's field of view).
        reconstruction: ``(X, Y, Z)`` float32 in the input's intensity units; outside the
            model grid's field of view and in the background it is the input itself.
        segmentation: ``(X, Y, Z)`` uint8 (1 = anomalous; nearest-neighbour resampling of
            the model-grid segmentation, 0 outside the brain) when thresholds are set, else
            ``None``.
        score: the per-scan score (computed on the model grid).
        flagged: ``score > scan_threshold`` when thresholds are set, else ``None``.
        voxels_over_threshold: voxels of ``segmentation`` (input grid) or ``None``.
        nfe_per_input: network evaluations per network input (the method's cost).
        network_evaluations: network inputs evaluated for this scan (counted).
        seconds: wall time for this scan (preprocessing to native outputs).
        reference: the input volume (its affine and metadata go with the outputs).
        grid: the model-grid results.
        preprocessed: the preprocessing record (for further resampling).
        input_check: how the scan compares with the model's training inputs
            (:class:`~medidiff.data.profile.InputCheck`), ``None`` when not checked.
        voxel_threshold, scan_threshold: the calibrated thresholds used, or ``None``.
    """

    name: str
    anomaly_map: np.ndarray
    reconstruction: np.ndarray
    segmentation: np.ndarray | None
    score: float
    flagged: bool | None
    voxels_over_threshold: int | None
    nfe_per_input: int
    network_evaluations: int
    seconds: float
    reference: Volume
    grid: GridScore
    preprocessed: Preprocessed
    input_check: InputCheck | None = None
    voxel_threshold: float | None = None
    scan_threshold: float | None = None

    @property
    def anomalous_ml(self) -> float | None:
        """The segmentation's volume in ml: :attr:`voxels_over_threshold` times the input's
        voxel volume (so it does not depend on the input's resolution); ``None`` without
        thresholds."""
        if self.voxels_over_threshold is None:
            return None
        voxel_mm3 = abs(float(np.linalg.det(np.asarray(self.reference.affine)[:3, :3])))
        return self.voxels_over_threshold * voxel_mm3 / 1000.0

    def row(self) -> dict[str, Any]:
        """The ``scores.csv`` row of this scan (without the ``file`` column; the columns
        are described in :data:`medidiff.anomaly.outputs.COLUMN_DESCRIPTIONS`)."""
        ml = self.anomalous_ml
        return {
            "name": self.name,
            "score": self.score,
            "flagged": NOT_CALIBRATED if self.flagged is None else ("yes" if self.flagged else "no"),
            "scan_threshold": "" if self.scan_threshold is None else self.scan_threshold,
            "voxels_over_threshold": ""
            if self.voxels_over_threshold is None
            else self.voxels_over_threshold,
            "anomalous_ml": "" if ml is None else round(ml, 3),
            "voxel_threshold": "" if self.voxel_threshold is None else self.voxel_threshold,
            "input_check": "" if self.input_check is None else self.input_check.summary(),
            "seconds": round(self.seconds, 3),
            "network_evaluations": self.network_evaluations,
            "nfe_per_input": self.nfe_per_input,
        }

    def output_paths(self, out: str | os.PathLike) -> dict[str, Path]:
        """Where :meth:`save` writes: ``NAME_anomaly``, ``NAME_recon`` and, with a
        segmentation, ``NAME_seg`` (.nii.gz) in ``out``."""
        return scan_output_paths(out, self.name, self.segmentation is not None)

    def save(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write the scan's maps on its own grid (the overlay montage is the caller's:
        :func:`medidiff.viz.overlay.save_result_overlay`).

        Args:
            out: the output folder (exists).

        Returns:
            The files written, by kind (``anomaly``, ``recon``, ``seg``).
        """
        from medidiff.io.volume import save_volume

        files = self.output_paths(out)
        ref = self.reference
        save_volume(ref.with_array(self.anomaly_map), files["anomaly"], dtype="float32")
        save_volume(ref.with_array(self.reconstruction), files["recon"], dtype="float32")
        if self.segmentation is not None:
            save_volume(ref.with_array(self.segmentation), files["seg"], dtype="uint8")
        return files


def scan_output_paths(out: str | os.PathLike, name: str, with_seg: bool) -> dict[str, Path]:
    """The NIfTI files ``medidiff anomaly`` writes for scan ``name`` in ``out``."""
    out = Path(out)
    paths = {"anomaly": out / f"{name}_anomaly.nii.gz", "recon": out / f"{name}_recon.nii.gz"}
    if with_seg:
        paths["seg"] = out / f"{name}_seg.nii.gz"
    return paths
