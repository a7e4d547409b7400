"""Invertible preprocessing of MRI and CT volumes onto a fixed model grid.

The chain, built from MONAI transforms on :class:`monai.data.MetaTensor` so the affine is
tracked at every step:

1. ``Orientation("RAS")``: reorder/flip the voxel axes (exact, no interpolation).
2. ``Spacing(spacing)``: resample to the target voxel size (trilinear for the image,
   nearest neighbour for a mask). MONAI keeps the orientation and any rotation of the
   scanner grid (``diagonal=False``), so an oblique scan stays oblique in world space.
3. ``SpatialCrop`` + ``BorderPad``: crop to the foreground bounding box, then crop/pad
   symmetrically to the configured ``shape``, so the grid's centre is the centre of the
   foreground's bounding box (padding with the image minimum, i.e. background).
4. ``ScaleIntensityRange``: MRI: the 1st/99th percentiles *inside the foreground* map
   to 0/1 (Behrendt et al. 2023's protocol); CT: an HU window maps to [0, 1].

Inversion (:func:`to_native`) does not replay MONAI's ``applied_operations`` stack:
model outputs (anomaly maps, reconstructions) are new tensors without that stack, and
cached items lose it. Instead, the model grid's affine (tracked exactly by the forward
MetaTensors) and the native grid's affine define the geometric inverse, which
``monai.transforms.SpatialResample`` applies in one interpolation step, filling 0 outside
the cropped field of view. Tests check it against MONAI's own ``inverse()`` of the same
chain.

The settings are a :class:`~medidiff.data.preprocessing.Preprocessing`. The same chain as
MONAI dictionary transforms, to drop into your own pipeline and invert with MONAI's
``Compose.inverse`` / ``Invertd``, is :func:`medidiff.data.compose.preprocessing_transforms`.

Example:
    >>> import numpy as np
    >>> from medidiff.io import Volume, check_same_grid
    >>> from medidiff.data.transforms import Preprocessing, preprocess, to_native
    >>> arr = np.zeros((20, 24, 16), np.float32); arr[4:16, 5:20, 3:13] = np.linspace(1, 100, 10)
    >>> vol = Volume(arr, np.diag([2.0, 2.0, 2.0, 1.0]))
    >>> pre = preprocess(vol, Preprocessing(shape=(16, 16, 16)))
    >>> pre.image.shape, float(pre.image.max())
    ((16, 16, 16), 1.0)
    >>> to_native(pre.image, pre, vol).shape
    (20, 24, 16)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medidiff.data.preprocessing import (
    CT_WINDOWS,
    DEFAULT_FOREGROUND_THRESHOLD,
    MODEL_MAX,
    MODEL_MIN,
    Preprocessing,
)
from medidiff.errors import ConfigError, VolumeContentError
from medidiff.io import Volume, check_same_grid

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
_INTERPOLATION = {"linear": "bilinear", "nearest": "nearest"}


@dataclass(frozen=True, eq=False)
class Preprocessed:
    """A volume on the model grid, plus what is needed to go back.

    Attributes:
        image: ``(X, Y, Z)`` float32 intensities in [0, 1] (unless ``clip=False``).
        mask: ``(X, Y, Z)`` the mask given to :func:`preprocess`, resampled with nearest
            neighbour, in its own dtype (0 where padded); ``None`` without a mask.
        foreground: ``(X, Y, Z)`` bool, native intensity ``> foreground_threshold``
            (False where padded).
        affine: ``(4, 4)`` float64 model-grid voxel-to-world matrix (RAS mm).
        intensity: the intensity map used, JSON-serialisable: ``scheme``
            (``"percentile"`` or ``"window"``), ``a_min``/``a_max`` (native values mapped
            to ``b_min``/``b_max`` = 0/1), ``clip``, and for MRI ``lower_percentile``,
            ``upper_percentile`` (so ``a_min`` is p1, ``a_max`` p99), for CT ``window``,
            ``window_center``, ``window_width``.
        native_affine: ``(4, 4)`` the input volume's affine (on-disk voxel order).
        native_shape: the input volume's shape.
        box_start: index of the model grid's first voxel in the oriented, resampled
            grid (negative where the grid was padded); provenance for debugging.
        source: the input's ``meta["source"]`` (file path) if known.
    """

    image: np.ndarray
    mask: np.ndarray | None
    foreground: np.ndarray
    affine: np.ndarray
    intensity: Mapping[str, Any]
    native_affine: np.ndarray
    native_shape: tuple[int, int, int]
    box_start: tuple[int, int, int]
    source: str | None = None


def _to_metatensor(array: np.ndarray, affine: np.ndarray):
    import torch
    from monai.data import MetaTensor

    data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    return MetaTensor(data, affine=torch.as_tensor(affine, dtype=torch.float64))


def _orient_resample(tensor, spacing: Sequence[float], mode: str):
    """Steps 1-2: MONAI Orientation to RAS, then Spacing to ``spacing`` mm."""
    from monai.transforms import Orientation, Spacing

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        tensor = Orientation(axcodes="RAS", labels=_RAS_LABELS)(tensor)
    padding = "border" if mode == "bilinear" else "zeros"
    return Spacing(pixdim=tuple(spacing), mode=mode, padding_mode=padding, dtype=np.float32)(tensor)


def _foreground_box(foreground: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box ``[start, end)`` per axis of a non-empty boolean array."""
    start, end = [], []
    for axis in range(foreground.ndim):
        others = tuple(a for a in range(foreground.ndim) if a != axis)
        idx = np.flatnonzero(foreground.any(axis=others))
        start.append(int(idx[0]))
        end.append(int(idx[-1]) + 1)
    return np.asarray(start), np.asarray(end)


