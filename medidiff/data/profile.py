"""What a model's training scans looked like, and whether a new scan looks the same.

A model trained on skull-stripped T1 MRI will score a CT scan, a T1 with its skull, or a
slab covering half the brain without complaint, and give numbers that mean nothing. The
**input profile** guards against that: at training time a handful of training scans are
measured (:func:`scan_features`) and summarised (:func:`build_profile`: per feature the
minimum, median and maximum over the scans), and the summary is stored with the weights
(``extra["input_profile"]`` of the inference file). ``medidiff anomaly`` and
``medidiff calibrate`` measure every input the same way and compare (:func:`check_scan`).

Every feature is measured on the scan as read (its own grid, no resampling), with the
model's own foreground threshold and intensity map (:func:`~medidiff.data.transforms.intensity_map`),
so it costs a fraction of a second:

- ``negative_fraction``: voxels below zero (more precisely, below -5 % of the
  foreground's 99th percentile, so interpolation ringing does not count). About 0 for
  MRI; most of a CT volume in Hounsfield units (air is -1000 HU).
- ``background_fraction``: voxels at or below the foreground threshold. Skull-stripped
  MRI has a zero background over most of its field of view; a scan with its skull and
  background noise has almost none.
- ``foreground_ml``: volume of the foreground in ml (a skull-stripped adult brain is
  about 1.1-1.9 l; a head with skull and scalp 3-5 l).
- ``extent_x_mm``, ``extent_y_mm``, ``extent_z_mm``: the foreground's extent along the
  model grid's R-L, A-P and S-I axes, between its 0.1 % and 99.9 % quantiles (partial
  coverage, a neck, a whole body).
- ``intensity_p10`` ... ``intensity_p90``: quantiles of the foreground's intensities after
  the model's intensity map (MRI: 1st-99th foreground percentiles to 0-1; CT: the HU
  window). T1 white matter is bright, so the median is high; in a CT volume mapped the
  MRI way, the skull takes the top of the range and brain tissue sits near 0.
- ``rim_contrast``: median intensity (model scale) of the foreground's outer 4 mm minus
  that of its inside (deeper than 12 mm). Negative for skull-stripped T1 (cortex and CSF
  at the edge, white matter inside), positive for a head with its skull (bone in CT,
  scalp fat in T1).
- ``coarsest_voxel_mm``: the largest voxel edge (thick slices).

Independently of any profile, a scan whose foreground is larger than the model grid is
reported (its edges are cropped by preprocessing).

The margins (:data:`RULES`) are wide on purpose: the guard catches the wrong kind of
input, not a different scanner. On ``sample_data/`` no test, validation or lesion scan is
out of the profile of the training split, and the CT volumes are (tests check both).

Example:
    >>> import numpy as np
    >>> from medidiff.io import Volume
    >>> from medidiff.data.preprocessing import Preprocessing
    >>> arr = np.zeros((40, 40, 40), np.float32); arr[8:32, 8:32, 8:32] = 100.0
    >>> arr[12:28, 12:28, 12:28] = 150.0
    >>> pre = Preprocessing(shape=(32, 32, 32))
    >>> profile = build_profile([scan_features(Volume(arr, np.eye(4)), pre)], pre)
    >>> check_scan(Volume(arr, np.eye(4)), profile, pre).ok
    True
    >>> check_scan(Volume(arr - 500.0, np.eye(4)), profile, pre).ok
    False
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medidiff.data.preprocessing import Preprocessing
from medidiff.errors import VolumeContentError
from medidiff.io import Volume

__all__ = [
    "PROFILE_FORMAT",
    "InputCheck",
    "InputProfile",
    "RULES",
    "build_profile",
    "check_scan",
    "profile_entries",
    "scan_features",
]

PROFILE_FORMAT = "medidiff-input-profile-1"

#: quantiles of the normalised foreground intensities that are profiled
QUANTILES = (10, 25, 50, 75, 90)
#: the outer shell of the foreground (mm) and the depth of its inside (mm), for rim_contrast
RIM_MM, INSIDE_MM = 4.0, 12.0
#: scans are measured on every k-th voxel along each axis, k chosen so the voxels measured
#: are about this size (mm): the same features whatever the input's resolution, and cheap
MEASURE_MM = 4.0
#: how many training scans a profile is built from by default (evenly spread over the list)
DEFAULT_SCANS = 8
_AXES = ("x", "y", "z")
_AXIS_NAMES = {"x": "R-L", "y": "A-P", "z": "S-I"}


# --------------------------------------------------------------------------------------------
# measuring one scan
# --------------------------------------------------------------------------------------------


def _ras_axes(affine: np.ndarray) -> list[int]:
    """For each RAS axis of the model grid (x, y, z), the voxel axis of the scan that
    preprocessing turns into it (MONAI's Orientation only permutes and flips axes)."""
    import nibabel as nib

    ornt = nib.io_orientation(np.asarray(affine, dtype=np.float64))
    axes = [0, 0, 0]
    for voxel_axis, (world_axis, _) in enumerate(ornt):
        axes[int(world_axis)] = voxel_axis
    return axes


def _extent(counts: np.ndarray, step_mm: float, robust: bool) -> float:
    """Extent in mm of a foreground whose voxel counts along one axis are ``counts``:
    between the 0.1 % and 99.9 % quantiles (``robust``) or the outermost voxels."""
    if robust:
        cdf = np.cumsum(counts) / counts.sum()
        lo, hi = int(np.searchsorted(cdf, 0.001)), int(np.searchsorted(cdf, 0.999))
    else:
        idx = np.flatnonzero(counts)
        lo, hi = int(idx[0]), int(idx[-1])
    return float((hi - lo + 1) * step_mm)


def _eroded(mask: np.ndarray, mm: float, spacing: np.ndarray) -> np.ndarray:
    """``mask`` eroded by a box of half-width ``mm`` (separable minimum filters, one pass
    per axis: a cheap stand-in for a distance transform). The array's border does not
    count as background."""
    from scipy import ndimage

    out = mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8)
    for axis, step in enumerate(spacing):
        n = int(round(mm / float(step)))
        if n > 0:
            out = ndimage.minimum_filter1d(out, 2 * n + 1, axis=axis, mode="nearest")
    return out.astype(bool)


