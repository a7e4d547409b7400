"""Real and synthetic images on the model grid and scale, for the synthesis metrics.

Real scans go through the checkpoint's preprocessing (:func:`load_real_images`: for a 2D
model the axial slices it trains on, for a 3D model whole volumes); synthetic samples
written by ``medidiff synthesize`` are mapped back from the training data's intensity
scale with the reference recorded in ``synthesis_config.json``
(:func:`load_synthetic_images`).

Example:
    >>> import numpy as np
    >>> images = ImageSet.from_arrays([np.zeros((4, 4)), np.ones((4, 4))], spatial_dims=2)
    >>> len(images), images.images.shape, images.groups
    (2, (2, 1, 4, 4), (0, 1))
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.errors import ConfigError, DataError

__all__ = ["ImageSet", "SyntheticSource", "load_real_images", "load_synthetic_images"]


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images on the model grid and scale.

    Attributes:
        images: ``(N, 1, X, Y)`` (2D) or ``(N, 1, X, Y, Z)`` (3D) float32, about [0, 1].
        names: one name per image (file, or ``file[z=k]`` for a slice).
        groups: the scan each image comes from (slices of one scan share it); images of
            the same group are never each other's real-vs-real nearest neighbour.
        spatial_dims: 2 or 3.
    """

    images: np.ndarray
    names: tuple[str, ...]
    groups: tuple[int, ...]
    spatial_dims: int

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != self.spatial_dims + 2 or len(self.names) != n or len(self.groups) != n:
            raise ValueError(
                f"inconsistent ImageSet: images {self.images.shape}, {len(self.names)} names, "
                f"{len(self.groups)} groups, spatial_dims {self.spatial_dims}"
            )

    def __len__(self) -> int:
        return len(self.images)

    @staticmethod
    def from_arrays(arrays: Sequence[np.ndarray], spatial_dims: int, names: Sequence[str] | None = None,
                    groups: Sequence[int] | None = None) -> ImageSet:
        """Stack ``(X, Y[, Z])`` arrays (each its own group unless ``groups`` is given)."""
        images = np.stack([np.asarray(a, dtype=np.float32) for a in arrays])[:, None]
        n = len(images)
        return ImageSet(
            images, tuple(names) if names is not None else tuple(str(i) for i in range(n)),
            tuple(int(g) for g in groups) if groups is not None else tuple(range(n)), spatial_dims,
        )



def _preprocessing_and_min_foreground(checkpoint: Any) -> tuple[Any, int, float, Any]:
    """(Preprocessing, spatial_dims, min_foreground, intensity reference) of a checkpoint,
    from its records (:func:`medidiff.models.loaded.checkpoint_records`; no network built)."""
    from medidiff.models.checkpoint import load_inference
    from medidiff.models.loaded import checkpoint_records

    ckpt = load_inference(checkpoint)
    config, preprocessing = checkpoint_records(ckpt)
    dims = int(ckpt.model_kwargs.get("spatial_dims", config.model.spatial_dims))
    return preprocessing, dims, float(config.data.min_foreground), ckpt.extra.get("intensity_reference")