def _crop_pad(tensor, lo: np.ndarray, hi: np.ndarray, value: float):
    """Step 3 with MONAI: crop ``[lo, hi)`` (clipped to the grid), pad the rest with ``value``."""
    from monai.transforms import BorderPad, SpatialCrop

    size = np.asarray(tensor.shape[1:])
    start, end = np.maximum(lo, 0), np.minimum(hi, size)
    tensor = SpatialCrop(roi_start=start.tolist(), roi_end=end.tolist())(tensor)
    before, after = np.maximum(-lo, 0), np.maximum(hi - size, 0)
    if before.any() or after.any():
        border = [int(b) for pair in zip(before, after) for b in pair]
        tensor = BorderPad(spatial_border=border, mode="constant", value=value)(tensor)
    return tensor


def crop_pad_numpy(array: np.ndarray, lo: np.ndarray, hi: np.ndarray, value: Any) -> np.ndarray:
    """Step 3 on a plain array: the window ``[lo, hi)``, ``value`` where it leaves the grid."""
    size = np.asarray(array.shape)
    start, end = np.maximum(lo, 0), np.minimum(hi, size)
    cropped = array[tuple(slice(s, e) for s, e in zip(start, end))]
    pads = [(int(b), int(a)) for b, a in zip(np.maximum(-lo, 0), np.maximum(hi - size, 0))]
    return np.pad(cropped, pads, constant_values=value)


def intensity_map(pre: Preprocessing, image: np.ndarray, foreground: np.ndarray, source: str) -> dict:
    """The linear map a_min -> 0, a_max -> 1 for this volume."""
    if pre.modality == "ct":
        center, width = pre.ct_window  # type: ignore[misc]
        # HU window: [L - W/2, L + W/2] -> [0, 1], e.g. brain W80 L40: 0 HU -> 0, 80 HU -> 1
        return {
            "scheme": "window", "window": pre.window, "window_center": center,
            "window_width": width, "a_min": center - width / 2.0, "a_max": center + width / 2.0,
            "b_min": MODEL_MIN, "b_max": MODEL_MAX, "clip": pre.clip,
        }
    values = image[foreground]
    p_lo, p_hi = np.percentile(values, [pre.lower_percentile, pre.upper_percentile])
    if not p_hi > p_lo:
        raise VolumeContentError(
            f"{source}: the foreground's percentiles p{pre.lower_percentile:g} and "
            f"p{pre.upper_percentile:g} are equal ({float(p_lo):g}); "
            "the image is constant inside the foreground and cannot be rescaled"
        )
    return {
        "scheme": "percentile", "lower_percentile": pre.lower_percentile,
        "upper_percentile": pre.upper_percentile, "a_min": float(p_lo), "a_max": float(p_hi),
        "b_min": MODEL_MIN, "b_max": MODEL_MAX, "clip": pre.clip,
    }


