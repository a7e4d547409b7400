"""Resumable training state (``RUN_DIR/checkpoints/*.pt``) that never executes code on load.

Model, EMA, optimizer and GradScaler state dicts, step, config and RNG states, written with
``torch.save`` (atomically, see :mod:`medidiff.models.checkpoint`) and read with
``torch.load(weights_only=True)``, whose restricted unpickler builds only tensors and plain
containers and refuses every other Python object. :func:`save_training_state` refuses to
write what such a load would refuse, so a run never saves state it cannot resume from.

Example:
    >>> import tempfile, pathlib, torch
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "last.pt"
    >>> _ = save_training_state(path, {"step": 3, "w": torch.ones(2)})
    >>> load_training_state(path)["step"]
    3
"""

from __future__ import annotations

import collections
import logging
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

import medidiff
from medidiff.errors import CheckpointError
from medidiff.io.atomic import atomic_write
from medidiff.models.checkpoint import _check_format, _first_line, _sniff

__all__ = [
    "TRAINING_FORMAT",
    "capture_rng_state",
    "load_training_state",
    "restore_rng_state",
    "save_training_state",
]

logger = logging.getLogger(__name__)

TRAINING_FORMAT = "medidiff-training-1"


def save_training_state(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write resumable training state with ``torch.save``, atomically.

    ``state`` may hold only what ``torch.load(weights_only=True)`` rebuilds: tensors,
    str, bytes, int, float, bool, None, ``torch.Size``/``dtype``/``device`` and dicts,
    lists, tuples and sets of them; this is checked before writing. Typical keys: ``model``,
    ``ema``, ``optimizer``, ``scaler``, ``lr_scheduler`` (state dicts), ``step``, ``epoch``,
    ``config`` (dict) and ``rng`` (from :func:`capture_rng_state`).

    Args:
        path: destination, e.g. ``RUN_DIR/checkpoints/step_001000.pt``; its folder is
            created if missing.
        state: the training state.

    Returns:
        The path written.

    Raises:
        CheckpointError: ``state`` holds an object that a weights-only load would refuse
            (the message names where, e.g. ``state['config']['lr']``).
        OutputError: the folder cannot be created or written.
    """
    path = Path(path)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: training state must be a dict, got {type(state).__name__}")
    _check_weights_only_safe(state, "state", path)
    payload = {
        "format": TRAINING_FORMAT,
        "medidiff_version": medidiff.__version__,
        "state": dict(state),
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def load_training_state(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read training state written by :func:`save_training_state`, never running code.

    Args:
        path: the file.
        map_location: where tensors are placed (``"cpu"`` by default; the Trainer moves
            them into its model and optimizer).

    Returns:
        The ``state`` dict as saved.

    Raises:
        CheckpointError: the file is missing, empty, corrupt or truncated, is a
            safetensors weights file, holds objects other than tensors and plain
            containers (refused without running them), or is not medidiff training state.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: training state not found")
    with path.open("rb") as handle:
        head = handle.read(64)
    if not head:
        raise CheckpointError(f"{path}: training state is empty (0 bytes); use an earlier one")
    if _sniff(head, size=path.stat().st_size) == "safetensors":
        raise CheckpointError(
            f"{path}: is inference weights (safetensors), not resumable training state; "
            "resume from a file under RUN_DIR/checkpoints/"
        )
    try:
        # weights_only=True: the restricted unpickler builds tensors and plain containers
        # only and raises on any other global, before anything could run.
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        message = str(exc)
        if "Weights only load failed" in message or "Unsupported global" in message:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path}: refused: it holds Python objects other than tensors and plain "
                f"containers{what}; medidiff never unpickles code"
            ) from None
        raise CheckpointError(
            f"{path}: corrupt or truncated training state ({_first_line(exc)}); "
            "use an earlier checkpoint"
        ) from None
    if not isinstance(payload, dict) or "format" not in payload or "state" not in payload:
        raise CheckpointError(
            f"{path}: not medidiff training state (no format marker); it was not written by "
            "medidiff.models.checkpoint.save_training_state"
        )
    _check_format(path, payload["format"], TRAINING_FORMAT, payload.get("medidiff_version"))
    if not isinstance(payload["state"], dict):
        raise CheckpointError(f"{path}: training state is not a dict; the file is damaged")
    return payload["state"]


def capture_rng_state() -> dict[str, Any]:
    """Capture every global random number generator a training run draws from.

    The result holds only tensors, ints, floats, strings and lists, so it can be saved
    with :func:`save_training_state` and read back with a weights-only load.

    Returns:
        ``{"torch_cpu": ByteTensor, "torch_cuda": [ByteTensor per device] (empty when
        CUDA is unused), "python": {...}, "numpy": {...}}``.
    """
    version, internal, gauss_next = random.getstate()
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    cuda_states: list[torch.Tensor] = []
    # Only if this process has used CUDA: get_rng_state_all() would initialise it.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_states = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "torch_cpu": torch.get_rng_state().clone(),
        "torch_cuda": cuda_states,
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),  # 624 words + position
            "gauss_next": gauss_next,
        },
        "numpy": {
            "algorithm": str(algorithm),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),  # uint32 words
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
    }


def restore_rng_state(rng_state: Mapping[str, Any]) -> None:
    """Restore generators captured by :func:`capture_rng_state`.

    CUDA states are restored when CUDA is available; states saved on a CUDA machine and
    restored without one are skipped with a warning (resuming a GPU run on a CPU).

    Args:
        rng_state: the dict returned by :func:`capture_rng_state` (possibly after a
            save/load round trip).

    Raises:
        CheckpointError: the dict lacks a generator or holds malformed values.
    """
    try:
        torch.set_rng_state(rng_state["torch_cpu"].to(device="cpu", dtype=torch.uint8))
        py = rng_state["python"]
        internal = tuple(int(v) for v in py["state"].tolist())
        gauss_next = py["gauss_next"]
        random.setstate((int(py["version"]), internal, gauss_next))
        nps = rng_state["numpy"]
        np.random.set_state(
            (
                str(nps["algorithm"]),
                nps["keys"].cpu().numpy().astype(np.uint32),
                int(nps["pos"]),
                int(nps["has_gauss"]),
                float(nps["cached_gaussian"]),
            )
        )
        cuda_states = list(rng_state.get("torch_cuda", []))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(
            f"RNG state is malformed ({type(exc).__name__}: {_first_line(exc)}); "
            "it must come from capture_rng_state()"
        ) from None
    if cuda_states:
        if not torch.cuda.is_available():
            logger.warning("RNG state holds CUDA generators but CUDA is unavailable; skipped")
            return
        count = torch.cuda.device_count()
        if count != len(cuda_states):
            logger.warning(
                "RNG state holds %d CUDA generators, this machine has %d devices; "
                "restoring the first %d",
                len(cuda_states),
                count,
                min(count, len(cuda_states)),
            )
        for index, state in enumerate(cuda_states[:count]):
            torch.cuda.set_rng_state(state.to(device="cpu", dtype=torch.uint8), index)


def _check_weights_only_safe(value: Any, where: str, path: Path) -> None:
    """Raise if ``value`` holds an object ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(value, torch.Tensor) or value is None:
        return
    if type(value) in (str, bytes, int, float, bool, complex, torch.Size, torch.dtype,
                       torch.device):
        return
    if type(value) in (dict, collections.OrderedDict):
        for key, item in value.items():
            _check_weights_only_safe(key, f"{where} key {key!r}", path)
            _check_weights_only_safe(item, f"{where}[{key!r}]", path)
        return
    if type(value) in (list, tuple, set):
        for index, item in enumerate(value):
            _check_weights_only_safe(item, f"{where}[{index}]", path)
        return
    hint = ""
    if isinstance(value, (np.ndarray, np.generic)):
        hint = "; convert numpy values with torch.from_numpy() or .item()"
    raise CheckpointError(
        f"{path}: cannot save training state: {where} is a {type(value).__module__}."
        f"{type(value).__qualname__}, which a safe (weights-only) load refuses{hint}"
    )
