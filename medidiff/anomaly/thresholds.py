"""Calibrated thresholds: a voxel and a scan threshold at a target false-positive rate.

Thresholds come from healthy scans only (:func:`medidiff.anomaly.runner.calibrate`,
``medidiff calibrate``): the voxel threshold at a target (a voxel false-positive rate, or a
false-positive volume per healthy scan, :mod:`medidiff.anomaly.calibration`) and a
scan-level threshold, tied to the checkpoint's SHA-256 and the full method/post-processing
config; :meth:`Thresholds.check` refuses thresholds made for another checkpoint or config.
Each file also records what a new healthy scan should expect (held-out estimates) and the
component rule its segmentations use.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import medidiff
from medidiff.anomaly.calibration import (
    CALIBRATION_TARGETS,
    HealthyMap,
    fp_volume_threshold,
    held_out_rates,
    scan_fpr_interval,
    voxel_fpr_threshold,
)
from medidiff.anomaly.calibration import voxel_ml as voxel_volume_ml
from medidiff.anomaly.postprocess import threshold_at_fpr
from medidiff.errors import CheckpointError, ConfigError
from medidiff.io.atomic import write_json_atomic

__all__ = ["THRESHOLDS_FORMAT", "Thresholds"]

THRESHOLDS_FORMAT = "medidiff-thresholds-1"


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
        checkpoint_tensors_sha256: SHA-256 of its tensors only (empty in files written
            before it was recorded): thresholds stay valid for the same weights whose
            metadata was rewritten (e.g. an input profile added), and for nothing else.
        checkpoint_path: where the checkpoint was (informative only).
        method: the resolved method config (dict).
        postprocess: the post-processing config (dict).
        seed: the noise seed used for calibration (informative only).
        version: the medidiff version that calibrated.
        scan_threshold_rule: how ``scan_threshold`` was computed, in words.
        scan_scores: healthy scan name -> score.
        target: ``"voxel-fpr"`` or ``"fp-volume"`` (see :mod:`medidiff.anomaly.calibration`).
        max_fp_ml: the ``fp-volume`` budget per healthy scan in ml (``None`` otherwise).
        min_component: segmentations drop 26-connected components smaller than this many
            model-grid voxels (the larger of this and the post-processing's).
        voxel_ml: one model-grid voxel in ml (0 when unknown).
        held_out: leave-one-scan-out voxel FPR and false-positive volume (ml) a new healthy
            scan should expect (:func:`~medidiff.anomaly.calibration.held_out_rates`).
        scan_fpr: expected scan-level FPR and its interval for this many scans
            (:func:`~medidiff.anomaly.calibration.scan_fpr_interval`).
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
    target: str = "voxel-fpr"
    max_fp_ml: float | None = None
    min_component: int = 0
    checkpoint_tensors_sha256: str = ""
    voxel_ml: float = 0.0
    held_out: Mapping[str, Any] = field(default_factory=dict)
    scan_fpr: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_healthy(
        cls,
        detector: Any,
        voxel_scores: Sequence[np.ndarray | HealthyMap],
        scan_scores: Mapping[str, float],
        fpr: float = 0.05,
        *,
        target: str = "voxel-fpr",
        max_fp_ml: float | None = None,
        min_component: int = 0,
    ) -> Thresholds:
        """Thresholds from healthy scans scored by ``detector``.

        Args:
            detector: the detector that scored them (its checkpoint and configs are recorded).
            voxel_scores: per scan, its :class:`~medidiff.anomaly.calibration.HealthyMap`
                (needed for ``fp-volume``, components and held-out estimates), or just the
                post-processed voxel scores inside its scored mask.
            scan_scores: per scan name, its score.
            fpr: target false-positive rate in (0, 1): the voxel threshold's under
                ``voxel-fpr``, and the scan threshold's.
            target: ``"voxel-fpr"`` or ``"fp-volume"``.
            max_fp_ml: the ``fp-volume`` budget, ml of segmentation per healthy scan.
            min_component: drop segmented components smaller than this many model voxels
                (counted in the ``fp-volume`` budget and applied to segmentations).

        Returns:
            The thresholds.

        Raises:
            ConfigError: unknown target, ``fp-volume`` without a budget or without maps.
        """
        if target not in CALIBRATION_TARGETS:
            raise ConfigError(
                f"calibration target must be one of {', '.join(CALIBRATION_TARGETS)}; got {target!r}"
            )
        maps = [v for v in voxel_scores if isinstance(v, HealthyMap)]
        if len(maps) != len(voxel_scores):
            maps = []
        pooled = (
            np.concatenate(
                [
                    (v.inside if isinstance(v, HealthyMap) else np.asarray(v, np.float32)).ravel()
                    for v in voxel_scores
                ]
            )
            if voxel_scores
            else np.zeros(0, np.float32)
        )
        min_component = int(min_component)
        voxel_ml = voxel_volume_ml(detector)
        if target == "fp-volume":
            if max_fp_ml is None or not maps:
                raise ConfigError(
                    "the fp-volume target needs a budget (max_fp_ml, ml per healthy scan) and "
                    "the healthy maps"
                )
            rule = lambda ms: fp_volume_threshold(ms, max_fp_ml, voxel_ml, min_component)  # noqa: E731
        else:
            max_fp_ml = None
            rule = lambda ms: voxel_fpr_threshold(ms, fpr)  # noqa: E731
        voxel_threshold = rule(maps) if maps else threshold_at_fpr(pooled, fpr)
        names = list(scan_scores)
        return cls(
            voxel_threshold=voxel_threshold,
            scan_threshold=threshold_at_fpr(np.asarray([scan_scores[n] for n in names]), fpr),
            fpr=float(fpr),
            num_scans=len(names),
            num_voxels=int(pooled.size),
            checkpoint_sha256=detector.checkpoint.sha256,
            checkpoint_tensors_sha256=getattr(detector.checkpoint, "tensors_sha256", ""),
            checkpoint_path=str(detector.checkpoint.path),
            method=detector.method.to_dict(),
            postprocess=detector.postprocess.to_dict(),
            seed=detector.seed,
            scan_threshold_rule=_scan_rule(len(names), fpr),
            scan_scores={n: float(scan_scores[n]) for n in names},
            target=target,
            max_fp_ml=None if max_fp_ml is None else float(max_fp_ml),
            min_component=min_component,
            voxel_ml=voxel_ml,
            held_out=held_out_rates(maps, rule, voxel_ml, min_component) if maps else {},
            scan_fpr=scan_fpr_interval(len(names), fpr) if names else {},
        )

    @property
    def voxel_rule(self) -> str:
        """How ``voxel_threshold`` was computed, in words."""
        if self.target == "fp-volume":
            return (
                f"lowest threshold at which the healthy scans' segmentations (components under "
                f"{self.min_component} model voxels dropped) hold at most {self.max_fp_ml:g} ml "
                "per scan on average"
            )
        return (
            "(1 - fpr) quantile (inverted empirical CDF) of post-processed healthy voxel "
            "scores inside the eroded masks on the model grid, pooled over scans"
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
            "checkpoint": {"path": self.checkpoint_path, "sha256": self.checkpoint_sha256,
                           "tensors_sha256": self.checkpoint_tensors_sha256},
            "method": dict(self.method),
            "postprocess": dict(self.postprocess),
            "seed": self.seed,
            "medidiff_version": self.version,
            "scan_threshold_rule": self.scan_threshold_rule,
            "voxel_threshold_rule": self.voxel_rule,
            "target": self.target,
            "max_fp_ml": self.max_fp_ml,
            "min_component": self.min_component,
            "voxel_ml": self.voxel_ml,
            "expected_on_new_healthy_scans": {
                "held_out": dict(self.held_out),
                "scan_fpr": dict(self.scan_fpr),
                "note": "held_out: each calibration scan left out in turn, the threshold "
                "recomputed on the others; scan_fpr: order-statistics expectation and interval",
            },
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
            expected = dict(raw.get("expected_on_new_healthy_scans") or {})
            return cls(
                voxel_threshold=float(raw["voxel_threshold"]),
                scan_threshold=float(raw["scan_threshold"]),
                fpr=float(raw["fpr"]),
                num_scans=int(raw["num_scans"]),
                num_voxels=int(raw["num_voxels"]),
                checkpoint_sha256=str(ckpt["sha256"]),
                checkpoint_tensors_sha256=str(ckpt.get("tensors_sha256") or ""),
                checkpoint_path=str(ckpt.get("path", "")),
                method=dict(raw["method"]),
                postprocess=dict(raw["postprocess"]),
                seed=int(raw.get("seed", 0)),
                version=str(raw.get("medidiff_version", "")),
                scan_threshold_rule=str(raw.get("scan_threshold_rule", "")),
                scan_scores={str(k): float(v) for k, v in dict(raw.get("scan_scores", {})).items()},
                target=str(raw.get("target", "voxel-fpr")),
                max_fp_ml=None if raw.get("max_fp_ml") is None else float(raw["max_fp_ml"]),
                min_component=int(raw.get("min_component", 0)),
                voxel_ml=float(raw.get("voxel_ml", 0.0)),
                held_out=dict(expected.get("held_out", {})),
                scan_fpr=dict(expected.get("scan_fpr", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"{path}: thresholds file is incomplete or malformed ({exc!r})"
            ) from None

    def check(self, detector: Any) -> None:
        """Refuse thresholds calibrated with another checkpoint or another config.

        The checkpoint matches when its file SHA-256 does, or when both record the SHA-256
        of the tensors and those agree (same weights, metadata rewritten).

        Raises:
            CheckpointError: another checkpoint (weights differ).
            ConfigError: another method or post-processing config (differing keys named).
        """
        mine = getattr(detector.checkpoint, "tensors_sha256", "")
        same_weights = bool(mine) and mine == self.checkpoint_tensors_sha256
        if self.checkpoint_sha256 != detector.checkpoint.sha256 and not same_weights:
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
