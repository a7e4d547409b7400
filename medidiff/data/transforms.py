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

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from medidiff.errors import ConfigError, VolumeContentError
from medidiff.io import Volume, check_same_grid

#: CT display windows as ``name -> (level/centre, width)`` in Hounsfield units: the usual
#: radiology presets (Radiopaedia, "Windowing (CT)": brain W80 L40, subdural W200 L80
#: (ranges W130-300 L50-100), soft tissue W400 L50 (W350-400 L20-60), lung W1500 L-600,
#: bone W1800 L400).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (80.0, 200.0),
    "soft_tissue": (50.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}

#: Default ``foreground_threshold`` per modality: skull-stripped MRI has background 0;
#: in CT, air is about -1000 HU and anything above -500 HU is tissue (head/body).
DEFAULT_FOREGROUND_THRESHOLD = {"mri": 0.0, "ct": -500.0}

#: The model's intensity range: every scheme maps to [MODEL_MIN, MODEL_MAX].
MODEL_MIN, MODEL_MAX = 0.0, 1.0

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
_INTERPOLATION = {"linear": "bilinear", "nearest": "nearest"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Preprocessing:
    """How volumes are brought onto the model grid (a checkpoint stores this).

    Scheme-specific fields left as ``None`` take the modality's defaults in
    ``__post_init__``, so an instance always holds resolved values and
    ``Preprocessing.from_dict(p.to_dict()) == p``.

    Attributes:
        modality: ``"mri"`` or ``"ct"``.
        spacing: target voxel size in mm along the model grid's x, y, z (RAS) axes.
        shape: model grid size ``(X, Y, Z)`` in voxels, RAS order; 2D models see the
            ``(X, Y)`` axial slices along z. The default, 96 x 112 x 96 at 2 mm
            (192 x 224 x 192 mm), holds an adult brain (the sample cohort's brains span
            at most 78 x 97 x 83 voxels) and is divisible by 16 for U-Net downsampling.
        orientation: the model grid's axis codes; only ``"RAS"`` is supported.
        lower_percentile, upper_percentile: MRI only (default 1 and 99): these
            percentiles of the foreground's intensities map to 0 and 1.
        window: CT only: a preset name from :data:`CT_WINDOWS` (default ``"brain"``
            unless an explicit window is given).
        window_center, window_width: CT only: an explicit HU window (both or neither;
            not together with ``window``). ``center - width/2`` maps to 0,
            ``center + width/2`` to 1.
        clip: clip the rescaled intensities to [0, 1] (default True). Clipping keeps the
            diffusion model's data bounded (DDPM's ``clip_sample`` assumes it) at the cost
            of saturating MRI voxels brighter than the 99th percentile (1 % of the
            foreground by construction) and CT outside the window. With ``clip=False``
            the map is purely linear and :func:`intensity_to_native` inverts it exactly.
        foreground_threshold: voxels with native intensity ``<= threshold`` are
            background (default 0 for MRI, i.e. skull-stripped data; -500 HU for CT).
    """

    modality: str = "mri"
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    shape: tuple[int, int, int] = (96, 112, 96)
    orientation: str = "RAS"
    lower_percentile: float | None = None
    upper_percentile: float | None = None
    window: str | None = None
    window_center: float | None = None
    window_width: float | None = None
    clip: bool = True
    foreground_threshold: float | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        key = "preprocessing"
        if not isinstance(self.modality, str) or self.modality.lower() not in ("mri", "ct"):
            raise ConfigError(f"{key}.modality must be 'mri' or 'ct'; got {self.modality!r}")
        set_("modality", self.modality.lower())
        set_("spacing", _triple(self.spacing, f"{key}.spacing", kind=float))
        set_("shape", _triple(self.shape, f"{key}.shape", kind=int))
        if self.orientation != "RAS":
            raise ConfigError(
                f"{key}.orientation must be 'RAS' (2D models read axial slices along the "
                f"last axis of the RAS grid); got {self.orientation!r}"
            )
        if not isinstance(self.clip, bool):
            raise ConfigError(f"{key}.clip must be true or false; got {self.clip!r}")
        threshold = self.foreground_threshold
        if threshold is None:
            threshold = DEFAULT_FOREGROUND_THRESHOLD[self.modality]
        if not _is_number(threshold) or not math.isfinite(threshold):
            raise ConfigError(f"{key}.foreground_threshold must be a finite number; got {threshold!r}")
        set_("foreground_threshold", float(threshold))
        if self.modality == "mri":
            self._resolve_mri(key, set_)
        else:
            self._resolve_ct(key, set_)

    def _resolve_mri(self, key: str, set_: Any) -> None:
        for name in ("window", "window_center", "window_width"):
            if getattr(self, name) is not None:
                raise ConfigError(f"{key}.{name} applies to CT only; remove it or set {key}.modality: ct")
        lower = 1.0 if self.lower_percentile is None else self.lower_percentile
        upper = 99.0 if self.upper_percentile is None else self.upper_percentile
        for name, value in (("lower_percentile", lower), ("upper_percentile", upper)):
            if not _is_number(value) or not 0 <= value <= 100:
                raise ConfigError(f"{key}.{name} must be a number in [0, 100]; got {value!r}")
        if not lower < upper:
            raise ConfigError(
                f"{key}.lower_percentile ({lower}) must be below {key}.upper_percentile ({upper})"
            )
        set_("lower_percentile", float(lower))
        set_("upper_percentile", float(upper))

    def _resolve_ct(self, key: str, set_: Any) -> None:
        for name in ("lower_percentile", "upper_percentile"):
            if getattr(self, name) is not None:
                raise ConfigError(
                    f"{key}.{name} applies to MRI only; CT uses {key}.window or "
                    f"{key}.window_center/window_width"
                )
        explicit = (self.window_center, self.window_width)
        if self.window is not None:
            if any(v is not None for v in explicit):
                raise ConfigError(
                    f"{key}.window ({self.window!r}) and {key}.window_center/window_width "
                    "are exclusive; give a preset or an explicit window, not both"
                )
            if not isinstance(self.window, str) or self.window not in CT_WINDOWS:
                raise ConfigError(
                    f"{key}.window: unknown preset {self.window!r}; choose one of "
                    f"{', '.join(CT_WINDOWS)} or give window_center and window_width"
                )
        elif all(v is None for v in explicit):
            set_("window", "brain")
        else:
            if any(v is None for v in explicit):
                missing = "window_center" if self.window_center is None else "window_width"
                raise ConfigError(f"{key}.{missing} is missing; an explicit CT window needs both")
            if not _is_number(self.window_center) or not math.isfinite(self.window_center):
                raise ConfigError(f"{key}.window_center must be a number (HU); got {self.window_center!r}")
            if not _is_number(self.window_width) or not 0 < self.window_width < math.inf:
                raise ConfigError(f"{key}.window_width must be a positive number (HU); got {self.window_width!r}")
            set_("window_center", float(self.window_center))
            set_("window_width", float(self.window_width))

    @property
    def ct_window(self) -> tuple[float, float] | None:
        """``(center, width)`` in HU for CT, ``None`` for MRI."""
        if self.modality != "ct":
            return None
        if self.window is not None:
            return CT_WINDOWS[self.window]
        return (float(self.window_center), float(self.window_width))  # type: ignore[arg-type]

    def grid_affine(self, center: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
        """A model-grid affine (RAS, ``spacing``) whose grid centre lies at ``center`` (mm).

        Useful for writing synthetic volumes that have no native scan.

        Returns:
            ``(4, 4)`` float64 voxel-to-world matrix.
        """
        affine = np.diag([*self.spacing, 1.0])
        half = (np.asarray(self.shape, dtype=np.float64) - 1.0) / 2.0
        affine[:3, 3] = np.asarray(center, dtype=np.float64) - affine[:3, :3] @ half
        return affine

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of the resolved settings (lists for tuples)."""
        out = asdict(self)
        out["spacing"] = list(self.spacing)
        out["shape"] = list(self.shape)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, *, prefix: str = "preprocessing") -> "Preprocessing":
        """Build from a dict (e.g. a YAML section), refusing unknown keys.

        Args:
            raw: the keys of this class; missing keys take their defaults.
            prefix: how error messages name the section (e.g. ``data.preprocessing``).

        Raises:
            ConfigError: unknown key, wrong type or bad value, naming the key.
        """
        raw = {} if raw is None else raw
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{prefix} must be a mapping of settings; got {type(raw).__name__}")
        known = [f.name for f in fields(cls)]
        for k in raw:
            if k not in known:
                raise ConfigError(f"{prefix}.{k} is unknown; known keys: {', '.join(known)}")
        try:
            return cls(**dict(raw))
        except ConfigError as exc:
            if prefix != "preprocessing":
                raise ConfigError(str(exc).replace("preprocessing.", f"{prefix}.")) from None
            raise


def _triple(value: Any, key: str, *, kind: type) -> tuple:
    if kind is float and _is_number(value):
        value = (value, value, value)  # a scalar spacing means isotropic
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise ConfigError(f"{key} must be 3 positive {'integers' if kind is int else 'numbers'}; got {value!r}")
    out = []
    for v in value:
        ok = _is_number(v) and math.isfinite(v) and v > 0
        if kind is int:
            ok = ok and float(v).is_integer()
        if not ok:
            raise ConfigError(
                f"{key} must be 3 positive {'integers' if kind is int else 'numbers'}; got {list(value)!r}"
            )
        out.append(kind(v))
    return tuple(out)


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


def _crop_pad_numpy(array: np.ndarray, lo: np.ndarray, hi: np.ndarray, value: Any) -> np.ndarray:
    size = np.asarray(array.shape)
    start, end = np.maximum(lo, 0), np.minimum(hi, size)
    cropped = array[tuple(slice(s, e) for s, e in zip(start, end))]
    pads = [(int(b), int(a)) for b, a in zip(np.maximum(-lo, 0), np.maximum(hi - size, 0))]
    return np.pad(cropped, pads, constant_values=value)


def _intensity_map(pre: Preprocessing, image: np.ndarray, foreground: np.ndarray, source: str) -> dict:
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


def preprocess(volume: Volume, preprocessing: Preprocessing, *, mask: Volume | None = None) -> Preprocessed:
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

    Returns:
        The :class:`Preprocessed` result.

    Raises:
        VolumeContentError: a 2D image (an axis of size 1), no voxel above the
            foreground threshold (e.g. a constant volume), a constant foreground (MRI),
            or a mask on another grid.
    """
    from monai.transforms import ScaleIntensityRange

    source = str(volume.meta.get("source", "volume"))
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

    # 1-2. orientation and spacing (MONAI, affine tracked by the MetaTensor)
    image_t = _orient_resample(_to_metatensor(volume.array, volume.affine), preprocessing.spacing, "bilinear")
    resampled = image_t[0].numpy()
    foreground_full = resampled > preprocessing.foreground_threshold
    if not foreground_full.any():
        lo_value, hi_value = np.min(volume.array), np.max(volume.array)
        hint = (
            f"every voxel is {float(lo_value):g} (a constant volume): there is no image to "
            "score or train on" if lo_value == hi_value else
            "check the modality or set preprocessing.foreground_threshold"
        )
        raise VolumeContentError(
            f"{source}: no voxel above the foreground threshold "
            f"{preprocessing.foreground_threshold:g} (modality {preprocessing.modality}); {hint}"
        )

    # 3. a window of `shape` voxels centred on the foreground's bounding box
    target = np.asarray(preprocessing.shape)
    box_lo, box_hi = _foreground_box(foreground_full)
    extent = box_hi - box_lo
    lo = box_lo + (extent - target) // 2  # floor: symmetric up to one voxel
    hi = lo + target
    if (extent > target).any():
        warnings.warn(
            f"{source}: the foreground's extent {tuple(int(e) for e in extent)} voxels exceeds "
            f"the model grid {tuple(preprocessing.shape)}; its edges are cropped",
            stacklevel=2,
        )
    pad_value = float(resampled.min())
    image_t = _crop_pad(image_t, lo, hi, pad_value)
    foreground = _crop_pad_numpy(foreground_full, lo, hi, False)

    # 4. intensity: a_min -> 0, a_max -> 1 (MONAI ScaleIntensityRange)
    intensity = _intensity_map(preprocessing, image_t[0].numpy(), foreground, source)
    scaled = ScaleIntensityRange(
        a_min=intensity["a_min"], a_max=intensity["a_max"], b_min=MODEL_MIN, b_max=MODEL_MAX,
        clip=preprocessing.clip,
    )(image_t)

    mask_out = None
    if mask is not None:
        mask_t = _orient_resample(_to_metatensor(mask.array, mask.affine), preprocessing.spacing, "nearest")
        mask_t = _crop_pad(mask_t, lo, hi, 0.0)
        mask_out = _cast_like(mask_t[0].numpy(), np.asarray(mask.array).dtype)

    return Preprocessed(
        image=np.ascontiguousarray(scaled[0].numpy(), dtype=np.float32),
        mask=mask_out,
        foreground=foreground,
        affine=np.asarray(scaled.affine, dtype=np.float64),
        intensity=intensity,
        native_affine=np.asarray(volume.affine, dtype=np.float64),
        native_shape=tuple(int(s) for s in volume.shape),  # type: ignore[arg-type]
        box_start=tuple(int(v) for v in lo),  # type: ignore[arg-type]
        source=volume.meta.get("source"),
    )


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
    "to_model",
    "to_native",
]
