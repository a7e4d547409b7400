"""Anomaly detection by partial diffusion: the detector, its results, and calibrated thresholds.

An :class:`AnomalyDetector` is built from a checkpoint (a model trained on healthy scans)
and a method (:class:`~medidiff.anomaly.methods.MethodConfig`: ``anoddpm``, ``ddim``,
``x0``, ``patched``, ``ensemble``) plus post-processing
(:class:`~medidiff.anomaly.postprocess.PostprocessConfig`). For each scan it

1. brings the scan onto the model grid with the checkpoint's own preprocessing
   (:func:`medidiff.data.transforms.preprocess`: RAS, spacing, crop/pad, intensity to [0, 1]);
2. reconstructs it: a 2D model gets the axial slices (the last axis of the RAS grid) that
   contain brain, in batches (other slices: map 0); a 3D model gets the whole volume, or
   MONAI's ``sliding_window_inference`` windows of the trained size when the grid is
   larger (Gaussian blending);
3. scores the residual on the model grid (:mod:`medidiff.anomaly.postprocess`: L1 residual, brain
   mask, 9^3 median filter, eroded mask, top-1 % scan score, and with thresholds a
   segmentation);
4. takes the map, the reconstruction (in the input's intensity units) and the
   segmentation back to the input's own grid (:func:`medidiff.data.transforms.to_native`), so
   they overlay the input exactly, whatever its orientation.

Noise is seeded per network input from ``(seed, scan name, slice index or window
position)``, so the same seed gives the same map whatever the batch size, the order of
the scans, or the rank that processes them.

Thresholds come from healthy scans only (:func:`calibrate`, ``medidiff calibrate``): the
voxel threshold at a target false-positive rate and a scan-level threshold, tied to the
checkpoint's SHA-256 and the full method/post-processing config; a detector refuses
thresholds made for another checkpoint or config.

Example:
    >>> from medidiff.anomaly.detector import AnomalyDetector, MethodConfig  # doctest: +SKIP
    >>> det = AnomalyDetector("runs/brain_mri_2d/model.safetensors",
    ...                       MethodConfig("ddim", steps=10))      # doctest: +SKIP
    >>> result = det.score_file("sample_data/test/images/tumor-000.nii.gz")  # doctest: +SKIP
    >>> result.anomaly_map.shape, result.score                        # doctest: +SKIP
    ((96, 112, 96), 0.31...)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import medidiff
from medidiff.anomaly.methods import METHODS, MethodConfig, reconstruct, stable_seed
from medidiff.errors import CheckpointError, ConfigError, VolumeContentError
from medidiff.io import Volume, load_volume, strip_volume_suffix, write_json_atomic
from medidiff.anomaly.postprocess import (
    PostprocessConfig,
    anomaly_map,
    segment,
    threshold_at_fpr,
    top_fraction_mean,
)
from medidiff.data.transforms import (
    Preprocessed,
    Preprocessing,
    intensity_to_native,
    preprocess,
    to_native,
)

__all__ = [
    "METHODS",
    "THRESHOLDS_FORMAT",
    "AnomalyDetector",
    "AnomalyResult",
    "GridScore",
    "MethodConfig",
    "PostprocessConfig",
    "Thresholds",
    "calibrate",
]

THRESHOLDS_FORMAT = "medidiff-thresholds-1"


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


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

    def row(self) -> dict[str, Any]:
        """The ``scores.csv`` row of this scan (without the ``file`` column)."""
        return {
            "name": self.name,
            "score": self.score,
            "flagged": "" if self.flagged is None else int(self.flagged),
            "voxels_over_threshold": ""
            if self.voxels_over_threshold is None
            else self.voxels_over_threshold,
            "seconds": round(self.seconds, 3),
            "network_evaluations": self.network_evaluations,
            "nfe_per_input": self.nfe_per_input,
        }

    def output_paths(self, out: str | os.PathLike) -> dict[str, Path]:
        """Where :meth:`save` writes: ``NAME_anomaly``, ``NAME_recon`` and, with a
        segmentation, ``NAME_seg`` (.nii.gz) in ``out``."""
        return scan_output_paths(out, self.name, self.segmentation is not None)

    def save(
        self,
        out: str | os.PathLike,
        *,
        overlay: bool = True,
        truth: np.ndarray | None = None,
        map_max: float | None = None,
    ) -> dict[str, Path]:
        """Write the scan's maps on its own grid, and its overlay montage.

        Args:
            out: the output folder (exists).
            overlay: also write ``NAME_overlay.png`` (model grid, axial slices).
            truth: a lesion mask on the model grid, drawn in green; its slices are shown.
            map_max: the overlay's colour-scale top (see :func:`medidiff.viz.overlay.map_scale`).

        Returns:
            The files written, by kind (``anomaly``, ``recon``, ``seg``, ``overlay``).
        """
        from medidiff.io.volume import save_volume

        files = self.output_paths(out)
        ref = self.reference
        save_volume(ref.with_array(self.anomaly_map), files["anomaly"], dtype="float32")
        save_volume(ref.with_array(self.reconstruction), files["recon"], dtype="float32")
        if self.segmentation is not None:
            save_volume(ref.with_array(self.segmentation), files["seg"], dtype="uint8")
        if overlay:
            from medidiff.viz.overlay import choose_slices, save_overlay

            grid = self.grid
            slices = None  # with a truth: its largest slice plus slices spread over the brain
            if truth is not None and truth.any():
                slices = choose_slices(truth.astype(np.float32), grid.mask, 4)
            flag = "" if self.flagged is None else ("  FLAGGED" if self.flagged else "  not flagged")
            legend = "  (red: segmentation, green: truth)" if truth is not None else ""
            files["overlay"] = Path(out) / f"{self.name}_overlay.png"
            save_overlay(
                grid.image, grid.reconstruction, grid.anomaly_map, files["overlay"],
                segmentation=grid.segmentation, truth=truth, region=grid.mask, slices=slices,
                map_max=map_max, title=f"{self.name}  score {self.score:.4g}{flag}{legend}",
            )
        return files


def scan_output_paths(out: str | os.PathLike, name: str, with_seg: bool) -> dict[str, Path]:
    """The NIfTI files ``medidiff anomaly`` writes for scan ``name`` in ``out``."""
    out = Path(out)
    paths = {"anomaly": out / f"{name}_anomaly.nii.gz", "recon": out / f"{name}_recon.nii.gz"}
    if with_seg:
        paths["seg"] = out / f"{name}_seg.nii.gz"
    return paths


# --------------------------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------------------------


def _scan_rule(n: int, fpr: float) -> str:
    k = max(1, math.ceil((1 - fpr) * n - 1e-9))
    rule = (
        f"(1 - fpr) quantile of {n} healthy scan scores by the inverted empirical CDF: the "
        f"{k}-th smallest score (ceil({1 - fpr:g} x {n}))"
    )
    if n < 1 / fpr:
        rule += f"; with fewer than 1/fpr = {1 / fpr:g} scans this is the largest healthy score"
    return rule


@dataclass(frozen=True)
class Thresholds:
    """Voxel and scan thresholds calibrated on healthy scans, tied to a checkpoint and config.

    Attributes:
        voxel_threshold: the ``(1 - fpr)`` quantile of post-processed healthy voxel scores
            inside the scored masks, pooled over scans (model grid); a voxel is anomalous
            when its score is strictly greater.
        scan_threshold: the ``(1 - fpr)`` quantile of the healthy per-scan scores (see
            ``scan_threshold_rule``); a scan is flagged when its score is greater.
        fpr: the target false-positive rate.
        num_scans: healthy scans used.
        num_voxels: healthy voxels pooled.
        checkpoint_sha256: SHA-256 of the checkpoint file.
        checkpoint_path: where the checkpoint was (informative only).
        method: the resolved method config (dict).
        postprocess: the post-processing config (dict).
        seed: the noise seed used for calibration (informative only).
        version: the medidiff version that calibrated.
        scan_threshold_rule: how ``scan_threshold`` was computed, in words.
        scan_scores: healthy scan name -> score.
    """

    voxel_threshold: float
    scan_threshold: float
    fpr: float
    num_scans: int
    num_voxels: int
    checkpoint_sha256: str
    checkpoint_path: str
    method: Mapping[str, Any]
    postprocess: Mapping[str, Any]
    seed: int = 0
    version: str = medidiff.__version__
    scan_threshold_rule: str = ""
    scan_scores: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_healthy(
        cls,
        detector: AnomalyDetector,
        voxel_scores: Sequence[np.ndarray],
        scan_scores: Mapping[str, float],
        fpr: float = 0.05,
    ) -> Thresholds:
        """Thresholds at ``fpr`` from healthy scans scored by ``detector``.

        Args:
            detector: the detector that scored them (its checkpoint and configs are recorded).
            voxel_scores: per scan, the post-processed voxel scores inside its scored mask.
            scan_scores: per scan name, its score.
            fpr: target false-positive rate, in (0, 1).

        Returns:
            The thresholds.
        """
        pooled = (
            np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in voxel_scores])
            if (voxel_scores)
            else np.zeros(0, np.float32)
        )
        names = list(scan_scores)
        return cls(
            voxel_threshold=threshold_at_fpr(pooled, fpr),
            scan_threshold=threshold_at_fpr(np.asarray([scan_scores[n] for n in names]), fpr),
            fpr=float(fpr),
            num_scans=len(names),
            num_voxels=int(pooled.size),
            checkpoint_sha256=detector.checkpoint.sha256,
            checkpoint_path=str(detector.checkpoint.path),
            method=detector.method.to_dict(),
            postprocess=detector.postprocess.to_dict(),
            seed=detector.seed,
            scan_threshold_rule=_scan_rule(len(names), fpr),
            scan_scores={n: float(scan_scores[n]) for n in names},
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON content written by :meth:`save`."""
        return {
            "format": THRESHOLDS_FORMAT,
            "voxel_threshold": self.voxel_threshold,
            "scan_threshold": self.scan_threshold,
            "fpr": self.fpr,
            "num_scans": self.num_scans,
            "num_voxels": self.num_voxels,
            "checkpoint": {"path": self.checkpoint_path, "sha256": self.checkpoint_sha256},
            "method": dict(self.method),
            "postprocess": dict(self.postprocess),
            "seed": self.seed,
            "medidiff_version": self.version,
            "scan_threshold_rule": self.scan_threshold_rule,
            "voxel_threshold_rule": (
                "(1 - fpr) quantile (inverted empirical CDF) of post-processed healthy voxel "
                "scores inside the eroded masks on the model grid, pooled over scans"
            ),
            "scan_scores": dict(self.scan_scores),
        }

    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write the thresholds as JSON, atomically."""
        return write_json_atomic(path, self.to_dict(), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Thresholds:
        """Read a thresholds file written by :meth:`save` / ``medidiff calibrate``.

        Raises:
            ConfigError: missing, unreadable or not a medidiff thresholds file.
        """
        import json

        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                f"{path}: thresholds file not found; make one with 'medidiff calibrate'"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the thresholds JSON ({exc})") from None
        if not isinstance(raw, dict) or raw.get("format") != THRESHOLDS_FORMAT:
            raise ConfigError(
                f"{path}: not a medidiff thresholds file (format {THRESHOLDS_FORMAT!r} expected); "
                "make one with 'medidiff calibrate'"
            )
        for key in ("voxel_threshold", "scan_threshold", "fpr"):
            value = raw.get(key)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value):
                raise ConfigError(f"{path}: '{key}' must be a finite number; got {value!r}")
        try:
            ckpt = raw["checkpoint"]
            return cls(
                voxel_threshold=float(raw["voxel_threshold"]),
                scan_threshold=float(raw["scan_threshold"]),
                fpr=float(raw["fpr"]),
                num_scans=int(raw["num_scans"]),
                num_voxels=int(raw["num_voxels"]),
                checkpoint_sha256=str(ckpt["sha256"]),
                checkpoint_path=str(ckpt.get("path", "")),
                method=dict(raw["method"]),
                postprocess=dict(raw["postprocess"]),
                seed=int(raw.get("seed", 0)),
                version=str(raw.get("medidiff_version", "")),
                scan_threshold_rule=str(raw.get("scan_threshold_rule", "")),
                scan_scores={str(k): float(v) for k, v in dict(raw.get("scan_scores", {})).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"{path}: thresholds file is incomplete or malformed ({exc!r})"
            ) from None

    def check(self, detector: AnomalyDetector) -> None:
        """Refuse thresholds calibrated with another checkpoint or another config.

        Raises:
            CheckpointError: another checkpoint (SHA-256 differs).
            ConfigError: another method or post-processing config (differing keys named).
        """
        if self.checkpoint_sha256 != detector.checkpoint.sha256:
            raise CheckpointError(
                f"the thresholds were calibrated for checkpoint {self.checkpoint_path} "
                f"(sha256 {self.checkpoint_sha256[:12]}...), not {detector.checkpoint.path} "
                f"(sha256 {detector.checkpoint.sha256[:12]}...); "
                "run 'medidiff calibrate' with this checkpoint"
            )
        for section, mine in (
            ("method", detector.method.to_dict()),
            ("postprocess", detector.postprocess.to_dict()),
        ):
            theirs = dict(getattr(self, section))
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if diff:
                detail = ", ".join(f"{k}={theirs.get(k)!r} vs {mine.get(k)!r}" for k in diff)
                raise ConfigError(
                    f"the thresholds were calibrated with another {section} config ({detail}); "
                    "use the same options or run 'medidiff calibrate' with these"
                )


# --------------------------------------------------------------------------------------------
# the detector
# --------------------------------------------------------------------------------------------


def checkpoint_records(checkpoint: Any) -> tuple[Any, Preprocessing]:
    """The typed training config and preprocessing stored in an inference checkpoint
    (:func:`medidiff.models.loaded.checkpoint_records`).

    Raises:
        CheckpointError: either record is invalid (named with the file).
    """
    from medidiff.models.loaded import checkpoint_records as records

    return records(checkpoint)


def _windows_per_axis(n: int, roi: int, overlap: float) -> int:
    """How many sliding windows MONAI places along an axis of size n (for progress bars)."""
    if n <= roi:
        return 1
    interval = max(1, int(roi * (1 - overlap)))
    return math.ceil((n - roi) / interval) + 1


class AnomalyDetector:
    """Scores scans for anomalies with a diffusion model trained on healthy data.

    Args:
        checkpoint: ``model.safetensors`` path, or a :class:`~medidiff.models.checkpoint.LoadedModel`.
        method: the reconstruction method (default ``MethodConfig("ddim")``); resolved
            against the checkpoint (noise, T, input size), see :attr:`method`.
        postprocess: scoring settings (default :class:`PostprocessConfig`).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a ``torch.device``.
        batch_size: network inputs (slices, windows, patches) per network call.
        seed: the noise seed; with ``(scan name, slice/window)`` it seeds every input.
        thresholds: calibrated :class:`Thresholds` (checked against this detector).
        progress: show a progress bar over the network evaluations of each scan.

    Attributes:
        model: the network (eval mode); replace it to instrument calls.
        checkpoint: the :class:`~medidiff.models.checkpoint.InferenceCheckpoint`.
        method: the resolved :class:`MethodConfig`.
        postprocess: the :class:`PostprocessConfig`.
        preprocessing: the checkpoint's :class:`~medidiff.data.transforms.Preprocessing`.
        spatial_dims: 2 (slices) or 3 (volumes).
        input_shape: the spatial size the network was trained on (a slice or a volume or
            patch); larger grids are processed in sliding windows of this size.
        nfe_per_input: network evaluations per network input.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | Any,
        method: MethodConfig | None = None,
        postprocess: PostprocessConfig | None = None,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        seed: int = 0,
        thresholds: Thresholds | None = None,
        progress: bool = False,
    ) -> None:
        from medidiff.models.loaded import LoadedModel, load_model
        from medidiff.models.unet import prepare_for_inference
        from medidiff.runtime.distributed import resolve_device
        from medidiff.diffusion.noise import NoiseSpec

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1; got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer; got {seed!r}")
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load_model(checkpoint, self.device)
        self.model = prepare_for_inference(loaded.model, self.device)
        self.checkpoint = loaded.checkpoint
        self.preprocessing = loaded.preprocessing
        self.spatial_dims = loaded.spatial_dims
        self.input_shape: tuple[int, ...] = loaded.input_shape
        d = loaded.config.diffusion
        self.prediction_type = loaded.prediction_type
        self.schedule = loaded.schedule.to(self.device)
        self.method = (method or MethodConfig()).resolve(
            num_train_timesteps=d.num_train_timesteps, noise=d.noise, input_shape=self.input_shape
        )
        self.postprocess = postprocess or PostprocessConfig()
        self.noise_spec = NoiseSpec.from_config(d, kind=self.method.noise)
        self.null_label = loaded.conditioning.null_label
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress
        self.nfe_per_input = self.method.nfe_per_image(self.input_shape)
        self.thresholds: Thresholds | None = None
        self._evaluations = 0
        self._bar: Any = None
        if thresholds is not None:
            self.use_thresholds(thresholds)

    # ---- configuration -------------------------------------------------------------------

    def use_thresholds(self, thresholds: Thresholds | None) -> None:
        """Set (after checking) or clear the calibrated thresholds.

        Raises:
            CheckpointError, ConfigError: see :meth:`Thresholds.check`.
        """
        if thresholds is not None:
            thresholds.check(self)
        self.thresholds = thresholds

    def describe(self) -> dict[str, Any]:
        """What ``anomaly_config.json`` records: method, post-processing, checkpoint, seed."""
        return {
            "method": self.method.to_dict(),
            "postprocess": self.postprocess.to_dict(),
            "checkpoint": {
                "path": str(self.checkpoint.path),
                "sha256": self.checkpoint.sha256,
                "step": self.checkpoint.extra.get("step"),
            },
            "seed": self.seed,
            "spatial_dims": self.spatial_dims,
            "input_shape": list(self.input_shape),
            "nfe_per_input": self.nfe_per_input,
            "preprocessing": self.preprocessing.to_dict(),
            "medidiff_version": medidiff.__version__,
        }

    # ---- the network ---------------------------------------------------------------------

    def _model_fn(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``model_fn(x_t, t)`` for the samplers: unconditional (the null class for a
        class-conditional model), counting the network inputs it evaluates."""
        self._evaluations += int(x_t.shape[0])
        if self._bar is not None:
            self._bar.update(int(x_t.shape[0]))
        if self.null_label is not None:
            labels = torch.full(
                (x_t.shape[0],), self.null_label, dtype=torch.long, device=x_t.device
            )
            return self.model(x_t, t, class_labels=labels)
        return self.model(x_t, t)

    @torch.no_grad()
    def reconstruct_grid(self, image: np.ndarray, region: np.ndarray, name: str) -> np.ndarray:
        """Reconstruct a scan on the model grid (or any larger RAS grid).

        Args:
            image: x, ``(X, Y, Z)`` on the model's intensity scale.
            region: ``(X, Y, Z)`` bool; a 2D model skips axial slices without any voxel of
                it (their reconstruction is the input itself).
            name: the scan's name, part of the noise seeds.

        Returns:
            ``(K, X, Y, Z)`` float32, one reconstruction per start of the method.
        """
        from monai.inferers import sliding_window_inference

        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 3:
            raise VolumeContentError(
                f"{name}: expected a 3D model-grid array, got shape {image.shape}"
            )
        k = len(self.method.t_starts)  # type: ignore[arg-type]
        out = np.repeat(image[None], k, axis=0)
        if self.spatial_dims == 2:
            ids = [z for z in range(image.shape[2]) if region[:, :, z].any()]
            if not ids:
                return out
            # (N, 1, X, Y): the kept axial slices as a batch
            inputs = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image[:, :, ids], 2, 0)))[
                :, None
            ]
        else:
            ids = [0]
            inputs = torch.from_numpy(image)[None, None]
        inputs = inputs.to(self.device)
        roi = self.input_shape
        spatial = tuple(inputs.shape[2:])

        def predictor(windows: torch.Tensor, where: Sequence[Sequence[slice]]) -> torch.Tensor:
            seeds = [
                stable_seed(
                    self.seed, name, ids[w[0].start], tuple(int(s.start or 0) for s in w[2:])
                )
                for w in where
            ]
            return reconstruct(
                self._model_fn,
                self.schedule,
                windows,
                self.method,
                seeds=seeds,
                noise_spec=self.noise_spec,
                prediction_type=self.prediction_type,
                batch_size=self.batch_size,
            )

        windows = int(
            np.prod(
                [_windows_per_axis(n, r, self.method.window_overlap) for n, r in zip(spatial, roi)]
            )
        )
        total = windows * len(ids) * self.nfe_per_input
        if self.progress and total > 1:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, desc=f"denoising {name}", unit="img", leave=False, disable=None
            )
        try:
            recon = sliding_window_inference(
                inputs,
                roi_size=roi,
                sw_batch_size=self.batch_size,
                predictor=predictor,
                overlap=self.method.window_overlap,
                mode="gaussian",
                with_coord=True,
            )
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        recon = recon.float().cpu().numpy()  # (N, K, *spatial)
        if self.spatial_dims == 2:
            out[:, :, :, ids] = np.moveaxis(recon, 0, -1)  # (K, X, Y, N)
        else:
            out = recon[0]
        return out.astype(np.float32, copy=False)

    # ---- scoring -------------------------------------------------------------------------

    def score_grid(self, image: np.ndarray, mask: np.ndarray, name: str) -> GridScore:
        """Reconstruct and score a scan already on the model grid.

        Args:
            image: x, ``(X, Y, Z)`` in [0, 1].
            mask: the brain (or foreground) mask before erosion, ``(X, Y, Z)``.
            name: the scan's name (noise seeds, messages).

        Returns:
            The :class:`GridScore`.

        Raises:
            VolumeContentError: the mask is empty, or empty after erosion.
        """
        region = np.asarray(mask) > 0
        if not region.any():
            raise VolumeContentError(
                f"{name}: the brain/foreground mask is empty on the model grid"
            )
        before = self._evaluations
        recons = self.reconstruct_grid(image, region, name)
        amap, scored = anomaly_map(image, recons, region, self.postprocess)
        if not scored.any():
            raise VolumeContentError(
                f"{name}: nothing left of the mask after eroding {self.postprocess.erode} voxels; "
                "use a smaller erosion (--erode)"
            )
        seg = None
        if self.thresholds is not None:
            seg = segment(
                amap, scored, self.thresholds.voxel_threshold, self.postprocess.min_component
            )
        return GridScore(
            image=np.asarray(image, dtype=np.float32),
            reconstruction=recons.mean(axis=0),
            anomaly_map=amap,
            mask=scored,
            segmentation=seg,
            score=top_fraction_mean(amap[scored], self.postprocess.top_fraction),
            network_evaluations=self._evaluations - before,
        )

    def score(
        self, volume: Volume, *, mask: Volume | None = None, name: str | None = None
    ) -> AnomalyResult:
        """Score one scan; outputs on its own grid.

        Args:
            volume: the scan (any orientation and spacing).
            mask: a brain mask on the scan's grid (default: the preprocessed foreground).
            name: the scan's name (default: its file name without suffix).

        Returns:
            The :class:`AnomalyResult`.

        Raises:
            VolumeContentError: empty foreground/mask, a mask on another grid, ...
        """
        start = time.perf_counter()
        if name is None:
            source = volume.meta.get("source")
            name = strip_volume_suffix(Path(source).name) if source else "scan"
        pre = preprocess(volume, self.preprocessing, mask=mask)
        region = pre.mask > 0 if pre.mask is not None else pre.foreground
        grid = self.score_grid(pre.image, region, name)

        # the native brain: the mask if given, else the foreground; linear resampling must
        # not smear the map into the background
        native = np.asarray(volume.array)
        brain = (
            np.asarray(mask.array) > 0
            if mask is not None
            else native > self.preprocessing.foreground_threshold
        )
        amap = to_native(grid.anomaly_map, pre)
        amap[~(np.isfinite(amap) & brain)] = 0.0
        # the reconstruction in native units where the model saw tissue; the input elsewhere
        recon = intensity_to_native(to_native(grid.reconstruction, pre), pre)
        seen = to_native(np.ones_like(grid.reconstruction), pre) > 0.5
        seen &= native > self.preprocessing.foreground_threshold
        recon = np.where(seen, recon, native.astype(np.float32)).astype(np.float32)
        seg = flagged = over = None
        if grid.segmentation is not None and self.thresholds is not None:
            seg = to_native(
                grid.segmentation.astype(np.uint8), pre, interpolation="nearest"
            ).astype(np.uint8)
            seg[~brain] = 0
            over = int(np.count_nonzero(seg))
            flagged = bool(grid.score > self.thresholds.scan_threshold)
        return AnomalyResult(
            name=name,
            anomaly_map=amap.astype(np.float32),
            reconstruction=recon,
            segmentation=seg,
            score=grid.score,
            flagged=flagged,
            voxels_over_threshold=over,
            nfe_per_input=self.nfe_per_input,
            network_evaluations=grid.network_evaluations,
            seconds=time.perf_counter() - start,
            reference=volume,
            grid=grid,
            preprocessed=pre,
        )

    def score_file(
        self,
        image: str | os.PathLike,
        *,
        mask: str | os.PathLike | None = None,
        name: str | None = None,
    ) -> AnomalyResult:
        """Load and score one file (``mask``: an optional brain mask file on its grid)."""
        volume = load_volume(image)
        mask_volume = load_volume(mask) if mask is not None else None
        return self.score(
            volume, mask=mask_volume, name=name or strip_volume_suffix(Path(image).name)
        )


def _calibration_scan(detector: AnomalyDetector, task: tuple[int, Any]) -> tuple[str, np.ndarray, float]:
    """One healthy scan's name, voxel scores inside its scored mask and scan score."""
    i, item = task
    if isinstance(item, Volume):
        result = detector.score(item, name=f"scan{i}")
    elif hasattr(item, "image"):
        result = detector.score_file(item.image, mask=getattr(item, "mask", None))
    else:
        result = detector.score_file(item)
    return result.name, result.grid.anomaly_map[result.grid.mask], result.score


def calibrate(
    detector: AnomalyDetector,
    healthy: Sequence[Any],
    *,
    fpr: float = 0.05,
    workers: int = 1,
) -> Thresholds:
    """Thresholds at a target false-positive rate from healthy scans.

    Args:
        detector: the detector (checkpoint, method, post-processing) to calibrate.
        healthy: healthy scans: :class:`~medidiff.data.datasets.DatalistEntry` (its ``mask`` is
            used as brain mask), file paths, or :class:`~medidiff.io.volume.Volume` objects.
        fpr: target false-positive rate in (0, 1), e.g. 0.05.
        workers: score the scans in this many processes (:func:`medidiff.runtime.parallel.map_scans`;
            the thresholds do not depend on it).

    Returns:
        The :class:`Thresholds` (also usable right away with ``detector.use_thresholds``).
    """
    from medidiff.runtime.parallel import map_scans

    if not healthy:
        raise ConfigError("calibration needs at least one healthy scan")
    saved = detector.thresholds
    detector.thresholds = None
    voxels, scores = [], {}
    try:
        tasks = list(enumerate(healthy))
        for i, (name, values, score) in enumerate(
            map_scans(_calibration_scan, detector, tasks, workers=workers)
        ):
            voxels.append(values)
            scores[name if name not in scores else f"{name}#{i}"] = score
    finally:
        detector.thresholds = saved
    return Thresholds.from_healthy(detector, voxels, scores, fpr)