def scan_features(volume: Volume, preprocessing: Preprocessing) -> dict[str, float]:
    """Measure one scan (see the module docstring for what each feature means).

    Args:
        volume: the scan as read.
        preprocessing: the model's settings (foreground threshold, intensity map).

    Returns:
        Feature name -> value (``rim_contrast`` is NaN when the foreground has no inside
        deeper than 12 mm), plus ``crop_x_mm`` ... ``crop_z_mm``: the foreground's full
        extent along each model axis, which preprocessing crops where it exceeds the grid.

    Raises:
        VolumeContentError: not 3D, no foreground, or a constant foreground (as
            preprocessing would).
    """
    from medidiff.data.transforms import intensity_map, no_foreground_error

    source = str(volume.meta.get("source", "volume"))
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise VolumeContentError(f"{source}: a 3D volume is needed; got shape {array.shape}")
    full = array > preprocessing.foreground_threshold  # the crop check needs every voxel
    native_spacing = np.asarray(volume.spacing, dtype=np.float64)
    spacing = native_spacing
    stride = [max(1, int(round(MEASURE_MM / s))) for s in spacing]
    array = array[::stride[0], ::stride[1], ::stride[2]].astype(np.float32, copy=False)
    spacing = spacing * np.asarray(stride)
    foreground = array > preprocessing.foreground_threshold
    if not foreground.any():
        raise no_foreground_error(volume.array, preprocessing, source)
    values = array[foreground]
    top = float(np.percentile(np.abs(values), 99))
    mapping = intensity_map(preprocessing, array, foreground, source)
    scale = (mapping["b_max"] - mapping["b_min"]) / (mapping["a_max"] - mapping["a_min"])
    model = (array - mapping["a_min"]) * scale + mapping["b_min"]
    if preprocessing.clip:
        model = np.clip(model, mapping["b_min"], mapping["b_max"])
    inside_values = model[foreground]
    rim, inside = foreground & ~_eroded(foreground, RIM_MM, spacing), _eroded(foreground, INSIDE_MM, spacing)
    rim_contrast = (float(np.median(model[rim]) - np.median(model[inside]))
                    if rim.any() and inside.any() else float("nan"))

    features = {
        "negative_fraction": float(np.mean(array < -0.05 * top)),
        "background_fraction": float(1.0 - foreground.mean()),
        "foreground_ml": float(foreground.sum() * np.prod(spacing) / 1000.0),
        "rim_contrast": rim_contrast,
        "coarsest_voxel_mm": float(max(volume.spacing)),
    }
    for q, v in zip(QUANTILES, np.percentile(inside_values, QUANTILES)):
        features[f"intensity_p{q}"] = float(v)
    for name, voxel_axis in zip(_AXES, _ras_axes(volume.affine)):
        others = tuple(a for a in range(3) if a != voxel_axis)
        features[f"extent_{name}_mm"] = _extent(foreground.sum(axis=others), spacing[voxel_axis],
                                                robust=True)
        features[f"crop_{name}_mm"] = _extent(full.any(axis=others), native_spacing[voxel_axis],
                                              robust=False)
    return features


