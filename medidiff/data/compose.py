"""The preprocessing as MONAI dictionary transforms: an invertible ``Compose`` for your pipeline.

:func:`preprocessing_transforms` builds, from a :class:`~medidiff.data.preprocessing.Preprocessing`
(for example the one a checkpoint stores), the same chain :func:`~medidiff.data.transforms.preprocess`
runs, as MONAI dictionary transforms:

======================================  ====================================================
transform                               step
======================================  ====================================================
:class:`LoadVolumed` (``load=True``)    :func:`medidiff.io.load_volume` -> ``MetaTensor``
``EnsureChannelFirstd``                 ``(X, Y, Z)`` -> ``(1, X, Y, Z)``
``Orientationd("RAS")``                 1. reorder/flip the axes (exact)
``Spacingd(spacing)``                   2. resample (bilinear for images, nearest for masks)
:class:`CropPadToForegroundd`           3. ``shape`` voxels centred on the foreground's
                                        bounding box (a ``CropForegroundd``); images padded
                                        with their minimum, masks with 0
:class:`ScaleIntensityFromForegroundd`  4. MRI: foreground p1/p99 -> 0/1; CT: HU window -> 0/1
======================================  ====================================================

Every step is invertible, so model outputs go back onto the scan's own grid with MONAI's
own ``Compose.inverse`` or ``Invertd``: give the model-grid array the ``applied_operations``
of the transformed image (``Invertd`` does that for you). Step 4's inverse maps values back
to native units (reconstructions); pass ``invert_intensity=False`` to leave values
unchanged (anomaly maps, probabilities). Masks come out as float32 holding the label
values (``preprocess`` casts them back to the mask's dtype).

Example:
    >>> import numpy as np, tempfile, os
    >>> from monai.data import MetaTensor
    >>> from medidiff.io import Volume, save_volume
    >>> from medidiff.data.preprocessing import Preprocessing
    >>> from medidiff.data.compose import preprocessing_transforms
    >>> arr = np.zeros((20, 24, 16), np.float32); arr[4:16, 5:20, 3:13] = np.linspace(1, 100, 10)
    >>> path = os.path.join(tempfile.mkdtemp(), "scan.nii.gz")
    >>> _ = save_volume(Volume(arr, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    >>> chain = preprocessing_transforms(Preprocessing(shape=(16, 16, 16)), invert_intensity=False)
    >>> item = chain({"image": path})
    >>> tuple(item["image"].shape), float(item["image"].max())
    ((1, 16, 16, 16), 1.0)
    >>> model_map = MetaTensor(item["image"].as_tensor().clone(), affine=item["image"].affine,
    ...                        applied_operations=item["image"].applied_operations)
    >>> tuple(chain.inverse({"image": model_map})["image"].shape)
    (1, 20, 24, 16)
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForeground,
    CropForegroundd,
    EnsureChannelFirstd,
    InvertibleTransform,
    MapTransform,
    Orientationd,
    ScaleIntensityRange,
    Spacingd,
)
from monai.utils import TraceKeys

from medidiff.data.preprocessing import MODEL_MAX, MODEL_MIN, Preprocessing
from medidiff.data.transforms import (
    crop_pad_numpy,
    intensity_map,
    model_window,
    no_foreground_error,
)
from medidiff.io import Volume, load_volume

__all__ = [
    "CropPadToForegroundd",
    "LoadVolumed",
    "ScaleIntensityFromForegroundd",
    "preprocessing_transforms",
]

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _source(img: Any, key: Hashable) -> str:
    meta = getattr(img, "meta", {}) or {}
    return str(meta.get("filename_or_obj") or key)


class LoadVolumed(MapTransform):
    """Read each key (a path or a :class:`~medidiff.io.Volume`) with :func:`medidiff.io.load_volume`.

    The result is a float32 ``MetaTensor`` ``(X, Y, Z)`` in the file's voxel order with
    its RAS affine (as ``LoadImaged(image_only=True)`` gives), so every format and check
    of :mod:`medidiff.io` applies: DICOM series folders, MGH, one clear error per bad file.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            volume = value if isinstance(value, Volume) else load_volume(value)
            array = np.ascontiguousarray(volume.array, dtype=np.float32)
            d[key] = MetaTensor(
                torch.from_numpy(array),
                affine=torch.as_tensor(volume.affine, dtype=torch.float64),
                # "no_channel" as MONAI's readers write it (EnsureChannelFirstd reads it)
                meta={"filename_or_obj": str(volume.meta.get("source", key)),
                      "original_channel_dim": "no_channel"},
            )
        return d


