"""Calibrated thresholds: a voxel and a scan threshold at a target false-positive rate.

Thresholds come from healthy scans only (:func:`medidiff.anomaly.runner.calibrate`,
``medidiff calibrate``): the voxel threshold at a target false-positive rate and a
scan-level threshold, tied to the checkpoint's SHA-256 and the full method/post-processing
config; :meth:`Thresholds.check` refuses thresholds made for another checkpoint or config.
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
        detector: Any,
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

    def check(self, detector: Any) -> None:
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
