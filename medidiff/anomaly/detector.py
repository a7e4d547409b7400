"""Anomaly detection by partial diffusion: the detector.

An :class:`AnomalyDetector` is built from a checkpoint (a model trained on healthy scans)
and a method (:class:`~medidiff.anomaly.methods.MethodConfig`: ``anoddpm``, ``ddim``,
``x0``, ``patched``, ``ensemble``) plus post-processing
(:class:`~medidiff.anomaly.postprocess.PostprocessConfig`). For each scan it

1. brings the scan onto the model grid with the checkpoint's own preprocessing
   (:func:`medidiff.data.transforms.preprocess`: RAS, spacing, crop/pad, intensity to [0, 1]);
2. reconstructs it with its reconstructor
   (:class:`~medidiff.anomaly.reconstructor.DiffusionReconstructor`: a 2D model gets the
   axial slices that contain brain, a 3D model the volume or sliding windows; the
   intensity baseline's :class:`~medidiff.anomaly.baseline.ConstantReconstructor` runs no
   network);
3. scores the residual on the model grid (:mod:`medidiff.anomaly.postprocess`: L1 residual, brain
   mask, 9^3 median filter, eroded mask, top-1 % scan score, and with thresholds a
   segmentation);
4. takes the map, the reconstruction (in the input's intensity units) and the
   segmentation back to the input's own grid (:func:`medidiff.data.transforms.to_native`), so
   they overlay the input exactly, whatever its orientation.

Noise is seeded per network input from ``(seed, scan name, slice index or window
position)`` (:mod:`medidiff.anomaly.seeds`), so the same seed gives the same map whatever
the batch size, the order of the scans, or the rank that processes them.

The detector holds no state that changes while it scores: thresholds
(:class:`~medidiff.anomaly.thresholds.Thresholds`, from
:func:`medidiff.anomaly.runner.calibrate`) are an argument of :meth:`AnomalyDetector.score`,
checked against the detector's checkpoint and config; every result carries the number of
network evaluations it took; progress bars belong to the caller (the runner).

Example:
    >>> from medidiff.anomaly.detector import AnomalyDetector, MethodConfig  # doctest: +SKIP
    >>> det = AnomalyDetector("runs/brain_mri_2d/model.safetensors",
    ...                       MethodConfig("ddim", steps=10))      # doctest: +SKIP
    >>> result = det.score_file("sample_data/test/images/tumor-000.nii.gz",
    ...                         thresholds=thresholds)               # doctest: +SKIP
    >>> result.anomaly_map.shape, result.score                        # doctest: +SKIP
    ((96, 112, 96), 0.31...)
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

import medidiff
from medidiff.anomaly.methods import METHODS, MethodConfig
from medidiff.anomaly.postprocess import (
    PostprocessConfig,
    anomaly_map,
    postprocess_for,
    segment,
    top_fraction_mean,
)
from medidiff.anomaly.reconstructor import DiffusionReconstructor, LatentReconstructor, ProgressFn, Reconstructor
from medidiff.anomaly.results import AnomalyResult, GridScore, scan_output_paths
from medidiff.anomaly.thresholds import Thresholds
from medidiff.data.transforms import (
    Preprocessed,
    Preprocessing,
    intensity_to_native,
    preprocess,
    to_native,
)
from medidiff.data.profile import InputCheck, InputProfile, check_scan
from medidiff.errors import ConfigError, InputProfileError, VolumeContentError
from medidiff.io.volume import Volume, load_volume, scan_name

#: what ``input_check`` may be: report out-of-profile scans, or refuse them
INPUT_CHECKS = ("warn", "strict")

__all__ = [
    "INPUT_CHECKS",
    "METHODS",
    "AnomalyDetector",
    "AnomalyResult",
    "GridScore",
    "MethodConfig",
    "PostprocessConfig",
    "Thresholds",
    "checkpoint_records",
    "diffusion_reconstructor",
    "inference_checkpoint",
    "scan_output_paths",
]


# --------------------------------------------------------------------------------------------
# from a checkpoint
# --------------------------------------------------------------------------------------------


def checkpoint_records(checkpoint: Any) -> tuple[Any, Preprocessing]:
    """The typed training config and preprocessing stored in an inference checkpoint
    (:func:`medidiff.models.loaded.checkpoint_records`).

    Raises:
        CheckpointError: either record is invalid (named with the file).
    """
    from medidiff.models.loaded import checkpoint_records as records

    return records(checkpoint)


def inference_checkpoint(checkpoint: Any) -> Any:
    """The :class:`~medidiff.models.checkpoint.InferenceCheckpoint` of a path, a loaded model, a
    detector, or a checkpoint itself."""
    from medidiff.models.checkpoint import InferenceCheckpoint, load_inference

    if isinstance(checkpoint, InferenceCheckpoint):
        return checkpoint
    inner = getattr(checkpoint, "checkpoint", None)  # LoadedModel, AnomalyDetector
    if isinstance(inner, InferenceCheckpoint):
        return inner
    if isinstance(checkpoint, (str, os.PathLike)):
        return load_inference(checkpoint)
    raise ConfigError(
        f"checkpoint must be a model.safetensors path, a loaded checkpoint or a detector; "
        f"got {type(checkpoint).__name__}"
    )


def diffusion_reconstructor(
    checkpoint: str | os.PathLike | Any,
    method: MethodConfig | None,
    *,
    device: torch.device,
    batch_size: int,
    seed: int,
) -> tuple[Any, DiffusionReconstructor]:
    """The checkpoint's network, schedule and noise as a reconstructor for ``method``.

    Args:
        checkpoint: ``model.safetensors`` path, or a :class:`~medidiff.models.checkpoint.LoadedModel`.
        method: the method (default ``MethodConfig("ddim")``), resolved against the
            checkpoint (noise, T, input size).
        device, batch_size, seed: see :class:`AnomalyDetector`.

    Returns:
        The :class:`~medidiff.models.checkpoint.InferenceCheckpoint` and the reconstructor.
    """
    from medidiff.diffusion.noise import NoiseSpec
    from medidiff.models.loaded import LoadedModel, load_model
    from medidiff.models.unet import prepare_for_inference

    loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load_model(checkpoint, device)
    model = prepare_for_inference(loaded.model, device)
    spatial_dims, input_shape = loaded.spatial_dims, loaded.input_shape
    d = loaded.config.diffusion
    schedule = loaded.schedule.to(device)
    if loaded.conditioning.mask_conditional:
        raise ConfigError(
            f"{loaded.provenance.path} is a mask-conditioned model (conditioning.mask: "
            f"{loaded.conditioning.mask}): it needs a label map for every input, which anomaly "
            "scoring has not; score with a model trained on healthy scans without masks"
        )
    method = method or MethodConfig("latent" if loaded.is_latent else "ddim")
    if method.method == "latent" and not loaded.is_latent:
        raise ConfigError(
            f"method 'latent' needs a latent model (stage: latent); {loaded.provenance.path} is a "
            "pixel-space model: use ddim, anoddpm, x0, patched, ensemble, multi or thor"
        )
    if loaded.is_latent:
        if method.method == "patched":
            raise ConfigError("method 'patched' works on images; a latent model takes latent, ddim, x0, "
                              "anoddpm, ensemble, multi or thor (all run in latent space)")
        method = replace(method, clip=False)  # latents are not on [0, 1]; the decoded image is clipped
    method = method.resolve(
        num_train_timesteps=d.num_train_timesteps, noise=d.noise, input_shape=input_shape,
        prediction_type=d.prediction_type,
    )
    noise_spec = NoiseSpec.from_config(d, kind=method.noise)
    common = dict(
        prediction_type=d.prediction_type, spatial_dims=spatial_dims, input_shape=input_shape,
        null_label=loaded.conditioning.null_label, device=device, batch_size=batch_size, seed=seed,
    )
    if loaded.is_latent:
        clip = (0.0, 1.0) if loaded.preprocessing.clip else None
        return loaded.checkpoint, LatentReconstructor(
            model, schedule, method, noise_spec, codec=loaded.autoencoder, image_clip=clip, **common
        )
    return loaded.checkpoint, DiffusionReconstructor(model, schedule, method, noise_spec, **common)


# --------------------------------------------------------------------------------------------
# the detector
# --------------------------------------------------------------------------------------------


class AnomalyDetector:
    """Scores scans for anomalies with a diffusion model trained on healthy data.

    Args:
        checkpoint: ``model.safetensors`` path, or a :class:`~medidiff.models.checkpoint.LoadedModel`
            (with ``reconstructor``: also an
            :class:`~medidiff.models.checkpoint.InferenceCheckpoint` or a detector; only its
            preprocessing and SHA-256 are used).
        method: the reconstruction method (default ``MethodConfig("ddim")``); resolved
            against the checkpoint (noise, T, input size), see :attr:`method`.
        postprocess: scoring settings (default :class:`PostprocessConfig`).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a ``torch.device``.
        batch_size: network inputs (slices, windows, patches) per network call.
        seed: the noise seed; with ``(scan name, slice/window)`` it seeds every input.
        reconstructor: another :class:`~medidiff.anomaly.reconstructor.Reconstructor`
            (e.g. the intensity baseline's) instead of the checkpoint's network; then
            ``method``, ``device``, ``batch_size`` and ``seed`` are not used.
        input_check: ``"warn"`` (default): every scan is compared with the checkpoint's
            input profile (:mod:`medidiff.data.profile`) and the finding goes into the
            result (``AnomalyResult.input_check``); ``"strict"``: a scan out of profile
            raises :class:`~medidiff.errors.InputProfileError` before it is reconstructed.
        volume_index: which volume of a 4D input file :meth:`score_file` scores (e.g. one
            echo or time point; ``None``: inputs must be 3D).

    Attributes:
        reconstructor: what makes the reconstructions.
        checkpoint: the :class:`~medidiff.models.checkpoint.InferenceCheckpoint`.
        postprocess: the :class:`PostprocessConfig`.
        preprocessing: the checkpoint's :class:`~medidiff.data.transforms.Preprocessing`.
        spatial_dims: 2 (slices) or 3 (volumes).
        input_profile: the checkpoint's :class:`~medidiff.data.profile.InputProfile`, or
            ``None`` (an older file: only the model grid is checked).
        input_check: ``"warn"`` or ``"strict"``.
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
        reconstructor: Reconstructor | None = None,
        input_check: str = "warn",
        volume_index: int | None = None,
    ) -> None:
        if input_check not in INPUT_CHECKS:
            raise ConfigError(f"input_check must be one of {', '.join(INPUT_CHECKS)}; got {input_check!r}")
        if volume_index is not None and (
            isinstance(volume_index, bool) or not isinstance(volume_index, int)
        ):
            raise ConfigError(f"volume_index must be an integer or None; got {volume_index!r}")
        self.volume_index = volume_index
        if reconstructor is None:
            from medidiff.runtime.distributed import resolve_device

            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ConfigError(f"batch_size must be an integer >= 1; got {batch_size!r}")
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ConfigError(f"seed must be an integer; got {seed!r}")
            dev = device if isinstance(device, torch.device) else resolve_device(device)
            checkpoint, reconstructor = diffusion_reconstructor(
                checkpoint, method, device=dev, batch_size=batch_size, seed=seed
            )
        elif method is not None:
            raise ConfigError("give a method or a reconstructor, not both")
        self.reconstructor = reconstructor
        self.checkpoint = inference_checkpoint(checkpoint)
        config, self.preprocessing = checkpoint_records(self.checkpoint)
        self.spatial_dims = int(config.model.spatial_dims)
        if postprocess is None:  # the method's residual, the sizes tuned for this model
            name = getattr(self.reconstructor.method, "method", None)
            postprocess = postprocess_for(self.checkpoint.extra, name)
        self.postprocess = postprocess
        self.input_profile = InputProfile.from_dict(self.checkpoint.extra.get("input_profile"))
        self.input_check = input_check

    # ---- what the reconstructor says -----------------------------------------------------

    @property
    def method(self) -> Any:
        """The resolved :class:`MethodConfig` (or the reconstructor's method record)."""
        return self.reconstructor.method

    @property
    def seed(self) -> int:
        """The noise seed."""
        return self.reconstructor.seed

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The spatial size the network was trained on (a slice, a volume or a patch);
        larger grids are processed in sliding windows of this size."""
        return self.reconstructor.input_shape

    @property
    def nfe_per_input(self) -> int:
        """Network evaluations per network input."""
        return self.reconstructor.nfe_per_input

    @property
    def model(self) -> Any:
        """The network (eval mode), ``None`` without one; set it to instrument calls."""
        return self.reconstructor.model

    @model.setter
    def model(self, model: Any) -> None:
        self.reconstructor.model = model

    @property
    def device(self) -> torch.device:
        """Where the network runs."""
        return getattr(self.reconstructor, "device", torch.device("cpu"))

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

    # ---- scoring -------------------------------------------------------------------------

    def score_grid(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        name: str,
        *,
        thresholds: Thresholds | None = None,
        progress: ProgressFn | None = None,
    ) -> GridScore:
        """Reconstruct and score a scan already on the model grid.

        Args:
            image: x, ``(X, Y, Z)`` in [0, 1].
            mask: the brain (or foreground) mask before erosion, ``(X, Y, Z)``.
            name: the scan's name (noise seeds, messages).
            thresholds: calibrated thresholds of this detector (checked): with them the
                result has a segmentation.
            progress: ``progress(done, total)`` over the scan's network inputs.

        Returns:
            The :class:`GridScore`.

        Raises:
            VolumeContentError: the mask is empty, or empty after erosion.
            CheckpointError, ConfigError: thresholds of another checkpoint or config.
        """
        if thresholds is not None:
            thresholds.check(self)
        region = np.asarray(mask) > 0
        if not region.any():
            raise VolumeContentError(
                f"{name}: the brain/foreground mask is empty on the model grid"
            )
        recons = self.reconstructor.reconstruct(image, region, name, progress=progress)
        amap, scored = anomaly_map(image, recons.images, region, self.postprocess)
        if not scored.any():
            raise VolumeContentError(
                f"{name}: nothing left of the mask after eroding {self.postprocess.erode} voxels; "
                "use a smaller erosion (--erode)"
            )
        seg = None
        if thresholds is not None:
            min_component = max(self.postprocess.min_component, thresholds.min_component)
            seg = segment(amap, scored, thresholds.voxel_threshold, min_component)
        return GridScore(
            image=np.asarray(image, dtype=np.float32),
            reconstruction=recons.images.mean(axis=0),
            anomaly_map=amap,
            mask=scored,
            segmentation=seg,
            score=top_fraction_mean(amap[scored], self.postprocess.top_fraction),
            network_evaluations=recons.network_evaluations,
        )

    def score(
        self,
        volume: Volume,
        *,
        mask: Volume | None = None,
        name: str | None = None,
        thresholds: Thresholds | None = None,
        progress: ProgressFn | None = None,
        input_check: InputCheck | None = None,
    ) -> AnomalyResult:
        """Score one scan; outputs on its own grid.

        Args:
            volume: the scan (any orientation and spacing).
            mask: a brain mask on the scan's grid (default: the preprocessed foreground).
            name: the scan's name (default: its file name without suffix).
            thresholds: calibrated thresholds of this detector (checked): with them the
                result has a segmentation and a flag.
            progress: ``progress(done, total)`` over the scan's network inputs.
            input_check: the scan's :meth:`check_input`, when the caller made it already
                (e.g. to report it before the reconstruction starts); else it is made here.

        Returns:
            The :class:`AnomalyResult`.

        Raises:
            VolumeContentError: empty foreground/mask, a mask on another grid, ...
            InputProfileError: with ``input_check="strict"``, a scan out of profile.
        """
        start = time.perf_counter()
        if name is None:
            source = volume.meta.get("source")
            name = scan_name(source) if source else "scan"
        # cropping is reported by the input check, not as a Python warning
        pre = preprocess(volume, self.preprocessing, mask=mask, warn_crop=False)
        check = input_check if input_check is not None else self.check_input(volume, name)
        region = pre.mask > 0 if pre.mask is not None else pre.foreground
        grid = self.score_grid(pre.image, region, name, thresholds=thresholds, progress=progress)
        amap, recon, seg = self._native(volume, mask, pre, grid)
        flagged = over = None
        if seg is not None and thresholds is not None:
            over = int(np.count_nonzero(seg))
            flagged = bool(grid.score > thresholds.scan_threshold)
        return AnomalyResult(
            name=name,
            anomaly_map=amap,
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
            input_check=check,
            voxel_threshold=None if thresholds is None else thresholds.voxel_threshold,
            scan_threshold=None if thresholds is None else thresholds.scan_threshold,
        )

    def check_input(self, volume: Volume, name: str | None = None) -> InputCheck:
        """Compare a scan with the checkpoint's input profile and grid
        (:func:`medidiff.data.profile.check_scan`).

        Raises:
            InputProfileError: with ``input_check="strict"``, a scan out of profile.
        """
        check = check_scan(volume, self.input_profile, self.preprocessing)
        if self.input_check == "strict" and not check.ok:
            label = volume.meta.get("source") or name or "scan"
            raise InputProfileError(
                f"{label}: refused, it does not look like the model's training scans (--strict): "
                + "; ".join(check.problems)
            )
        return check

    def _native(
        self, volume: Volume, mask: Volume | None, pre: Preprocessed, grid: GridScore
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The map, the reconstruction (input units) and the segmentation on the input's grid."""
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
        seg = None
        if grid.segmentation is not None:
            seg = to_native(
                grid.segmentation.astype(np.uint8), pre, interpolation="nearest"
            ).astype(np.uint8)
            seg[~brain] = 0
        return amap.astype(np.float32), recon, seg

    def score_file(
        self,
        image: str | os.PathLike,
        *,
        mask: str | os.PathLike | None = None,
        name: str | None = None,
        thresholds: Thresholds | None = None,
        progress: ProgressFn | None = None,
        on_check: Any = None,
    ) -> AnomalyResult:
        """Load and score one file (``mask``: an optional brain mask file on its grid; of a
        4D file, the volume :attr:`volume_index` is scored).

        ``on_check(image, check)`` is called with the scan's :meth:`check_input` before
        the reconstruction starts (the runner reports out-of-profile scans at once)."""
        volume = load_volume(image, volume_index=self.volume_index)
        mask_volume = load_volume(mask) if mask is not None else None
        name = name or scan_name(image)
        check = None
        if on_check is not None:
            check = self.check_input(volume, name)
            on_check(image, check)
        return self.score(volume, mask=mask_volume, name=name, thresholds=thresholds,
                          progress=progress, input_check=check)