class _ModelWindow(CropForeground):
    """``CropForeground`` whose box is the model window: ``shape`` voxels centred on the
    bounding box of the voxels above ``threshold`` (see :func:`~medidiff.data.transforms.model_window`)."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        threshold = preprocessing.foreground_threshold
        super().__init__(select_fn=lambda x: x > threshold, allow_smaller=False)
        self.preprocessing = preprocessing
        self.source = "volume"  # named in errors and warnings; set per item

    def foreground(self, img: torch.Tensor) -> np.ndarray:
        return np.asarray(img[0].detach().cpu().numpy() > self.preprocessing.foreground_threshold)

    def compute_bounding_box(self, img: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        foreground = self.foreground(img)
        if not foreground.any():
            raise no_foreground_error(img[0].detach().cpu().numpy(), self.preprocessing, self.source)
        return model_window(foreground, self.preprocessing.shape, self.source)


class CropPadToForegroundd(CropForegroundd):
    """Step 3: crop/pad every key to the window of ``preprocessing.shape`` voxels centred on
    the foreground (``source_key > foreground_threshold``) of ``source_key``.

    A MONAI ``CropForegroundd`` (so ``inverse`` pads/crops back) whose window has a fixed
    size. Image keys are padded with their own minimum (background), ``mask_keys`` with 0.
    With ``foreground_key``, the window's foreground (bool ``(1, X, Y, Z)``, False where
    padded) is stored under that key, for step 4.

    Raises:
        VolumeContentError: no voxel of ``source_key`` above the threshold.
    """

    def __init__(
        self,
        keys: Sequence[Hashable],
        source_key: Hashable,
        preprocessing: Preprocessing,
        *,
        mask_keys: Sequence[Hashable] = (),
        foreground_key: Hashable | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, source_key=source_key, allow_missing_keys=allow_missing_keys)
        self.cropper = _ModelWindow(preprocessing)
        self.mask_keys = set(mask_keys)
        self.foreground_key = foreground_key

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        source = d[self.source_key]
        self.cropper.source = _source(source, self.source_key)
        lo, hi = self.cropper.compute_bounding_box(source)
        if self.foreground_key is not None:
            window = crop_pad_numpy(self.cropper.foreground(source), lo, hi, False)
            d[self.foreground_key] = torch.from_numpy(window)[None]
        for key in self.key_iterator(d):
            value = 0.0 if key in self.mask_keys else float(d[key].min())
            d[key] = self.cropper.crop_pad(d[key], lo, hi, mode="constant", value=value)
        return d


class ScaleIntensityFromForegroundd(MapTransform, InvertibleTransform):
    """Step 4: the linear map ``a_min -> 0``, ``a_max -> 1`` (MONAI ``ScaleIntensityRange``).

    MRI: ``a_min``/``a_max`` are the ``lower``/``upper_percentile`` of the foreground's
    intensities, the foreground being ``foreground_key`` if the data holds it, else the
    voxels above ``foreground_threshold``; CT: the HU window. Clipped to [0, 1] when
    ``preprocessing.clip``. The map used is recorded in the transform trace
    (``extra_info``: ``a_min``, ``a_max``, ``b_min``, ``b_max``, ...); ``inverse``
    applies ``x_native = a_min + (x - b_min) (a_max - a_min) / (b_max - b_min)`` unless
    ``invert=False``, when it only pops the trace.

    Raises:
        VolumeContentError: a constant foreground (MRI).
    """

    def __init__(
        self,
        keys: Sequence[Hashable],
        preprocessing: Preprocessing,
        *,
        foreground_key: Hashable | None = None,
        invert: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.preprocessing = preprocessing
        self.foreground_key = foreground_key
        self.invert = invert

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        pre = self.preprocessing
        for key in self.key_iterator(d):
            img = d[key]
            values = img[0].detach().cpu().numpy()
            if self.foreground_key is not None and self.foreground_key in d:
                foreground = np.asarray(d[self.foreground_key][0], dtype=bool)
            else:
                foreground = values > pre.foreground_threshold
            source = _source(img, key)
            if not foreground.any():
                raise no_foreground_error(values, pre, source)
            params = intensity_map(pre, values, foreground, source)
            scaled = ScaleIntensityRange(
                a_min=params["a_min"], a_max=params["a_max"], b_min=MODEL_MIN, b_max=MODEL_MAX,
                clip=pre.clip,
            )(img)
            d[key] = self.push_transform(scaled, extra_info=params)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            params = self.pop_transform(d[key])[TraceKeys.EXTRA_INFO]
            if self.invert:
                a_min, a_max = float(params["a_min"]), float(params["a_max"])
                b_min, b_max = float(params["b_min"]), float(params["b_max"])
                d[key] = a_min + (d[key] - b_min) * ((a_max - a_min) / (b_max - b_min))
        return d


def preprocessing_transforms(
    preprocessing: Preprocessing,
    keys: Sequence[Hashable] = ("image",),
    *,
    mask_keys: Sequence[Hashable] = (),
    load: bool = True,
    foreground_key: Hashable | None = "foreground",
    invert_intensity: bool = True,
) -> Compose:
    """The preprocessing as an invertible MONAI ``Compose`` of dictionary transforms.

    Gives, on the same scan, the arrays and affine of
    :func:`~medidiff.data.transforms.preprocess` (``image`` to float rounding; masks as
    float32 label values), channel first.

    Args:
        preprocessing: the settings, e.g. ``Preprocessing.from_dict(checkpoint.preprocessing)``.
        keys: image keys; the first one defines the foreground (crop window, percentiles).
        mask_keys: label keys carried along (nearest neighbour, padded with 0).
        load: start with :class:`LoadVolumed` (items hold paths or Volumes); with
            ``False`` items hold ``(X, Y, Z)`` MetaTensors with their affine, as
            ``LoadImaged(image_only=True)`` gives.
        foreground_key: where to store the model-grid foreground mask (``None``: nowhere).
        invert_intensity: whether ``inverse`` maps image values back to native units.

    Returns:
        The ``Compose``; ``compose.inverse`` (or ``Invertd``) takes model-grid outputs
        back to the scan's grid and affine.

    Example:
        >>> from medidiff.data.preprocessing import Preprocessing
        >>> chain = preprocessing_transforms(Preprocessing(), mask_keys=("mask",))
        >>> [type(t).__name__ for t in chain.transforms][:3]
        ['LoadVolumed', 'EnsureChannelFirstd', 'Orientationd']
    """
    keys, mask_keys = list(keys), list(mask_keys)
    if not keys:
        raise ValueError("keys: give at least one image key")
    every = keys + mask_keys
    spatial = {"allow_missing_keys": True}  # so outputs can be inverted one key at a time
    steps: list[Any] = [LoadVolumed(every, allow_missing_keys=True)] if load else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        steps += [
            # the channel from the loader's metadata: with channel_dim="no_channel" MONAI
            # 1.6 records NaN, after which Pad/BorderPad update only the first axis of the
            # affine
            EnsureChannelFirstd(every, **spatial),
            Orientationd(every, axcodes="RAS", labels=_RAS_LABELS, **spatial),
        ]
    steps += [
        Spacingd(
            every,
            pixdim=tuple(preprocessing.spacing),
            mode=["bilinear"] * len(keys) + ["nearest"] * len(mask_keys),
            padding_mode=["border"] * len(keys) + ["zeros"] * len(mask_keys),
            dtype=np.float32,
            **spatial,
        ),
        CropPadToForegroundd(
            every, keys[0], preprocessing, mask_keys=mask_keys, foreground_key=foreground_key,
            **spatial,
        ),
        ScaleIntensityFromForegroundd(
            keys, preprocessing, foreground_key=foreground_key, invert=invert_intensity, **spatial
        ),
    ]
    return Compose(steps)