# --------------------------------------------------------------------------------------------
# the profile of a set of scans
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputProfile:
    """What a model's training scans looked like.

    Attributes:
        features: feature name -> ``(min, median, max)`` over the profiled scans.
        num_scans: how many scans were measured.
        modality: the model's modality (``"mri"`` or ``"ct"``).
        foreground_threshold: the threshold the features were measured with.
        sources: the profiled files' names (a few, for the record).
    """

    features: Mapping[str, tuple[float, float, float]]
    num_scans: int
    modality: str
    foreground_threshold: float
    sources: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON for the checkpoint's ``extra["input_profile"]`` (NaN-free)."""
        return {
            "format": PROFILE_FORMAT,
            "num_scans": self.num_scans,
            "modality": self.modality,
            "foreground_threshold": self.foreground_threshold,
            "features": {k: [round(float(x), 6) for x in v] for k, v in self.features.items()},
            "sources": list(self.sources),
        }

    @classmethod
    def from_dict(cls, raw: Any) -> InputProfile | None:
        """The profile stored in a checkpoint; ``None`` when there is none or it is not one
        this version reads (an older file, or a newer format)."""
        if not isinstance(raw, Mapping) or raw.get("format") != PROFILE_FORMAT:
            return None
        try:
            features = {
                str(k): tuple(float(x) for x in v)
                for k, v in dict(raw["features"]).items()
                if isinstance(v, Sequence) and len(v) == 3
            }
            return cls(features, int(raw["num_scans"]), str(raw["modality"]),
                       float(raw["foreground_threshold"]),
                       tuple(str(s) for s in raw.get("sources") or ()))
        except (KeyError, TypeError, ValueError):
            return None


def build_profile(
    features: Sequence[Mapping[str, float]], preprocessing: Preprocessing,
    sources: Sequence[str] = (),
) -> InputProfile:
    """Summarise :func:`scan_features` of several scans (NaN values are left out)."""
    if not features:
        raise VolumeContentError("an input profile needs at least one scan")
    names = [k for k in features[0] if not k.startswith("crop_")]
    summary: dict[str, tuple[float, float, float]] = {}
    for name in names:
        values = np.asarray([f[name] for f in features if np.isfinite(f.get(name, np.nan))])
        if values.size:
            summary[name] = (float(values.min()), float(np.median(values)), float(values.max()))
    return InputProfile(summary, len(features), preprocessing.modality,
                        float(preprocessing.foreground_threshold), tuple(sources)[:DEFAULT_SCANS])