def preprocess(volume: Volume, preprocessing: Preprocessing, *, mask: Volume | None = None,
               warn_crop: bool = True) -> Preprocessed:
    """Bring ``volume`` (and an optional ``mask`` on the same grid) onto the model grid.

    Orientation to RAS, resampling to ``preprocessing.spacing`` (linear for the image,
    nearest for the mask), crop/pad to ``preprocessing.shape`` centred on the
    foreground's bounding box, intensity rescale to [0, 1]. The foreground (native
    intensity ``> foreground_threshold``) sets both the box and, for MRI, the percentiles.
    The mask (a brain mask or a label map) only travels along; it does not define the
    foreground.

    Args:
        volume: the scan, any orientation and spacing.
        preprocessing: the settings.
        mask: optional mask/label volume with the same shape and affine as ``volume``.
        warn_crop: emit a ``UserWarning`` when the foreground is larger than the grid (its
            edges are cropped); callers that report it their own way (the anomaly
            detector's input check) pass ``False``.

    Returns:
        The :class:`Preprocessed` result.

    Raises:
        VolumeContentError: a 2D image (an axis of size 1), no voxel above the
            foreground threshold (e.g. a constant volume), a constant foreground (MRI),
            or a mask on another grid.
    """
    from monai.transforms import ScaleIntensityRange

    source = str(volume.meta.get("source", "volume"))
    _check_input(volume, mask, source)
    threshold = preprocessing.foreground_threshold

    # 1-2. orientation and spacing (MONAI, affine tracked by the MetaTensor)
    image_t = _orient_resample(_to_metatensor(volume.array, volume.affine), preprocessing.spacing, "bilinear")
    resampled = image_t[0].numpy()
    foreground_full = resampled > threshold
    if not foreground_full.any():
        raise no_foreground_error(volume.array, preprocessing, source)

    # 3. a window of `shape` voxels centred on the foreground's bounding box
    lo, hi = model_window(foreground_full, preprocessing.shape, source, stacklevel=3, warn=warn_crop)
    image_t = _crop_pad(image_t, lo, hi, float(resampled.min()))
    foreground = crop_pad_numpy(foreground_full, lo, hi, False)

    # 4. intensity: a_min -> 0, a_max -> 1 (MONAI ScaleIntensityRange)
    intensity = intensity_map(preprocessing, image_t[0].numpy(), foreground, source)
    scaled = ScaleIntensityRange(
        a_min=intensity["a_min"], a_max=intensity["a_max"], b_min=MODEL_MIN, b_max=MODEL_MAX,
        clip=preprocessing.clip,
    )(image_t)

    return Preprocessed(
        image=np.ascontiguousarray(scaled[0].numpy(), dtype=np.float32),
        mask=None if mask is None else _mask_to_model(mask, preprocessing, lo, hi),
        foreground=foreground,
        affine=np.asarray(scaled.affine, dtype=np.float64),
        intensity=intensity,
        native_affine=np.asarray(volume.affine, dtype=np.float64),
        native_shape=tuple(int(s) for s in volume.shape),  # type: ignore[arg-type]
        box_start=tuple(int(v) for v in lo),  # type: ignore[arg-type]
        source=volume.meta.get("source"),
    )


