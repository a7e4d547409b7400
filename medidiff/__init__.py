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
    "Volume": "medidiff.io.volume",
    "load_volume": "medidiff.io.volume",
    "save_volume": "medidiff.io.volume",
    "Config": "medidiff.config",
    "Preprocessing": "medidiff.data.datasets",
    "load_datalist": "medidiff.data.datalist",
    "build_model": "medidiff.models.unet",
    "NoiseSchedule": "medidiff.diffusion.schedules",
    "sample": "medidiff.diffusion.sampling",
    "partial_reconstruction": "medidiff.diffusion.sampling",
    "load_inference": "medidiff.models.checkpoint",
    "load_model": "medidiff.models.loaded",
    "LoadedModel": "medidiff.models.loaded",
    "Trainer": "medidiff.training.trainer",
    "AnomalyDetector": "medidiff.anomaly.detector",
    "calibrate": "medidiff.anomaly.runner",
    "Thresholds": "medidiff.anomaly.thresholds",
    "MethodConfig": "medidiff.anomaly.methods",
    "PostprocessConfig": "medidiff.anomaly.postprocess",
    "Synthesizer": "medidiff.synthesis.synthesizer",
    "synthesize_to_folder": "medidiff.synthesis.folder",
    "evaluate_synthesis": "medidiff.synthesis.metrics",
    "Case": "medidiff.anomaly.metrics",
    "evaluate_cases": "medidiff.anomaly.metrics",
    "export_bundle": "medidiff.bundle.export",
}

__all__ = ["__version__", "MedidiffError", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medidiff' has no attribute {name!r}")
