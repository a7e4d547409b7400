"""From reconstructions to anomaly maps, segmentations, scan scores and thresholds.

The post-processing of the Behrendt et al. protocol ("Patched Diffusion Models for
Unsupervised Anomaly Detection in Brain MRI", MIDL 2023, and their benchmark code), step by
step, each step configurable in :class:`PostprocessConfig`:

1. residual ``r = |x - x_hat|`` (L1, default), ``(x - x_hat)^2`` (AnoDDPM's squared
   error), a structure-aware residual (local SSIM, gradient, L1 x SSIM) averaged over the
   reconstructions of an ensemble, or the Mahalanobis distance to several reconstructions
   (:mod:`medidiff.anomaly.residuals`);
2. the residual is set to 0 outside the brain (the provided brain mask, else the
   preprocessed foreground), so that the background cannot bleed into the brain in
   step 3;
3. a 3D median filter (9^3 voxels by default, at model resolution);
4. the map is set to 0 outside the *eroded* mask (2 voxels by default), dropping the rim
   artefacts every reconstruction method leaves at the brain's edge;
5. segmentation: ``map > voxel_threshold`` inside the eroded mask, then (optionally)
   connected components smaller than ``min_component`` voxels are removed;
6. scan score: the mean of the top 1 % of voxel scores inside the eroded mask.

Everything here works on numpy arrays on the model grid (``(X, Y, Z)``); the detector
resamples the results to the input's own grid afterwards.

Thresholds come from healthy scans only (:func:`threshold_at_fpr`): choosing them on
labelled anomalies gives optimistic Dice (see DOMAIN notes; Bercea et al. use 5 % FPR).

Example:
    >>> import numpy as np
    >>> threshold_at_fpr(np.arange(1, 101, dtype=np.float32), 0.05)
    95.0
    >>> top_fraction_mean(np.arange(1, 201, dtype=np.float32), 0.01)
    199.5
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from medidiff.anomaly.residuals import RESIDUALS, residual
from medidiff.errors import ConfigError

__all__ = [
    "RESIDUALS",
    "PostprocessConfig",
    "anomaly_map",
    "median_filter",
    "remove_small_components",
    "residual_map",
    "scoring_mask",
    "segment",
    "threshold_at_fpr",
    "postprocess_for",
    "top_fraction_mean",
    "tuned_postprocess",
]



@dataclass(frozen=True)
class PostprocessConfig:
    """How residuals become anomaly maps, segmentations and scan scores.

    Attributes:
        residual: ``"l1"`` (default; ``|x - x_hat|``, Behrendt et al.), ``"l2"``
            (``(x - x_hat)^2``, AnoDDPM's squared error), ``"ssim"``, ``"gradient"``,
            ``"l1ssim"`` (structure-aware) or ``"mahalanobis"`` (several
            reconstructions); see :mod:`medidiff.anomaly.residuals`.
        erode: erode the brain/foreground mask by this many voxels of the model grid
            (default 2, i.e. 4-5 mm on the shipped 2-2.5 mm grids) before scoring, to drop
            rim artefacts; 0 disables.
        median_size: edge of the cubic 3D median filter in model-grid voxels (default 9,
            i.e. 22.5 mm on the 2.5 mm grid of ``brain_mri_2d``: tuned on sample_data, where
            9 beat the Behrendt protocol's 5^3 on voxel AUROC (0.907 vs 0.82) but erases
            lesions a few voxels wide (the MS-like ones); a model can carry its own size,
            :func:`tuned_postprocess`: 11 for the 2 mm default ``brain_mri_2d_2mm``); 0 or 1
            disables.
        min_component: remove connected components (26-connected) of the segmentation
            with fewer voxels than this (model grid); 0 (default) keeps all.
        top_fraction: the per-scan score is the mean of this top fraction of voxel scores
            inside the mask (default 0.01, the top 1 %).
    """

    residual: str = "l1"
    erode: int = 2
    median_size: int = 9
    min_component: int = 0
    top_fraction: float = 0.01

    def __post_init__(self) -> None:
        if self.residual not in RESIDUALS:
            raise ConfigError(
                f"residual must be one of {', '.join(RESIDUALS)}; got {self.residual!r}"
            )
        for name in ("erode", "median_size", "min_component"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0; got {value!r}")
            object.__setattr__(self, name, int(value))
        frac = self.top_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
            raise ConfigError(f"top_fraction must be a number in (0, 1]; got {frac!r}")
        object.__setattr__(self, "top_fraction", float(frac))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings (round-trips through :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> PostprocessConfig:
        """Build from a dict, refusing unknown keys.

        Raises:
            ConfigError: unknown key or bad value, naming it.
        """
        raw = dict(raw or {})
        known = [f.name for f in fields(cls)]
        for key in raw:
            if key not in known:
                raise ConfigError(f"postprocess.{key} is unknown; known keys: {', '.join(known)}")
        return cls(**raw)


#: the ``extra`` key of a checkpoint holding the post-processing tuned for that model
#: (e.g. ``{"median_size": 11}`` for a 2 mm model), used wherever none is given
TUNED_POSTPROCESS_KEY = "anomaly_postprocess"


def tuned_postprocess(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """The post-processing settings a checkpoint recommends (``extra["anomaly_postprocess"]``,
    written when the model was exported after tuning on validation scans); ``{}`` when none.

    Only the filter sizes are taken (``erode``, ``median_size``): the residual follows the
    method, the component rule the thresholds.

    Raises:
        ConfigError: the record is not a mapping or holds an unknown key or bad value.
    """
    raw = (extra or {}).get(TUNED_POSTPROCESS_KEY)
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"checkpoint extra {TUNED_POSTPROCESS_KEY!r} must be a mapping; got {raw!r}")
    allowed = ("erode", "median_size")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(
            f"checkpoint extra {TUNED_POSTPROCESS_KEY!r} has unknown keys {', '.join(unknown)}; "
            f"known: {', '.join(allowed)}"
        )
    PostprocessConfig(**raw)  # validates the values
    return dict(raw)


def postprocess_for(extra: Mapping[str, Any] | None, method: str | None, **given: Any) -> PostprocessConfig:
    """The post-processing of ``method`` on a checkpoint with ``extra``: the settings
    ``given`` (``None`` = not given), else the filter sizes tuned for the model
    (:func:`tuned_postprocess`), else the method's residual and the class defaults.

    Raises:
        ConfigError: a bad setting or tuned record.
    """
    from medidiff.constants import DEFAULT_RESIDUALS

    chosen = {k: v for k, v in given.items() if v is not None}
    chosen.setdefault("residual", DEFAULT_RESIDUALS.get(method, "l1"))
    return PostprocessConfig(**{**tuned_postprocess(extra), **chosen})


def residual_map(
    image: np.ndarray,
    reconstructions: np.ndarray,
    kind: str = "l1",
    region: np.ndarray | None = None,
) -> np.ndarray:
    """The voxel-wise residual between a scan and its reconstruction(s).

    Args:
        image: x, ``(X, Y, Z)`` on the model grid.
        reconstructions: x_hat, ``(X, Y, Z)`` or ``(K, X, Y, Z)`` for K reconstructions
            (an ensemble's residuals are averaged, cDDPM, Behrendt et al. 2025;
            ``mahalanobis`` uses their spread).
        kind: one of :data:`~medidiff.anomaly.residuals.RESIDUALS`.
        region: the brain mask, where normalising statistics are taken (optional).

    Returns:
        ``(X, Y, Z)`` float32.
    """
    return residual(kind, image, reconstructions, region)


def scoring_mask(mask: np.ndarray, erode: int) -> np.ndarray:
    """The region scored: ``mask`` eroded by ``erode`` voxels (6-connected steps).

    Voxels of the array border count as outside, so a brain cut by the grid's edge is
    eroded there too.

    Args:
        mask: ``(X, Y, Z)`` brain or foreground mask (non-zero = inside).
        erode: erosion iterations (0: the mask as is).

    Returns:
        ``(X, Y, Z)`` bool.
    """
    from scipy import ndimage

    mask = np.asarray(mask) > 0
    if erode <= 0 or not mask.any():
        return mask
    return ndimage.binary_erosion(mask, iterations=int(erode), border_value=0)


def median_filter(values: np.ndarray, size: int, region: np.ndarray | None = None) -> np.ndarray:
    """A cubic median filter of edge ``size`` (``scipy.ndimage.median_filter``; 0/1: identity).

    With ``region``, only its bounding box widened by the filter's reach (clipped to the
    array) is filtered, and the result is exact inside ``region``: every window centred
    there lies in that box, and where the box meets the array's edge scipy reflects the same
    voxels as on the whole array. Outside the box the input is returned unchanged. On the
    default grid the brain's box is about 60 % of the volume, and this filter is the most
    expensive step after the network.

    Args:
        values: ``(X, Y, Z)`` (or 2D) array.
        size: filter edge in voxels.
        region: optional bool array of ``values``' shape: where the result is needed.

    Returns:
        The filtered array, float32 (edges: "reflect", scipy's default).
    """
    from scipy import ndimage

    values = np.asarray(values, dtype=np.float32)
    if size <= 1:
        return values
    size = int(size)
    if region is None:
        return ndimage.median_filter(values, size=size).astype(np.float32)
    region = np.asarray(region, dtype=bool)
    if region.shape != values.shape:
        raise ValueError(f"region shape {region.shape} != values shape {values.shape}")
    out = values.copy()
    if not region.any():
        return out
    # a window of edge `size` reaches size // 2 voxels before its centre and
    # (size - 1) // 2 after it (scipy's origin 0)
    before, after = size // 2, (size - 1) // 2
    box = []
    for axis, n in enumerate(values.shape):
        hit = np.flatnonzero(region.any(axis=tuple(a for a in range(values.ndim) if a != axis)))
        box.append(slice(max(0, int(hit[0]) - before), min(n, int(hit[-1]) + after + 1)))
    box_t = tuple(box)
    out[box_t] = ndimage.median_filter(values[box_t], size=size)
    return out


def anomaly_map(
    image: np.ndarray,
    reconstructions: np.ndarray,
    mask: np.ndarray,
    config: PostprocessConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-4: residual, masked, median filtered, restricted to the eroded mask.

    Args:
        image: x on the model grid, ``(X, Y, Z)``.
        reconstructions: x_hat, ``(X, Y, Z)`` or ``(K, X, Y, Z)``.
        mask: the brain (or foreground) mask before erosion, ``(X, Y, Z)``.
        config: the settings.

    Returns:
        ``(anomaly_map, scored_mask)``: the float32 map (0 outside ``scored_mask``) and
        the eroded bool mask it is defined on.
    """
    inside = np.asarray(mask) > 0
    values = residual_map(image, reconstructions, config.residual, inside)
    values[~inside] = 0.0
    scored = scoring_mask(inside, config.erode)
    filtered = median_filter(values, config.median_size, region=scored)
    filtered[~scored] = 0.0
    return filtered, scored


def remove_small_components(segmentation: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 26-connected components with fewer than ``min_size`` voxels.

    Args:
        segmentation: ``(X, Y, Z)`` bool.
        min_size: minimum component size in voxels (<= 1 keeps everything).

    Returns:
        ``(X, Y, Z)`` bool.
    """
    from scipy import ndimage

    segmentation = np.asarray(segmentation, dtype=bool)
    if min_size <= 1 or not segmentation.any():
        return segmentation
    labels, n = ndimage.label(segmentation, structure=np.ones((3,) * segmentation.ndim, dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def segment(
    values: np.ndarray, mask: np.ndarray, threshold: float, min_component: int = 0
) -> np.ndarray:
    """Step 5: ``values > threshold`` inside ``mask``, small components removed.

    Args:
        values: the anomaly map, ``(X, Y, Z)``.
        mask: where the map is defined (the eroded mask), ``(X, Y, Z)``.
        threshold: the voxel threshold (strictly greater is anomalous).
        min_component: see :func:`remove_small_components`.

    Returns:
        ``(X, Y, Z)`` bool.
    """
    seg = (np.asarray(values) > threshold) & (np.asarray(mask) > 0)
    return remove_small_components(seg, min_component)


def top_fraction_mean(values: np.ndarray, fraction: float = 0.01) -> float:
    """Step 6: the mean of the largest ``ceil(fraction * n)`` values (at least one).

    Args:
        values: the voxel scores inside the mask, any shape (flattened).
        fraction: in (0, 1].

    Returns:
        The score; NaN for an empty array.
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size == 0:
        return float("nan")
    k = max(1, math.ceil(fraction * flat.size - 1e-9))
    top = np.partition(flat, flat.size - k)[flat.size - k :]
    return float(top.mean())


def threshold_at_fpr(values: np.ndarray, fpr: float) -> float:
    """The threshold that flags at most ``fpr`` of healthy values (``value > threshold``).

    The ``(1 - fpr)`` quantile by the inverse of the empirical CDF (numpy's
    ``method="inverted_cdf"``): the ``ceil((1 - fpr) n)``-th smallest value. With
    ``n`` healthy values, the fraction strictly above it is at most ``fpr`` (exactly
    ``fpr`` when ``fpr n`` is an integer and the values are distinct). With fewer than
    ``1 / fpr`` values this is the maximum: nothing healthy is flagged.

    Args:
        values: healthy scores (voxels or scans), any shape.
        fpr: target false-positive rate in (0, 1).

    Returns:
        The threshold.

    Raises:
        ConfigError: ``fpr`` outside (0, 1) or no values.
    """
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0 < fpr < 1:
        raise ConfigError(f"fpr must be a number in (0, 1), e.g. 0.05; got {fpr!r}")
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size == 0:
        raise ConfigError("no healthy values to calibrate a threshold on (empty masks?)")
    return float(np.quantile(flat, 1.0 - fpr, method="inverted_cdf"))