def preprocess_label_map(volume: Volume, preprocessing: Preprocessing) -> Preprocessed:
    """Bring a label map alone (no image) onto the model grid, as :func:`preprocess` would.

    Orientation to RAS and resampling by nearest neighbour, then the window of
    ``preprocessing.shape`` voxels centred on the labelled voxels' (value > 0) bounding
    box: the steps :func:`preprocess` applies, with the labels as the foreground. For a
    mask-conditioned model's map given without a scan (``medidiff synthesize --mask``).

    Returns:
        A :class:`Preprocessed` whose ``mask`` is the map on the model grid (its own
        dtype), ``foreground`` the labelled voxels, ``image`` zeros and ``intensity``
        empty; :func:`to_native` takes model-grid arrays back to the map's grid.

    Raises:
        VolumeContentError: not a 3D volume, or no labelled voxel.
    """
    source = str(volume.meta.get("source", "label map"))
    _check_input(volume, None, source)
    values = np.asarray(volume.array)
    mapped = _orient_resample(_to_metatensor(values.astype(np.float32), volume.affine),
                              preprocessing.spacing, "nearest")
    resampled = mapped[0].numpy()
    if not (resampled > 0).any():
        raise VolumeContentError(f"{source}: the label map has no labelled voxel (all 0)")
    lo, hi = model_window(resampled > 0, preprocessing.shape, source, stacklevel=3)
    cropped = _crop_pad(mapped, lo, hi, 0.0)
    model_map = _cast_like(cropped[0].numpy(), values.dtype)
    return Preprocessed(
        image=np.zeros(model_map.shape, np.float32),
        mask=model_map,
        foreground=model_map > 0,
        affine=np.asarray(cropped.affine, dtype=np.float64),
        intensity={},
        native_affine=np.asarray(volume.affine, dtype=np.float64),
        native_shape=tuple(int(s) for s in volume.shape),  # type: ignore[arg-type]
        box_start=tuple(int(v) for v in lo),  # type: ignore[arg-type]
        source=volume.meta.get("source"),
    )


def _check_input(volume: Volume, mask: Volume | None, source: str) -> None:
    if volume.array.ndim != 3:
        raise VolumeContentError(f"{source}: preprocessing needs a 3D volume; got shape {volume.shape}")
    if 1 in volume.shape:
        # a single slice (2D image) resampled onto a volume grid would be one thin plane
        # padded with background: scoring or training on it is meaningless
        raise VolumeContentError(
            f"{source}: a 2D image ({' x '.join(map(str, volume.shape))} voxels) where a 3D "
            "volume is needed; give the whole scan (for DICOM, the series folder)"
        )
    if mask is not None:
        check_same_grid(volume, mask)


def no_foreground_error(native: Any, preprocessing: Preprocessing, source: str) -> VolumeContentError:
    """The error for a volume with no voxel above the foreground threshold."""
    lo_value, hi_value = np.min(native), np.max(native)
    hint = (
        f"every voxel is {float(lo_value):g} (a constant volume): there is no image to "
        "score or train on" if lo_value == hi_value else
        "check the modality or set preprocessing.foreground_threshold"
    )
    return VolumeContentError(
        f"{source}: no voxel above the foreground threshold "
        f"{preprocessing.foreground_threshold:g} (modality {preprocessing.modality}); {hint}"
    )


def model_window(
    foreground: np.ndarray, shape: Sequence[int], source: str, *, stacklevel: int = 2,
    warn: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Step 3's window ``[lo, hi)``: ``shape`` voxels centred on the foreground's bounding box.

    Symmetric up to one voxel (``lo = box_lo + floor((extent - shape) / 2)``); ``lo`` is
    negative and ``hi`` beyond the grid where the window must be padded. Warns (unless
    ``warn=False``) when the foreground is larger than ``shape`` (its edges are then cropped).
    """
    target = np.asarray(shape)
    box_lo, box_hi = _foreground_box(foreground)
    extent = box_hi - box_lo
    lo = box_lo + (extent - target) // 2  # floor: symmetric up to one voxel
    if warn and (extent > target).any():
        warnings.warn(
            f"{source}: the foreground's extent {tuple(int(e) for e in extent)} voxels exceeds "
            f"the model grid {tuple(int(t) for t in target)}; its edges are cropped",
            stacklevel=stacklevel,
        )
    return lo, lo + target


def _mask_to_model(mask: Volume, preprocessing: Preprocessing, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The mask through steps 1-3 (nearest neighbour, padded with 0), in its own dtype."""
    mask_t = _orient_resample(_to_metatensor(mask.array, mask.affine), preprocessing.spacing, "nearest")
    mask_t = _crop_pad(mask_t, lo, hi, 0.0)
    return _cast_like(mask_t[0].numpy(), np.asarray(mask.array).dtype)


def _cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer) or dtype == bool:
        return np.rint(values).astype(dtype)
    return values.astype(np.float32 if dtype == np.float64 else dtype)


