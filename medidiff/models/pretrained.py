"""The default models shipped inside the package.

``medidiff/weights/`` holds one inference file per default model (safetensors, fp16
weights, the training config and preprocessing in its metadata, like any file that
``medidiff train`` writes), its model card (``<name>.md``), the card's facts as JSON
(``<name>.json``: data, network, steps, wall time, machine, metrics) and its loss curve
(``<name>_loss.png``). ``pipelines/export_default_models.py`` makes them from a training
run folder, so anyone can retrain and re-export them.

Commands that take ``--checkpoint`` fall back to :func:`resolve_checkpoint`: the 2D brain
MRI model for anomaly detection, and for synthesis the model the user names.

Example:
    >>> from medidiff.models.pretrained import DEFAULT_2D, resolve_checkpoint
    >>> resolve_checkpoint(None).name
    'brain_mri_2d_2mm.safetensors'
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medidiff.errors import CheckpointError

#: the default 2D brain MRI model of anomaly detection: axial slices on sample_data's own
#: 2 mm grid (chosen over the 2.5 mm model on the labelled validation split)
DEFAULT_2D = "brain_mri_2d_2mm"
#: the 2D model at 2.5 mm (64x80 slices): the base that DEFAULT_2D was fine-tuned from, the
#: default of ``inpaint`` and the start of the lesion-conditioned generator
COARSE_2D = "brain_mri_2d"
#: the default 3D brain MRI model (whole-volume synthesis and 3D anomaly scoring at 2 mm:
#: a latent model)
DEFAULT_3D = "brain_mri_3d"
#: the small pixel-space 3D model at 5 mm (the earlier 3D default)
PIXEL_3D_5MM = "brain_mri_3d_5mm"
#: every shipped model, with a one-line description
MODELS: dict[str, str] = {
    DEFAULT_2D: "2D axial slices of brain T1 MRI at 2 mm (80x100), simplex noise, fine-tuned from "
    "brain_mri_2d; the default for anomaly detection",
    COARSE_2D: "2D axial slices of brain T1 MRI at 2.5 mm (64x80), simplex noise; the base of "
    "brain_mri_2d_2mm, the default of inpaint, faster anomaly detection (1.25x fewer evaluations)",
    DEFAULT_3D: "3D brain T1 MRI whole volumes at 2 mm (96x112x96), latent diffusion "
    "(autoencoder 4x per axis, 4 x 24 x 28 x 24 latent), rectified flow; the default for "
    "whole-volume synthesis and 3D anomaly scoring",
    PIXEL_3D_5MM: "3D brain T1 MRI volumes at 5 mm (32x40x36), pixel-space diffusion, Gaussian "
    "noise, v-prediction; small and fast whole-volume synthesis at a coarse resolution",
}

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


def _check_name(name: str) -> str:
    if name not in MODELS:
        raise CheckpointError(
            f"unknown default model {name!r}; shipped models: {', '.join(sorted(MODELS))}"
        )
    return name


def pretrained_path(name: str = DEFAULT_2D) -> Path:
    """The inference file of a shipped default model.

    Args:
        name: a key of :data:`MODELS` (``"brain_mri_2d"``, ``"brain_mri_3d"``,
            ``"brain_mri_3d_5mm"``).

    Returns:
        ``medidiff/weights/<name>.safetensors``.

    Raises:
        CheckpointError: an unknown name, or the file is missing from this installation.
    """
    path = WEIGHTS_DIR / f"{_check_name(name)}.safetensors"
    if not path.is_file():
        raise CheckpointError(
            f"{path}: the default model '{name}' is missing from this installation; pass "
            "--checkpoint PATH/model.safetensors, or re-export it with "
            "'python pipelines/export_default_models.py'"
        )
    return path


def model_card_path(name: str = DEFAULT_2D) -> Path:
    """The markdown model card of a shipped model (``medidiff/weights/<name>.md``)."""
    return WEIGHTS_DIR / f"{_check_name(name)}.md"


def model_card_facts(name: str = DEFAULT_2D) -> dict[str, Any]:
    """The model card's facts (``medidiff/weights/<name>.json``); ``{}`` if none is shipped.

    Keys (when present): ``name``, ``description``, ``config`` (training config file),
    ``data``, ``preprocessing``, ``network``, ``parameters``, ``steps``, ``batch_size``,
    ``wall_time_s``, ``machine``, ``final_loss``, ``trained_on`` (date), ``sha256`` of the
    shipped file, ``size_bytes``, ``metrics`` (anomaly or synthesis results, with how they
    were obtained).
    """
    path = WEIGHTS_DIR / f"{_check_name(name)}.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable model card facts: {exc}") from None


def resolve_checkpoint(
    arg: str | os.PathLike | None, kind: str = DEFAULT_2D
) -> Path:
    """The checkpoint a command should use: the given path, else the shipped default.

    Args:
        arg: ``--checkpoint`` as given (``None`` or empty: use the default), a path, or the
            name of a shipped model (a key of :data:`MODELS`).
        kind: the shipped model to fall back to.

    Returns:
        The path (existence of a user path is checked by the loader, which says more).
    """
    if arg is None or (isinstance(arg, str) and not arg.strip()):
        return pretrained_path(kind)
    if isinstance(arg, str) and arg in MODELS:
        return pretrained_path(arg)
    return Path(arg)