def load_real_images(
    inputs: Any,
    preprocessing: Any,
    *,
    spatial_dims: int,
    min_foreground: float = 0.1,
    split: str | None = None,
) -> ImageSet:
    """Real scans on the model grid, as a 2D or 3D model sees them.

    Uses :func:`medidiff.data.datasets.build_dataset`, i.e. exactly the training pipeline: 2D gives
    the axial slices whose foreground fraction (the entry's mask if it has one, else the
    preprocessed foreground) is at least ``min_foreground``; 3D gives whole volumes.

    Args:
        inputs: files, a folder, a glob or a datalist (see :func:`medidiff.data.datasets.load_datalist`).
        preprocessing: the checkpoint's :class:`~medidiff.data.transforms.Preprocessing`.
        spatial_dims: 2 (slices) or 3 (volumes).
        min_foreground: 2D slice filter.
        split: split of a Decathlon datalist (default ``training``).

    Returns:
        The :class:`ImageSet`; ``groups`` is the scan index.

    Raises:
        DataError: no inputs, or no slice passes the filter.
    """
    from medidiff.data.datasets import build_dataset, load_datalist

    entries = load_datalist(inputs, split=split)
    ds = build_dataset(entries, preprocessing, spatial_dims=spatial_dims, min_foreground=min_foreground,
                       cache="memory")
    if len(ds) == 0:
        raise DataError(f"no real image passes the slice filter (min_foreground {min_foreground})")
    images, names, groups = [], [], []
    for i in range(len(ds)):
        item = ds[i]
        v = int(item["volume"])
        images.append(item["image"].numpy())
        names.append(f"{entries[v].name}[z={int(item['slice'])}]" if spatial_dims == 2 else entries[v].name)
        groups.append(v)
    return ImageSet(np.stack(images).astype(np.float32), tuple(names), tuple(groups), spatial_dims)



@dataclass(frozen=True)
class SyntheticSource:
    """How a folder of synthetic samples maps onto the model grid (provenance for the JSON)."""

    folder: str
    kind: str
    spatial_dims: int
    config_file: str | None
    checkpoint: str | None
    intensity: str
    num_files: int


def _check_recorded(recorded: Any, path: Path) -> None:
    """Refuse a synthesis_config.json whose fields used here have the wrong type (one line)."""
    from medidiff.synthesis.synthesizer import INTENSITY_NATIVE

    def bad(key: str | None, want: str) -> DataError:
        value = recorded.get(key) if key is not None else recorded
        what = f"'{key}'" if key is not None else "the file"
        return DataError(f"{path}: {what} must be {want}; got {value!r} (damaged or not written "
                         "by 'medidiff synthesize')")

    if not isinstance(recorded, dict):
        raise bad(None, "a JSON object")
    if not isinstance(recorded.get("preprocessing"), dict):
        raise bad("preprocessing", "a mapping of settings")
    if recorded.get("spatial_dims", 2) not in (2, 3):
        raise bad("spatial_dims", "2 or 3")
    fraction = recorded.get("min_foreground", 0.1)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise bad("min_foreground", "a number")
    if recorded.get("intensity") == INTENSITY_NATIVE:
        ref = recorded.get("intensity_reference")
        numbers = isinstance(ref, dict) and all(
            isinstance(ref.get(k), (int, float)) and not isinstance(ref.get(k), bool)
            for k in ("a_min", "a_max"))
        if not numbers or not math.isfinite(ref["a_max"] - ref["a_min"]) \
                or ref["a_max"] == ref["a_min"]:
            raise bad("intensity_reference", "a mapping with distinct numbers a_min, a_max")



