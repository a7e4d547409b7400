"""Cached torch datasets of preprocessed scans: 2D axial slices, 3D volumes or patches.

The cases come from a datalist (:mod:`medidiff.data.datalist`: folder, glob, CSV,
Decathlon ``dataset.json``; no torch import there); the preprocessing itself (MONAI
orientation, spacing, crop/pad, intensity; invertible) lives in
:mod:`medidiff.data.transforms`; the public names of both are re-exported here.

Example:
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> from medidiff.io import Volume, save_volume
    >>> from medidiff.data.datasets import load_datalist, build_dataset, Preprocessing
    >>> d = Path(tempfile.mkdtemp())
    >>> arr = np.zeros((16, 16, 12), np.float32); arr[3:13, 3:13, 2:10] = np.linspace(1, 9, 8)
    >>> for i in range(2):
    ...     _ = save_volume(Volume(arr, np.diag([2.0, 2.0, 2.0, 1.0])), d / f"sub-{i}.nii.gz")
    >>> entries = load_datalist(d)
    >>> ds = build_dataset(entries, Preprocessing(shape=(16, 16, 12)), spatial_dims=2)
    >>> len(ds), tuple(ds[0]["image"].shape)
    (16, (1, 16, 16))
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, Transform

from medidiff.data.datalist import (
    DatalistEntry,
    class_names_of,
    load_datalist,
    stratified_by_kind,
)
from medidiff.errors import ConfigError, DataError, MedidiffError
from medidiff.io import Volume, load_volume
from medidiff.data.transforms import (
    CT_WINDOWS,
    Preprocessed,
    Preprocessing,
    intensity_to_model,
    intensity_to_native,
    preprocess,
    to_model,
    to_native,
)

_CACHE_FORMAT = "medidiff-data-v1"  # part of the on-disk cache key


# ---------------------------------------------------------------------------------------
# loading and preprocessing one case
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PreparedScan:
    """A datalist entry read from disk and preprocessed.

    Attributes:
        entry: the datalist entry.
        volume: the native scan (the reference grid for outputs).
        preprocessed: the scan on the model grid; ``preprocessed.mask`` is the entry's
            mask, if it has one.
    """

    entry: DatalistEntry
    volume: Volume
    preprocessed: Preprocessed


def prepare_entry(entry: DatalistEntry, preprocessing: Preprocessing) -> PreparedScan:
    """Load an entry's image (and mask) and preprocess them.

    Args:
        entry: the case.
        preprocessing: the settings (e.g. from a checkpoint).

    Returns:
        The :class:`PreparedScan`.
    """
    volume = load_volume(entry.image)
    mask = load_volume(entry.mask) if entry.mask is not None else None
    return PreparedScan(entry, volume, preprocess(volume, preprocessing, mask=mask))


# ---------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------


class PreprocessItem(Transform):
    """MONAI transform: load and preprocess one datalist item; the result is what gets cached.

    A (non-random) MONAI ``Transform``, so ``CacheDataset`` and ``PersistentDataset``
    cache its output. The returned dict holds tensors only, so ``PersistentDataset`` can
    read it back with ``torch.load(weights_only=True)``: ``image`` (X, Y, Z) float32,
    ``slice_foreground`` (Z,) the foreground fraction of each axial slice (mask > 0 if
    the item has a mask, else the preprocessed foreground), ``affine`` (4, 4),
    ``a_min``/``a_max`` the intensity map.
    """

    def __init__(self, preprocessing: Preprocessing, *, with_labels: bool = False) -> None:
        self.preprocessing = preprocessing
        self.with_labels = with_labels

    def __call__(self, item: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        volume = load_volume(item["image"])
        mask = load_volume(item["mask"]) if item.get("mask") else None
        pre = preprocess(volume, self.preprocessing, mask=mask)
        foreground = pre.mask > 0 if pre.mask is not None else pre.foreground
        out = {
            "image": torch.from_numpy(pre.image),
            "slice_foreground": torch.from_numpy(foreground.mean(axis=(0, 1)).astype(np.float32)),
            "affine": torch.from_numpy(pre.affine),
            "a_min": torch.tensor(float(pre.intensity["a_min"]), dtype=torch.float64),
            "a_max": torch.tensor(float(pre.intensity["a_max"]), dtype=torch.float64),
        }
        if self.with_labels:  # label maps of mask-conditioned models: nearest neighbour
            brain = (pre.mask > 0) if pre.mask is not None else np.zeros(pre.image.shape, bool)
            lesion = np.zeros(pre.image.shape, bool)
            if item.get("segmentation"):
                from medidiff.data.transforms import to_model

                seg = load_volume(item["segmentation"])
                if seg.shape != volume.shape:
                    raise DataError(
                        f"{item['segmentation']}: label shape {seg.shape} differs from its image's {volume.shape}"
                    )
                lesion = to_model((np.asarray(seg.array) > 0).astype(np.uint8), pre, reference=seg, interpolation="nearest") > 0
            out["brain"] = torch.from_numpy(brain.astype(np.uint8))
            out["lesion"] = torch.from_numpy(lesion.astype(np.uint8))
        return out


def _file_stamp(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


CACHE_MODES = ("memory", "disk", "none")


@contextlib.contextmanager
def _medidiff_errors() -> Iterator[None]:
    """Re-raise a MedidiffError that MONAI wrapped in ``RuntimeError("applying transform ...")``.

    So a bad file in a datalist gives the CLI's one-line message, not a traceback.
    """
    try:
        yield
    except RuntimeError as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, MedidiffError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


class PreprocessedDataset(torch.utils.data.Dataset):
    """Base of :class:`SliceDataset` and :class:`VolumeDataset`: preprocessed volumes, cached.

    Each volume is loaded and preprocessed once: ``cache="memory"`` uses MONAI's
    ``CacheDataset`` (all volumes at construction), ``"disk"`` MONAI's
    ``PersistentDataset`` in ``cache_dir`` (written on first use, reused by later runs;
    the key covers the file paths, sizes, modification times and the preprocessing
    settings), ``"none"`` re-reads files on every access (debugging only).

    Attributes:
        entries: the datalist.
        preprocessing: the settings.
        class_names: the class vocabulary when class labels are served (item
            ``class_label`` is the index into it), else ``None``.
        spatial_dims: 2 or 3.
    """

    spatial_dims: int = 0

    def __init__(
        self,
        entries: Sequence[DatalistEntry],
        preprocessing: Preprocessing,
        *,
        cache: str = "memory",
        cache_dir: str | os.PathLike | None = None,
        class_names: Sequence[str] | None = None,
        cache_workers: int = 1,
        progress: bool = False,
        condition_labels: Sequence[str] | None = None,
    ) -> None:
        from monai.data import CacheDataset, Dataset, PersistentDataset

        self.entries = list(entries)
        if not self.entries:
            raise DataError("the datalist is empty")
        self.condition_labels = tuple(condition_labels) if condition_labels else None
        self.preprocessing = preprocessing
        self.class_names = tuple(class_names) if class_names is not None else None
        self._labels: list[int] | None = None
        if self.class_names is not None:
            lookup = {name: i for i, name in enumerate(self.class_names)}
            self._labels = []
            for e in self.entries:
                if e.class_label not in lookup:
                    raise DataError(
                        f"{e.image}: class label {e.class_label!r} is not among the classes "
                        f"{', '.join(self.class_names)}"
                    )
                self._labels.append(lookup[e.class_label])  # type: ignore[index]
        settings = json.dumps(preprocessing.to_dict(), sort_keys=True)
        items = [
            {
                "image": str(e.image),
                "mask": None if e.mask is None else str(e.mask),
                # for PersistentDataset's hash key only: stale caches are not reused
                "stamp": [_file_stamp(e.image), _file_stamp(e.mask)],
                "preprocessing": settings,
                "format": _CACHE_FORMAT,
                **({"segmentation": None if e.segmentation is None else str(e.segmentation),
                    "label_stamp": _file_stamp(e.segmentation)} if self.condition_labels else {}),
            }
            for e in self.entries
        ]
        transform = Compose([PreprocessItem(preprocessing, with_labels=bool(self.condition_labels))])
        if cache not in CACHE_MODES:
            raise ConfigError(f"cache must be one of {', '.join(CACHE_MODES)}; got {cache!r}")
        if cache == "memory":
            with _medidiff_errors():
                self._volumes = CacheDataset(
                    items, transform, cache_rate=1.0, num_workers=max(1, cache_workers),
                    progress=progress, copy_cache=False,
                )
        elif cache == "disk":
            if cache_dir is None:
                raise ConfigError("cache='disk' needs a cache_dir (config key data.cache_dir)")
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            self._volumes = PersistentDataset(items, transform, cache_dir=Path(cache_dir))
        else:
            self._volumes = Dataset(items, transform)
        self._intensity: list[tuple[float, float]] | None = None

    def volume(self, index: int) -> dict[str, torch.Tensor]:
        """The cached preprocessed volume ``index``: ``image`` (X, Y, Z), ``affine``, ..."""
        with _medidiff_errors():
            return self._volumes[index]

    def preprocessing_dict(self) -> dict[str, Any]:
        """The preprocessing settings as a JSON-serialisable dict (for checkpoints)."""
        return self.preprocessing.to_dict()

    @property
    def intensity_reference(self) -> dict[str, Any]:
        """A typical intensity map of the training volumes (median ``a_min``/``a_max``).

        Pass it to :func:`intensity_to_native` to put synthetic images (no native scan
        of their own) on the training data's intensity scale.
        """
        if self._intensity is None:
            self._intensity = [
                (float(v["a_min"]), float(v["a_max"])) for v in map(self.volume, range(len(self.entries)))
            ]
        lows, highs = zip(*self._intensity)
        scheme = "window" if self.preprocessing.modality == "ct" else "percentile"
        return {
            "scheme": scheme, "a_min": float(np.median(lows)), "a_max": float(np.median(highs)),
            "b_min": 0.0, "b_max": 1.0, "clip": self.preprocessing.clip, "num_volumes": len(lows),
        }

    @property
    def input_profile(self) -> dict[str, Any] | None:
        """What the training scans look like, as stored with the weights
        (:class:`~medidiff.data.profile.InputProfile`, measured once on up to 8 scans spread
        over the datalist); ``None`` when none could be read."""
        if not hasattr(self, "_input_profile"):
            from medidiff.data.profile import profile_entries

            profile = profile_entries(self.entries, self.preprocessing)
            self._input_profile = None if profile is None else profile.to_dict()
        return self._input_profile

    def _label_item(self, volume_index: int) -> dict[str, torch.Tensor]:
        if self._labels is None:
            return {}
        return {"class_label": torch.tensor(self._labels[volume_index], dtype=torch.long)}

    def label_map(self, volume_index: int) -> np.ndarray:
        """The label map ``(X, Y, Z)`` uint8 of volume ``volume_index`` on the model grid
        (values ``i + 1`` for ``condition_labels[i]``, see :mod:`medidiff.data.labels`)."""
        from medidiff.data.labels import compose_label_map

        if self.condition_labels is None:
            raise ConfigError("this dataset serves no label maps (no condition_labels)")
        item = self.volume(volume_index)
        kind = self.entries[volume_index].extra.get("kind")
        return compose_label_map(
            self.condition_labels, brain=item["brain"].numpy(), lesion=item["lesion"].numpy(),
            kind=None if kind is None else str(kind),
        )

    def _condition_item(self, label_map: np.ndarray) -> dict[str, torch.Tensor]:
        """``condition``: the one-hot channels ``(L, *spatial)`` of a label map."""
        from medidiff.data.labels import one_hot

        if self.condition_labels is None:
            return {}
        return {"condition": torch.from_numpy(one_hot(label_map, len(self.condition_labels)))}


class SliceDataset(PreprocessedDataset):
    """Axial slices of preprocessed volumes for 2D models.

    The slice index (which ``(volume, z)`` pairs pass the foreground filter) is built
    once, at construction, from the cached volumes. Slices run along the last axis of
    the RAS model grid (z, inferior to superior).

    Args:
        entries: the datalist.
        preprocessing: the settings.
        min_foreground: keep slices whose foreground fraction (mask > 0 if the entry has
            a mask, else the preprocessed foreground) is at least this (0 keeps all).
        cache, cache_dir, class_names, cache_workers, progress: see
            :class:`PreprocessedDataset`.

    Items are dicts: ``image`` ``(1, X, Y)`` float32, ``volume`` and ``slice`` (ints),
    and ``class_label`` (int64 index into ``class_names``) when class labels are served.
    """

    spatial_dims = 2

    def __init__(
        self,
        entries: Sequence[DatalistEntry],
        preprocessing: Preprocessing,
        *,
        min_foreground: float = 0.1,
        cache: str = "memory",
        cache_dir: str | os.PathLike | None = None,
        class_names: Sequence[str] | None = None,
        cache_workers: int = 1,
        progress: bool = False,
        condition_labels: Sequence[str] | None = None,
    ) -> None:
        if not 0 <= min_foreground <= 1:
            raise ConfigError(f"min_foreground must lie in [0, 1]; got {min_foreground}")
        super().__init__(
            entries, preprocessing, cache=cache, cache_dir=cache_dir, class_names=class_names,
            cache_workers=cache_workers, progress=progress, condition_labels=condition_labels,
        )
        self.min_foreground = float(min_foreground)
        volume_ids, slice_ids, intensity = [], [], []
        for v in range(len(self.entries)):
            item = self.volume(v)
            keep = np.flatnonzero(item["slice_foreground"].numpy() >= self.min_foreground)
            volume_ids.append(np.full(len(keep), v))
            slice_ids.append(keep)
            intensity.append((float(item["a_min"]), float(item["a_max"])))
        self._intensity = intensity
        self._volume_ids = np.concatenate(volume_ids).astype(np.int64)
        self._slice_ids = np.concatenate(slice_ids).astype(np.int64)

    def __len__(self) -> int:
        return len(self._volume_ids)

    def oversampled_indices(self, factors: Mapping[str, int]) -> np.ndarray:
        """Slice indices with each slice that shows a label of ``factors`` repeated
        ``factors[label]`` times (the largest factor among the labels it shows; 1 for the
        others), in index order: the epoch of ``train.oversample``."""
        if self.condition_labels is None:
            raise ConfigError("oversampling needs label maps (conditioning.labels)")
        unknown = set(factors) - set(self.condition_labels)
        if unknown:
            raise ConfigError(f"oversample: {sorted(unknown)} not among the condition labels {list(self.condition_labels)}")
        value_factor = np.ones(len(self.condition_labels) + 1, np.int64)
        for name, factor in factors.items():
            value_factor[list(self.condition_labels).index(name) + 1] = int(factor)
        repeats = np.ones(len(self), np.int64)
        for v in np.unique(self._volume_ids):
            rows = np.flatnonzero(self._volume_ids == v)
            label_map = self.label_map(int(v))
            for row in rows:
                present = np.unique(label_map[:, :, self._slice_ids[row]])
                repeats[row] = value_factor[present].max()
        return np.repeat(np.arange(len(self)), repeats)

    def __getitem__(self, index: int) -> dict[str, Any]:
        v, z = int(self._volume_ids[index]), int(self._slice_ids[index])
        image = self.volume(v)["image"][:, :, z]
        condition = self._condition_item(self.label_map(v)[:, :, z]) if self.condition_labels else {}
        return {"image": image[None].clone(), "volume": v, "slice": z, **self._label_item(v), **condition}


class VolumeDataset(PreprocessedDataset):
    """Whole preprocessed volumes, or seeded random patches, for 3D models.

    Args:
        entries: the datalist.
        preprocessing: the settings.
        patch_size: ``(px, py, pz)`` to serve random patches (uniform positions inside
            the model grid), or ``None`` for whole volumes.
        seed: the ``n``-th patch of volume ``index`` after ``set_epoch(epoch)`` comes
            from ``numpy.random.default_rng((seed, epoch, index, n))``. Calling
            :meth:`set_epoch` each epoch (as with ``DistributedSampler``) makes the
            patches reproducible whatever the worker count or rank; without it, each
            access in a process still draws a new patch (n counts the draws).
        cache, cache_dir, class_names, cache_workers, progress: see
            :class:`PreprocessedDataset`.

    Items are dicts: ``image`` ``(1, X, Y, Z)`` (or ``(1, px, py, pz)``) float32,
    ``volume`` (int), ``patch_start`` (3 ints, zeros for whole volumes) and
    ``class_label`` when class labels are served.
    """

    spatial_dims = 3

    def __init__(
        self,
        entries: Sequence[DatalistEntry],
        preprocessing: Preprocessing,
        *,
        patch_size: Sequence[int] | None = None,
        seed: int = 0,
        cache: str = "memory",
        cache_dir: str | os.PathLike | None = None,
        class_names: Sequence[str] | None = None,
        cache_workers: int = 1,
        progress: bool = False,
        condition_labels: Sequence[str] | None = None,
    ) -> None:
        self.patch_size = None if patch_size is None else _patch_size(patch_size, preprocessing.shape)
        super().__init__(
            entries, preprocessing, cache=cache, cache_dir=cache_dir, class_names=class_names,
            cache_workers=cache_workers, progress=progress, condition_labels=condition_labels,
        )
        self.seed = int(seed)
        self.epoch = 0
        self._draws = np.zeros(len(self.entries), dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Select the patches of ``epoch`` and restart the draw counts (no effect on whole volumes)."""
        self.epoch = int(epoch)
        self._draws[:] = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.volume(index)["image"]
        label_map = self.label_map(index) if self.condition_labels else None
        start = (0, 0, 0)
        if self.patch_size is not None:
            index = int(index)
            rng = np.random.default_rng((self.seed, self.epoch, index, int(self._draws[index])))
            self._draws[index] += 1
            limits = np.asarray(image.shape) - np.asarray(self.patch_size)
            start = tuple(int(rng.integers(0, lim + 1)) for lim in limits)
            window = tuple(slice(s, s + p) for s, p in zip(start, self.patch_size))
            image = image[window]
            label_map = None if label_map is None else label_map[window]
        condition = self._condition_item(label_map) if label_map is not None else {}
        return {
            "image": image[None].clone(), "volume": int(index),
            "patch_start": torch.tensor(start, dtype=torch.long), **self._label_item(index), **condition,
        }