def _resample(array: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
              dst_shape: Sequence[int], interpolation: str) -> np.ndarray:
    """Resample ``array`` from one grid to another through their world affines.

    ``monai.transforms.SpatialResample`` maps each destination voxel centre to world
    space (``dst_affine``), then into the source's voxel space (``src_affine^-1``) and
    interpolates there; outside the source grid it fills 0.
    """
    from monai.transforms import SpatialResample

    if interpolation not in _INTERPOLATION:
        raise ConfigError(f"interpolation must be 'linear' or 'nearest'; got {interpolation!r}")
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D array (X, Y, Z); got shape {array.shape}")
    import torch

    resample = SpatialResample(mode=_INTERPOLATION[interpolation], padding_mode="zeros", dtype=torch.float32)
    out = resample(
        _to_metatensor(array, src_affine),
        dst_affine=torch.as_tensor(dst_affine, dtype=torch.float64),
        spatial_size=tuple(int(s) for s in dst_shape),
    )
    values = out[0].numpy() if hasattr(out[0], "numpy") else np.asarray(out[0])
    if interpolation == "nearest":
        return _cast_like(values, array.dtype)
    values = np.array(values, dtype=np.float32)
    # Exactly 0 outside the source's support: float rounding in the coordinate map gives
    # voxels just outside (source coordinate -1 - 1e-7) weights of ~1e-7 in grid_sample.
    values[~_support(src_affine, array.shape, dst_affine, dst_shape)] = 0.0
    return values


def _support(src_affine: np.ndarray, src_shape: Sequence[int], dst_affine: np.ndarray,
             dst_shape: Sequence[int], tol: float = 1e-4) -> np.ndarray:
    """Destination voxels that linear interpolation of the source can reach.

    A destination voxel's source coordinate ``c = src_affine^-1 @ dst_affine @ (i, j, k)``
    gets a non-zero linear weight from the source grid iff ``-1 < c < n`` on every axis.
    """
    xform = np.linalg.solve(src_affine, dst_affine)
    axes = [np.arange(n, dtype=np.float64) for n in dst_shape]
    inside = np.ones(tuple(int(n) for n in dst_shape), dtype=bool)
    for a, n in enumerate(src_shape):
        plane = np.add.outer(xform[a, 0] * axes[0], xform[a, 1] * axes[1])  # (X, Y)
        c = np.add.outer(plane, xform[a, 2] * axes[2] + xform[a, 3])  # (X, Y, Z)
        inside &= c > -1.0 + tol
        inside &= c < n - tol
    return inside


def to_native(
    model_array: np.ndarray,
    preprocessed: Preprocessed,
    reference: Volume | None = None,
    *,
    interpolation: str = "linear",
) -> np.ndarray:
    """Take a model-grid array back to the native grid of the preprocessed volume.

    The result has the native shape and on-disk voxel order, so
    ``reference.with_array(result)`` overlays the input exactly. Voxels outside the
    model grid's field of view are 0. Intensities are not changed; see
    :func:`intensity_to_native` for reconstructions.

    Args:
        model_array: ``(X, Y, Z)`` on the model grid, e.g. an anomaly map.
        preprocessed: the :func:`preprocess` result the array belongs to.
        reference: the grid to resample onto; default: the grid of the volume that was
            preprocessed (``preprocessed.native_affine`` / ``native_shape``).
        interpolation: ``"linear"`` (maps, reconstructions) or ``"nearest"`` (labels;
            the result keeps the input's dtype).

    Returns:
        The array on the native grid: float32 for linear, the input dtype for nearest.
    """
    model_array = np.asarray(model_array)
    if model_array.shape != preprocessed.image.shape:
        raise ValueError(
            f"model_array has shape {model_array.shape}; the model grid is {preprocessed.image.shape}"
        )
    dst_affine = preprocessed.native_affine if reference is None else reference.affine
    dst_shape = preprocessed.native_shape if reference is None else reference.shape
    return _resample(model_array, preprocessed.affine, dst_affine, dst_shape, interpolation)


