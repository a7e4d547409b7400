"""Calibration targets: from healthy anomaly maps to a voxel threshold a user can act on.

Two targets, both from healthy scans only (no lesion labels):

``voxel-fpr`` (the classic, Bercea et al.'s 5 %)
    the ``(1 - fpr)`` quantile of the pooled healthy voxel scores: about ``fpr`` of every
    healthy brain is flagged. At 5 % that is tens of ml per scan, many times a typical
    lesion, so the segmentation is mostly false positives even when the ranking is good.
``fp-volume``
    the lowest threshold at which a healthy scan's segmentation, after dropping connected
    components smaller than ``min_component`` voxels, holds at most ``max_fp_ml`` ml on
    average over the calibration scans: the false-positive *volume* a reader will tolerate.
    The segmentation volume falls monotonically as the threshold rises (a component kept at
    a higher threshold lies inside one kept at a lower threshold), so a bisection over the
    pooled healthy scores finds it.

Whatever the target, :func:`held_out_rates` estimates what a *new* healthy scan will see:
each calibration scan is left out in turn, the threshold recomputed on the others, and the
left-out scan's voxel FPR and false-positive volume measured; the spread says how much to
trust the nominal rate with this many scans. For the scan-level threshold the expected FPR
of a threshold at the k-th smallest of n healthy scores is ``(n + 1 - k) / (n + 1)``
exactly (order statistics of exchangeable scores), with a Beta(n + 1 - k, k) distribution
over calibration sets (:func:`scan_fpr_interval`).

Example:
    >>> scan_fpr_interval(num_scans=6, fpr=0.05)["expected"]  # the largest of 6: 1/7
    0.14285714285714285
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medidiff.anomaly.postprocess import remove_small_components, threshold_at_fpr
from medidiff.constants import CALIBRATION_DEFAULTS
from medidiff.errors import ConfigError

__all__ = [
    "CALIBRATION_TARGETS",
    "component_voxels",
    "default_calibration",
    "voxel_ml",
    "MIN_CALIBRATION_SCANS",
    "HealthyMap",
    "fp_volume_threshold",
    "held_out_rates",
    "scan_fpr_interval",
    "segmented_volume",
]

CALIBRATION_TARGETS = ("voxel-fpr", "fp-volume")

#: Fewer healthy scans than this are refused unless the caller allows it: with 3 scans a
#: 5 % voxel threshold reached 21 % FPR on a new healthy scan (sample_data, default model).
MIN_CALIBRATION_SCANS = 5


def voxel_ml(detector: Any) -> float:
    """The volume of one model-grid voxel of ``detector``, in ml."""
    return float(np.prod(detector.preprocessing.spacing)) / 1000.0


def component_voxels(ml: float, voxel_volume_ml: float) -> int:
    """A component size in ml as model-grid voxels (rounded up; 0 for 0 ml)."""
    if not (isinstance(ml, (int, float)) and math.isfinite(ml) and ml >= 0):
        raise ConfigError(f"the minimum component size must be >= 0 ml; got {ml!r}")
    return int(math.ceil(ml / voxel_volume_ml - 1e-9)) if ml > 0 else 0


def default_calibration(detector: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`~medidiff.anomaly.runner.calibrate` for medidiff's
    default target (:data:`~medidiff.constants.CALIBRATION_DEFAULTS`) on ``detector``'s grid."""
    d = CALIBRATION_DEFAULTS
    return {
        "target": d["target"],
        "max_fp_ml": d["max_fp_ml"] if d["target"] == "fp-volume" else None,
        "min_component": component_voxels(float(d["min_component_ml"]), voxel_ml(detector)),  # type: ignore[arg-type]
    }


@dataclass(frozen=True)
class HealthyMap:
    """One healthy scan's post-processed anomaly map on the model grid.

    Attributes:
        name: the scan's name.
        values: the map, ``(X, Y, Z)``.
        mask: where it is defined (the eroded mask), ``(X, Y, Z)`` bool.
    """

    name: str
    values: np.ndarray
    mask: np.ndarray

    @property
    def inside(self) -> np.ndarray:
        """The scores inside the mask (flat)."""
        return self.values[self.mask]


def segmented_volume(m: HealthyMap, threshold: float, min_component: int) -> int:
    """Voxels of ``m`` segmented at ``threshold`` (components < ``min_component`` dropped)."""
    seg = (m.values > threshold) & m.mask
    return int(remove_small_components(seg, min_component).sum())