def _patch_size(patch_size: Sequence[int], shape: Sequence[int]) -> tuple[int, int, int]:
    values = list(patch_size) if isinstance(patch_size, Sequence) else [patch_size]
    if len(values) != 3 or not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) and p > 0 for p in values):
        raise ConfigError(f"patch_size must be 3 positive integers; got {patch_size!r}")
    if any(p > s for p, s in zip(values, shape)):
        raise ConfigError(
            f"patch_size {tuple(values)} exceeds the model grid preprocessing.shape {tuple(shape)}"
        )
    return tuple(int(p) for p in values)  # type: ignore[return-value]


def build_dataset(
    entries: Sequence[DatalistEntry],
    preprocessing: Preprocessing,
    *,
    spatial_dims: int,
    min_foreground: float = 0.1,
    patch_size: Sequence[int] | None = None,
    seed: int = 0,
    cache: str = "memory",
    cache_dir: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
    cache_workers: int = 1,
    progress: bool = False,
    condition_labels: Sequence[str] | None = None,
) -> PreprocessedDataset:
    """The dataset a ``spatial_dims``-D model trains on.

    Args:
        entries: the datalist (see :func:`load_datalist`).
        preprocessing: the settings.
        spatial_dims: 2 -> :class:`SliceDataset`, 3 -> :class:`VolumeDataset`.
        min_foreground: 2D only, see :class:`SliceDataset`.
        patch_size: 3D only, see :class:`VolumeDataset`.
        seed: 3D patches' seed.
        cache: ``memory``, ``disk`` (needs ``cache_dir``) or ``none``.
        cache_dir: folder for the disk cache.
        class_names: serve class labels as indices into this list (e.g.
            :func:`class_names_of`); ``None`` serves none.
        cache_workers: threads that fill the memory cache.
        progress: show MONAI's cache progress bar.
        condition_labels: serve ``condition``, the one-hot label-map channels of a
            mask-conditioned model (:mod:`medidiff.data.labels`), for these label names.

    Returns:
        A :class:`SliceDataset` or :class:`VolumeDataset`; both work with
        ``DataLoader`` and ``DistributedSampler`` (each rank caches every volume).
    """
    common = dict(cache=cache, cache_dir=cache_dir, class_names=class_names,
                  cache_workers=cache_workers, progress=progress, condition_labels=condition_labels)
    if spatial_dims == 2:
        if patch_size is not None:
            raise ConfigError("patch_size applies to 3D models (spatial_dims=3); 2D models see whole slices")
        return SliceDataset(entries, preprocessing, min_foreground=min_foreground, **common)
    if spatial_dims == 3:
        return VolumeDataset(entries, preprocessing, patch_size=patch_size, seed=seed, **common)
    raise ConfigError(f"spatial_dims must be 2 or 3; got {spatial_dims!r}")