def to_model(
    native_array: np.ndarray,
    preprocessed: Preprocessed,
    reference: Volume | None = None,
    *,
    interpolation: str = "nearest",
) -> np.ndarray:
    """Put another array of the native grid (e.g. a ground-truth segmentation) onto the model grid.

    Geometrically identical to the preprocessing chain (one resampling through the
    affines); no intensity change.

    Args:
        native_array: ``(X, Y, Z)`` on the native grid (or on ``reference``'s grid).
        preprocessed: the :func:`preprocess` result that defines the model grid.
        reference: the grid ``native_array`` lives on; default the preprocessed volume's.
        interpolation: ``"nearest"`` (labels, keeps dtype) or ``"linear"``.

    Returns:
        ``(X, Y, Z)`` on the model grid, 0 outside the native field of view.
    """
    src_affine = preprocessed.native_affine if reference is None else reference.affine
    src_shape = preprocessed.native_shape if reference is None else reference.shape
    native_array = np.asarray(native_array)
    if native_array.shape != tuple(src_shape):
        raise ValueError(f"native_array has shape {native_array.shape}; the native grid is {tuple(src_shape)}")
    return _resample(native_array, src_affine, preprocessed.affine, preprocessed.image.shape, interpolation)


def intensity_to_native(model_values: Any, intensity: Preprocessed | Mapping[str, Any]) -> np.ndarray:
    """Undo the intensity rescale: model values in [0, 1] -> native units (MRI a.u., CT HU).

    ``x_native = a_min + (x_model - b_min) * (a_max - a_min) / (b_max - b_min)``.
    Exact for ``clip=False``; with clipping, values that were clipped come back as
    ``a_min`` or ``a_max``.

    Args:
        model_values: array (any shape) or number on the model's intensity scale.
        intensity: a :class:`Preprocessed` or its ``intensity`` dict (e.g. one stored
            with a checkpoint).

    Returns:
        float32 array of native intensities.
    """
    params = intensity.intensity if isinstance(intensity, Preprocessed) else intensity
    a_min, a_max = float(params["a_min"]), float(params["a_max"])
    b_min, b_max = float(params.get("b_min", MODEL_MIN)), float(params.get("b_max", MODEL_MAX))
    values = np.asarray(model_values, dtype=np.float64)
    return (a_min + (values - b_min) * (a_max - a_min) / (b_max - b_min)).astype(np.float32)


def intensity_to_model(native_values: Any, intensity: Preprocessed | Mapping[str, Any]) -> np.ndarray:
    """The forward intensity map (without clipping): native units -> model scale.

    Args:
        native_values: array or number in native units.
        intensity: a :class:`Preprocessed` or its ``intensity`` dict.

    Returns:
        float32 array on the model scale.
    """
    params = intensity.intensity if isinstance(intensity, Preprocessed) else intensity
    a_min, a_max = float(params["a_min"]), float(params["a_max"])
    b_min, b_max = float(params.get("b_min", MODEL_MIN)), float(params.get("b_max", MODEL_MAX))
    values = np.asarray(native_values, dtype=np.float64)
    return (b_min + (values - a_min) * (b_max - b_min) / (a_max - a_min)).astype(np.float32)


__all__ = [
    "CT_WINDOWS",
    "DEFAULT_FOREGROUND_THRESHOLD",
    "Preprocessed",
    "Preprocessing",
    "intensity_to_model",
    "intensity_to_native",
    "preprocess",
    "preprocess_label_map",
    "to_model",
    "to_native",
]