def fp_volume_threshold(
    maps: Sequence[HealthyMap], max_fp_ml: float, voxel_ml: float, min_component: int = 0
) -> float:
    """The lowest threshold whose mean segmented volume on ``maps`` is <= ``max_fp_ml``.

    Args:
        maps: healthy maps.
        max_fp_ml: the false-positive volume allowed per healthy scan, in ml (>= 0).
        voxel_ml: the volume of one model-grid voxel, in ml.
        min_component: components smaller than this many voxels are not counted (they are
            dropped from segmentations too).

    Returns:
        The threshold: one of the pooled healthy scores (a voxel is flagged when its score
        is strictly greater), the largest score when even the top voxel is too much.

    Raises:
        ConfigError: no maps, or a negative budget.
    """
    if not maps:
        raise ConfigError("no healthy maps to calibrate on")
    if not (isinstance(max_fp_ml, (int, float)) and math.isfinite(max_fp_ml) and max_fp_ml >= 0):
        raise ConfigError(f"the false-positive volume must be a number >= 0 ml; got {max_fp_ml!r}")
    budget_voxels = max_fp_ml / voxel_ml * len(maps)  # total over the scans
    candidates = np.unique(np.concatenate([m.inside for m in maps]).astype(np.float64))

    def total(threshold: float) -> int:
        return sum(segmented_volume(m, threshold, min_component) for m in maps)

    lo, hi = 0, candidates.size - 1  # total(candidates[hi]) == 0 <= budget
    if total(candidates[lo]) <= budget_voxels:
        return float(candidates[lo])
    while hi - lo > 1:  # invariant: total(lo) > budget >= total(hi)
        mid = (lo + hi) // 2
        if total(candidates[mid]) <= budget_voxels:
            hi = mid
        else:
            lo = mid
    return float(candidates[hi])


def held_out_rates(
    maps: Sequence[HealthyMap],
    threshold_of: Callable[[Sequence[HealthyMap]], float],
    voxel_ml: float,
    min_component: int = 0,
) -> dict[str, float | int]:
    """Leave-one-scan-out estimate of what a new healthy scan will see.

    Args:
        maps: the healthy maps (at least 2).
        threshold_of: ``threshold_of(maps) -> threshold``, the calibration rule.
        voxel_ml: one model-grid voxel in ml.
        min_component: the segmentation's component rule.

    Returns:
        ``{"scans", "voxel_fpr_mean", "voxel_fpr_max", "fp_ml_mean", "fp_ml_max"}``
        over the held-out scans (empty dict with fewer than 2 maps).
    """
    if len(maps) < 2:
        return {}
    fprs, vols = [], []
    for i, held in enumerate(maps):
        threshold = threshold_of([m for j, m in enumerate(maps) if j != i])
        n = segmented_volume(held, threshold, min_component)
        fprs.append(n / max(int(held.mask.sum()), 1))
        vols.append(n * voxel_ml)
    return {
        "scans": len(maps),
        "voxel_fpr_mean": float(np.mean(fprs)),
        "voxel_fpr_max": float(np.max(fprs)),
        "fp_ml_mean": float(np.mean(vols)),
        "fp_ml_max": float(np.max(vols)),
    }


def scan_fpr_interval(num_scans: int, fpr: float, level: float = 0.9) -> dict[str, float]:
    """The scan-level FPR a new healthy scan meets with a threshold from ``num_scans`` scores.

    The threshold is the k-th smallest healthy score, ``k = ceil((1 - fpr) n)``
    (:func:`~medidiff.anomaly.postprocess.threshold_at_fpr`); for exchangeable scores a new
    healthy score exceeds it with probability ``(n + 1 - k) / (n + 1)``, and over
    calibration sets that probability is Beta(n + 1 - k, k) distributed.

    Args:
        num_scans: n, the healthy scans calibrated on.
        fpr: the target.
        level: the central probability of the interval.

    Returns:
        ``{"expected", "low", "high", "level"}``.
    """
    from scipy.stats import beta

    n = int(num_scans)
    if n < 1:
        raise ConfigError("need at least one healthy scan")
    k = max(1, math.ceil((1 - fpr) * n - 1e-9))
    a, b = n + 1 - k, k
    tail = (1 - level) / 2
    return {
        "expected": a / (n + 1),
        "low": float(beta.ppf(tail, a, b)),
        "high": float(beta.ppf(1 - tail, a, b)),
        "level": float(level),
    }


def voxel_fpr_threshold(maps: Sequence[HealthyMap], fpr: float) -> float:
    """The ``(1 - fpr)`` quantile of the pooled healthy scores (the ``voxel-fpr`` target)."""
    return threshold_at_fpr(np.concatenate([m.inside for m in maps]), fpr)
