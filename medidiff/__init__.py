"""medidiff: denoising-diffusion models for medical volumes, built on MONAI.

Two jobs: synthesise new scans, and detect anomalies by partially noising a scan and
denoising it back towards "healthy". The names a script needs are importable from here;
they load lazily so ``import medidiff`` (and ``medidiff --help``) stays fast.

Example:
    >>> import medidiff
    >>> medidiff.Config.from_dict({"model": {"preset": "tiny"}}).model.preset
    'tiny'
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from medidiff.errors import MedidiffError  # noqa: E402

_EXPORTS = {
    "Volume": "medidiff.io",
    "load_volume": "medidiff.io",
    "save_volume": "medidiff.io",
    "Config": "medidiff.config",
    "Preprocessing": "medidiff.data",
    "load_datalist": "medidiff.data",
    "build_model": "medidiff.models",
    "NoiseSchedule": "medidiff.diffusion",
    "sample": "medidiff.diffusion",
    "partial_reconstruction": "medidiff.diffusion",
    "load_inference": "medidiff.checkpoint",
    "Trainer": "medidiff.training",
    "AnomalyDetector": "medidiff.anomaly",
    "calibrate": "medidiff.anomaly",
    "Thresholds": "medidiff.anomaly",
    "MethodConfig": "medidiff.anomaly_methods",
    "PostprocessConfig": "medidiff.postprocess",
    "Synthesizer": "medidiff.synthesis",
    "synthesize_to_folder": "medidiff.synthesis",
    "evaluate_synthesis": "medidiff.synthesis_metrics",
    "Case": "medidiff.metrics",
    "evaluate_cases": "medidiff.metrics",
}

__all__ = ["__version__", "MedidiffError", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medidiff' has no attribute {name!r}")