def _resolve_datalist(datalist: str, config_dir: Path | None) -> str:
    path = Path(os.path.expanduser(datalist))
    if config_dir is not None and not path.is_absolute():
        candidate = config_dir / path
        if candidate.exists() or glob.glob(str(candidate)):
            return str(candidate)
    return str(path)


def build_training_dataset(
    config: Any,
    *,
    run_dir: str | os.PathLike | None = None,
    config_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> PreprocessedDataset:
    """The training dataset a :class:`medidiff.config.Config` describes.

    Reads ``config.data`` (``datalist`` resolved against ``config_dir`` first, then the
    working directory; ``split``, ``preprocessing``, ``min_foreground``, ``patch_size``,
    ``cache``, ``cache_dir`` (default ``RUN_DIR/cache``)), ``config.model.spatial_dims``,
    ``config.model.num_class_embeds`` (class labels are served when set) and
    ``config.train.seed``.

    Returns:
        The dataset from :func:`build_dataset`.
    """
    data = config.data
    source = _resolve_datalist(data.datalist, Path(config_dir) if config_dir else None)
    entries = load_datalist(source, split=data.split)
    preprocessing = Preprocessing.from_dict(data.preprocessing, prefix="data.preprocessing")
    class_names = None
    n_classes = getattr(config.model, "num_class_embeds", None)
    if n_classes:
        class_names = class_names_of(entries)
        if len(class_names) > n_classes:
            raise ConfigError(
                f"config key 'model.num_class_embeds' is {n_classes} but the datalist has "
                f"{len(class_names)} classes ({', '.join(class_names)})"
            )
    cache_dir = data.cache_dir
    if data.cache == "disk" and cache_dir is None:
        if run_dir is None:
            raise ConfigError("config key 'data.cache_dir' is needed for data.cache: disk")
        cache_dir = Path(run_dir) / "cache"
    return build_dataset(
        entries, preprocessing, spatial_dims=int(config.model.spatial_dims),
        min_foreground=data.min_foreground, patch_size=data.patch_size,
        seed=int(getattr(config.train, "seed", 0)), cache=data.cache, cache_dir=cache_dir,
        class_names=class_names, progress=progress,
        condition_labels=_condition_labels(config),
    )


def _condition_labels(config: Any) -> list[str] | None:
    conditioning = getattr(config, "conditioning", None)
    if conditioning is None or conditioning.mask == "none":
        return None
    return list(conditioning.labels)


__all__ = [
    "CACHE_MODES",
    "CT_WINDOWS",
    "DatalistEntry",
    "PreparedScan",
    "Preprocessed",
    "PreprocessedDataset",
    "Preprocessing",
    "SliceDataset",
    "VolumeDataset",
    "build_dataset",
    "build_training_dataset",
    "class_names_of",
    "stratified_by_kind",
    "intensity_to_model",
    "intensity_to_native",
    "load_datalist",
    "prepare_entry",
    "preprocess",
    "to_model",
    "to_native",
]