def profile_entries(
    entries: Sequence[Any], preprocessing: Preprocessing, *, max_scans: int = DEFAULT_SCANS
) -> InputProfile | None:
    """The profile of up to ``max_scans`` datalist entries (evenly spread over the list);
    ``None`` when none of them can be read (training reports those itself)."""
    from pathlib import Path

    from medidiff.errors import MedidiffError
    from medidiff.io import load_volume

    if not entries:
        return None
    picks = sorted({int(i) for i in np.linspace(0, len(entries) - 1, min(max_scans, len(entries)))})
    measured, sources = [], []
    for i in picks:
        image = getattr(entries[i], "image", entries[i])
        try:
            measured.append(scan_features(load_volume(image), preprocessing))
        except MedidiffError:
            continue
        sources.append(Path(image).name)
    return build_profile(measured, preprocessing, sources) if measured else None


# --------------------------------------------------------------------------------------------
# comparing a scan with a profile
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputCheck:
    """How a scan compares with the model's training inputs.

    Attributes:
        status: ``"ok"``, ``"out of profile"`` or ``"unchecked"`` (the checkpoint has no
            input profile; only the model grid was checked).
        problems: one short phrase per finding (empty when ``ok``).
    """

    status: str
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """No problem found (``unchecked`` counts as ok: nothing is known to be wrong)."""
        return not self.problems

    def summary(self) -> str:
        """One cell of ``scores.csv``: ``ok``, ``unchecked`` or ``out of profile: ...``."""
        if not self.problems:
            return self.status
        label = "out of profile" if self.status != "unchecked" else "unchecked"
        return f"{label}: " + "; ".join(self.problems)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _range(lo: float, hi: float, fmt: Callable[[float], str]) -> str:
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)}-{fmt(hi)}"


@dataclass(frozen=True)
class Rule:
    """How far a feature may stray from the training range ``[lo, hi]``.

    Attributes:
        absolute: allowed distance outside the range, in the feature's units.
        ratio: or allowed factor beyond it (``value > hi * ratio`` or ``< lo / ratio``).
        sides: ``"both"``, ``"low"`` (only values below the range count) or ``"high"``.
    """

    absolute: float = 0.0
    ratio: float = 1.0
    sides: str = "both"

    def outside(self, value: float, lo: float, hi: float) -> bool:
        low = min(lo - self.absolute, lo / self.ratio if lo > 0 else lo - self.absolute)
        high = max(hi + self.absolute, hi * self.ratio if hi > 0 else hi + self.absolute)
        return (self.sides != "high" and value < low) or (self.sides != "low" and value > high)


#: the margin of each feature (see the module docstring); intensity quantiles share one
RULES: dict[str, Rule] = {
    "negative_fraction": Rule(absolute=0.10),
    "background_fraction": Rule(absolute=0.05, ratio=2.0, sides="low"),
    "foreground_ml": Rule(ratio=1.4),
    "extent_x_mm": Rule(ratio=1.3),
    "extent_y_mm": Rule(ratio=1.3),
    "extent_z_mm": Rule(ratio=1.3),
    "intensity": Rule(absolute=0.15),
    "rim_contrast": Rule(absolute=0.20),
}