def load_synthetic_images(
    folder: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
) -> tuple[ImageSet, SyntheticSource, Any, float]:
    """Synthetic samples on the model grid and scale.

    With ``folder/synthesis_config.json`` (written by ``medidiff synthesize``) the samples
    are taken exactly: shape checked against the recorded output shape, intensities mapped
    back with the recorded reference. Without it, ``checkpoint`` is required: 3D files are
    preprocessed like real scans; for a 2D checkpoint, files must be ``(X, Y, 1)`` slices of
    the model grid and are mapped with the checkpoint's intensity reference when it has one
    (as ``medidiff synthesize`` writes them), else taken as [0, 1].

    Returns:
        ``(images, source, preprocessing, min_foreground)``.

    Raises:
        DataError: no samples, a sample of the wrong shape.
        ConfigError: neither a synthesis config nor a checkpoint; a checkpoint whose
            preprocessing differs from the folder's.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--synthetic {folder}: no such folder")
    config_path, recorded = _read_recorded(folder)
    prep, dims, min_foreground, reference = _grid_of(folder, config_path, recorded, checkpoint)
    files = _sample_files(folder)
    arrays = [_model_scale(path, prep, dims, recorded is None, reference) for path in files]
    source = SyntheticSource(
        folder=str(folder), kind="2d-slice" if dims == 2 else "3d-volume", spatial_dims=dims,
        config_file=str(config_path) if recorded is not None else None,
        checkpoint=str(checkpoint) if checkpoint is not None else (recorded or {}).get("checkpoint"),
        intensity=("mapped to model scale with the recorded reference" if reference
                   else "taken as model scale"),
        num_files=len(files),
    )
    names = [p.name for p in files]
    return ImageSet.from_arrays(arrays, dims, names), source, prep, min_foreground


def _read_recorded(folder: Path) -> tuple[Path, dict[str, Any] | None]:
    """``folder/synthesis_config.json`` and its checked content (``None`` when absent)."""
    import json

    from medidiff.synthesis.folder import CONFIG_NAME

    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        return config_path, None
    try:
        recorded = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{config_path}: unreadable ({exc})") from None
    _check_recorded(recorded, config_path)
    return config_path, recorded


def _grid_of(
    folder: Path, config_path: Path, recorded: dict[str, Any] | None, checkpoint: Any
) -> tuple[Any, int, float, Any]:
    """(Preprocessing, spatial_dims, min_foreground, intensity reference) of the samples:
    the folder's record, checked against the checkpoint when both are given."""
    from medidiff.data.transforms import Preprocessing
    from medidiff.synthesis.synthesizer import INTENSITY_NATIVE

    if recorded is None and checkpoint is None:
        raise ConfigError(
            f"--synthetic {folder} has no {config_path.name} (not written by `medidiff synthesize`); "
            "pass --checkpoint so real and synthetic images can be put on the model grid"
        )
    min_foreground = 0.1
    reference = None
    if checkpoint is not None:
        prep, dims, min_foreground, reference = _preprocessing_and_min_foreground(checkpoint)
        if recorded is not None and Preprocessing.from_dict(recorded.get("preprocessing")) != prep:
            raise ConfigError(
                f"--checkpoint {checkpoint}: its preprocessing differs from the one recorded in "
                f"{config_path}; evaluate with the checkpoint that made the samples (or omit --checkpoint)"
            )
    if recorded is not None:
        prep = Preprocessing.from_dict(recorded.get("preprocessing"))
        dims = int(recorded.get("spatial_dims", 2))
        if checkpoint is None:
            min_foreground = float(recorded.get("min_foreground", min_foreground))
        native = recorded.get("intensity") == INTENSITY_NATIVE
        reference = recorded.get("intensity_reference") if native else None
    return prep, dims, min_foreground, reference


def _sample_files(folder: Path) -> list[Path]:
    """The manifest's files that exist, else every volume file of the folder."""
    from medidiff.io.volume import is_volume_path
    from medidiff.synthesis.folder import MANIFEST_NAME, read_manifest

    rows = read_manifest(folder / MANIFEST_NAME)
    files = [folder / r["file"] for r in rows if r.get("file") and (folder / r["file"]).is_file()]
    if not files:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                       and is_volume_path(p))
    if not files:
        raise DataError(f"--synthetic {folder}: no synthetic volumes found")
    return files


def _model_scale(path: Path, prep: Any, dims: int, unrecorded: bool, reference: Any) -> np.ndarray:
    """One sample file on the model grid and scale: ``(X, Y)`` or ``(X, Y, Z)``."""
    from medidiff.data.transforms import intensity_to_model, preprocess
    from medidiff.io.volume import load_volume

    volume = load_volume(path)
    if unrecorded and dims == 3:
        return preprocess(volume, prep).image
    x, y, z = prep.shape
    expected = (x, y, 1) if dims == 2 else (x, y, z)
    if volume.shape != expected:
        raise DataError(
            f"{path}: shape {volume.shape}; samples of this model are {expected} "
            f"({'one axial slice of the model grid' if dims == 2 else 'the model grid'})"
        )
    values = volume.array.astype(np.float32)
    if reference:
        values = intensity_to_model(values, reference)
    return values[:, :, 0] if dims == 2 else values
