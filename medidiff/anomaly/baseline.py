"""A no-network anomaly baseline: intensity outliers after the model's own normalisation.

Whatever a diffusion method gains over this baseline is what the model learnt about healthy
anatomy; without it, a good-looking AUPRC on bright lesions says little (tumours and MS
lesions are often brighter than healthy tissue, so raw intensity already finds them).

The baseline's "reconstruction" is one number for every voxel,

    x_hat = level = median of the model-grid intensities (in [0, 1], after the checkpoint's
                    own preprocessing) of the brain voxels of healthy scans,

so the residual is ``|x - level|`` (or its square): a global intensity-outlier score.
Everything else is the detector's, unchanged: the same preprocessing (RAS, spacing,
crop/pad, percentile scaling to [0, 1]), the same post-processing
(:mod:`medidiff.anomaly.postprocess`: brain mask, 9^3 median filter, eroded mask, top-1 % scan
score), the same calibration (:func:`medidiff.anomaly.runner.calibrate` at a target FPR on
healthy scans) and the same outputs on the input's own grid. :class:`IntensityBaseline` is
an :class:`~medidiff.anomaly.detector.AnomalyDetector` whose reconstructor is a
:class:`ConstantReconstructor`: it never runs a network (it does not even build one), and
``nfe_per_input`` is 0.

The checkpoint is needed only for its preprocessing (so the baseline sees exactly the grid
and intensity scale the model sees) and its SHA-256 (thresholds are tied to it, as for
the detector; the baseline's thresholds record ``method = "intensity-baseline"`` and its
level, so they are never mistaken for a diffusion method's).

Example:
    >>> from medidiff.anomaly.runner import calibrate  # doctest: +SKIP
    >>> from medidiff.anomaly.baseline import IntensityBaseline  # doctest: +SKIP
    >>> base = IntensityBaseline.from_healthy("model.safetensors", healthy)  # doctest: +SKIP
    >>> thresholds = calibrate(base, healthy, fpr=0.05)  # doctest: +SKIP
    >>> base.score_file("scan.nii.gz", thresholds=thresholds).score  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medidiff.anomaly.detector import AnomalyDetector, checkpoint_records, inference_checkpoint
from medidiff.anomaly.postprocess import PostprocessConfig
from medidiff.anomaly.reconstructor import ProgressFn
from medidiff.anomaly.results import Reconstruction
from medidiff.data.transforms import Preprocessing, preprocess
from medidiff.errors import ConfigError, DataError
from medidiff.io.volume import Volume, load_volume

__all__ = [
    "BASELINE_NAME",
    "BaselineMethod",
    "ConstantReconstructor",
    "IntensityBaseline",
    "healthy_level",
]

#: the ``method`` name recorded in thresholds, configs and reports
BASELINE_NAME = "intensity-baseline"


@dataclass(frozen=True)
class BaselineMethod:
    """The baseline's "method": a constant reconstruction.

    Attributes:
        level: x_hat for every voxel, on the model's intensity scale (usually in [0, 1]).
    """

    level: float

    @property
    def t_starts(self) -> tuple[int, ...]:
        """One "reconstruction" per scan (the detector's ensemble axis has length 1)."""
        return (0,)

    def to_dict(self) -> dict[str, Any]:
        """JSON form, recorded in thresholds and reports."""
        return {
            "method": BASELINE_NAME,
            "level": float(self.level),
            "reconstruction": "x_hat = level everywhere (median healthy brain intensity, "
            "model grid); no network",
        }


def _image_and_mask(item: Any) -> tuple[Volume, Volume | None]:
    """A healthy scan given as a DatalistEntry (its mask is used), a path or a Volume."""
    if isinstance(item, Volume):
        return item, None
    if hasattr(item, "image"):
        mask = getattr(item, "mask", None)
        return load_volume(item.image), (load_volume(mask) if mask is not None else None)
    return load_volume(item), None


def healthy_level(healthy: Sequence[Any], preprocessing: Preprocessing) -> float:
    """The median model-grid intensity of the brain voxels of healthy scans.

    Args:
        healthy: :class:`~medidiff.data.datasets.DatalistEntry` items (their ``mask`` is the brain
            mask), file paths or :class:`~medidiff.io.volume.Volume` objects (brain = the
            preprocessed foreground).
        preprocessing: the checkpoint's preprocessing (grid and intensity scaling).

    Returns:
        The median of all brain voxels pooled over the scans, on the model's scale.

    Raises:
        DataError: no scans, or no brain voxel in any of them.
    """
    if not healthy:
        raise DataError("the intensity baseline needs at least one healthy scan")
    values = []
    for item in healthy:
        volume, mask = _image_and_mask(item)
        pre = preprocess(volume, preprocessing, mask=mask)
        region = pre.mask > 0 if pre.mask is not None else pre.foreground
        values.append(np.asarray(pre.image, dtype=np.float32)[region])
    pooled = np.concatenate(values)
    if pooled.size == 0:
        raise DataError("the healthy scans have no brain/foreground voxel on the model grid")
    return float(np.median(pooled))


class ConstantReconstructor:
    """The baseline's reconstructor: x_hat = ``level`` everywhere, no network.

    Args:
        level: x_hat, on the model's intensity scale.
        input_shape: the model's input size (recorded, as a diffusion reconstructor's).
    """

    seed = 0
    nfe_per_input = 0
    model = None

    def __init__(self, level: float, input_shape: tuple[int, ...]) -> None:
        level = float(level)
        if not np.isfinite(level):
            raise ConfigError(f"the baseline level must be a finite number; got {level}")
        self.method = BaselineMethod(level)
        self.input_shape = input_shape

    def reconstruct(
        self, image: np.ndarray, region: np.ndarray, name: str, *, progress: ProgressFn | None = None
    ) -> Reconstruction:
        """x_hat = ``level`` everywhere: ``(1, X, Y, Z)`` float32, no network evaluation."""
        return Reconstruction(np.full((1, *np.shape(image)), self.method.level, np.float32), 0)


class IntensityBaseline(AnomalyDetector):
    """An :class:`~medidiff.anomaly.detector.AnomalyDetector` whose reconstruction is a constant.

    It scores, calibrates and writes exactly like the detector (same preprocessing,
    post-processing, thresholds, native-grid outputs) but never builds or runs a network:
    its reconstructor is a :class:`ConstantReconstructor`.

    Args:
        checkpoint: ``model.safetensors`` path, an
            :class:`~medidiff.models.checkpoint.InferenceCheckpoint`, a
            :class:`~medidiff.models.checkpoint.LoadedModel` or a detector: only its
            preprocessing and SHA-256 are used.
        level: x_hat, on the model's intensity scale (see :func:`healthy_level`).
        postprocess: scoring settings (default :class:`PostprocessConfig`, as the detector).

    Raises:
        ConfigError: a non-finite level.
        CheckpointError: the checkpoint cannot be read or has no usable preprocessing.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | Any,
        level: float,
        postprocess: PostprocessConfig | None = None,
    ) -> None:
        ckpt = inference_checkpoint(checkpoint)
        config, preprocessing = checkpoint_records(ckpt)
        shape = tuple(preprocessing.shape)
        input_shape = shape[:2] if int(config.model.spatial_dims) == 2 else shape
        super().__init__(
            ckpt, postprocess=postprocess, reconstructor=ConstantReconstructor(level, input_shape)
        )

    @property
    def level(self) -> float:
        """x_hat, the constant reconstruction on the model's intensity scale."""
        return float(self.method.level)

    @classmethod
    def from_healthy(
        cls,
        checkpoint: str | os.PathLike | Any,
        healthy: Sequence[Any],
        postprocess: PostprocessConfig | None = None,
    ) -> IntensityBaseline:
        """The baseline with ``level`` = the healthy scans' median brain intensity.

        Args:
            checkpoint: see the class.
            healthy: healthy scans (see :func:`healthy_level`); use the calibration scans.
            postprocess: scoring settings.

        Returns:
            The baseline (not yet calibrated: pass it to :func:`medidiff.anomaly.runner.calibrate`).
        """
        ckpt = inference_checkpoint(checkpoint)
        level = healthy_level(healthy, checkpoint_records(ckpt)[1])
        return cls(ckpt, level, postprocess)