def _profile_problems(f: Mapping[str, float], profile: InputProfile,
                      preprocessing: Preprocessing) -> list[str]:
    p = profile.features
    problems: list[str] = []

    def out(name: str, rule: Rule | None = None) -> bool:
        rule = rule or RULES[name]
        return name in p and np.isfinite(f.get(name, np.nan)) and rule.outside(f[name], p[name][0], p[name][2])

    if out("negative_fraction"):
        lo, _, hi = p["negative_fraction"]
        hint = ""
        if profile.modality == "mri" and f["negative_fraction"] > 0.3:
            hint = ": CT in Hounsfield units? the model was trained on MRI"
        elif profile.modality == "ct" and f["negative_fraction"] < 0.05:
            hint = ": MRI? the model was trained on CT in Hounsfield units, where air is -1000"
        problems.append(f"{_pct(f['negative_fraction'])} of voxels negative "
                        f"(training {_range(lo, hi, _pct)}){hint}")
    if out("background_fraction"):
        lo, _, hi = p["background_fraction"]
        problems.append(
            f"only {_pct(f['background_fraction'])} of voxels are background "
            f"(<= {preprocessing.foreground_threshold:g}; training {_range(lo, hi, _pct)}): "
            "not skull-stripped, or background noise?")
    if out("foreground_ml"):
        lo, _, hi = p["foreground_ml"]
        problems.append(f"foreground {f['foreground_ml']:.0f} ml (training {lo:.0f}-{hi:.0f} ml)")
    extents = [a for a in _AXES if out(f"extent_{a}_mm")]
    if extents:
        problems.append("foreground extent " + ", ".join(
            f"{_AXIS_NAMES[a]} {f[f'extent_{a}_mm']:.0f} mm (training "
            f"{p[f'extent_{a}_mm'][0]:.0f}-{p[f'extent_{a}_mm'][2]:.0f})" for a in extents))
    quantiles = [q for q in QUANTILES if out(f"intensity_p{q}", RULES["intensity"])]
    if quantiles:
        shown = ", ".join(
            f"p{q} {f[f'intensity_p{q}']:.2f} (training {p[f'intensity_p{q}'][0]:.2f}-"
            f"{p[f'intensity_p{q}'][2]:.2f})" for q in quantiles[:3])
        problems.append(f"foreground intensities after normalisation: {shown}")
    if out("rim_contrast"):
        lo, _, hi = p["rim_contrast"]
        hint = ": skull or scalp at the edge?" if f["rim_contrast"] > hi else ""
        problems.append(f"edge-minus-inside contrast {f['rim_contrast']:+.2f} "
                        f"(training {lo:+.2f} to {hi:+.2f}){hint}")
    grid = max(preprocessing.spacing)
    if "coarsest_voxel_mm" in p and f["coarsest_voxel_mm"] > 1.5 * max(p["coarsest_voxel_mm"][2], grid):
        problems.append(
            f"voxels up to {f['coarsest_voxel_mm']:.1f} mm (training <= "
            f"{p['coarsest_voxel_mm'][2]:.1f} mm, model grid {grid:g} mm): fine detail is missing")
    return problems


def _grid_problems(f: Mapping[str, float], preprocessing: Preprocessing) -> list[str]:
    """The foreground exceeds the model grid by more than a voxel (edges cropped)."""
    size = [n * s for n, s in zip(preprocessing.shape, preprocessing.spacing)]
    over = [i for i, a in enumerate(_AXES)
            if f.get(f"crop_{a}_mm", 0.0) > size[i] + preprocessing.spacing[i]]
    if not over:
        return []
    span = " x ".join(f"{f[f'crop_{a}_mm']:.0f}" for a in _AXES)
    grid = " x ".join(f"{s:.0f}" for s in size)
    return [f"foreground {span} mm exceeds the model grid {grid} mm "
            f"({', '.join(_AXIS_NAMES[_AXES[i]] for i in over)} edges cropped)"]


def check_scan(
    volume: Volume, profile: InputProfile | None, preprocessing: Preprocessing,
    features: Mapping[str, float] | None = None,
) -> InputCheck:
    """Compare a scan with a model's input profile and grid.

    Args:
        volume: the scan as read.
        profile: the model's :class:`InputProfile`, or ``None`` (then only the grid is
            checked and the status is ``"unchecked"``).
        preprocessing: the model's settings.
        features: the scan's :func:`scan_features`, if already measured.

    Returns:
        The :class:`InputCheck`.

    Raises:
        VolumeContentError: the scan cannot be measured (as preprocessing would refuse it).
    """
    f = features if features is not None else scan_features(volume, preprocessing)
    problems = [] if profile is None else _profile_problems(f, profile, preprocessing)
    problems += _grid_problems(f, preprocessing)
    if profile is None:
        return InputCheck("unchecked", tuple(problems))
    return InputCheck("out of profile" if problems else "ok", tuple(problems))
