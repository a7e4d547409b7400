"""The preprocessing settings a model expects (a checkpoint stores them): :class:`Preprocessing`.

The transforms that apply them are in :mod:`medidiff.data.transforms` (and, as MONAI
dictionary transforms, :mod:`medidiff.data.compose`).

Example:
    >>> from medidiff.data.preprocessing import Preprocessing
    >>> Preprocessing(modality="ct").ct_window
    (40.0, 80.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from medidiff.errors import ConfigError

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


__all__ = ["CT_WINDOWS", "DEFAULT_FOREGROUND_THRESHOLD", "MODEL_MAX", "MODEL_MIN", "Preprocessing"]
