"""Quality, diversity and memorisation metrics of synthetic scans against real ones.

Every metric compares images on the **model grid and scale**: real scans go through the
checkpoint's preprocessing (RAS, spacing, crop/pad, intensity to [0, 1]); synthetic
samples written by ``medidiff synthesize`` are mapped back from the training data's
intensity scale with the reference recorded in ``synthesis_config.json``. For a 2D model
the real images are the axial slices a 2D model trains on (foreground fraction at least
the checkpoint's ``data.min_foreground``), for a 3D model the whole volumes.

The metrics (:class:`SynthesisEvaluation`):

- **Diversity, MS-SSIM** (Wang, Simoncelli & Bovik 2003; MONAI's
  :class:`monai.metrics.MultiScaleSSIMMetric`): the mean MS-SSIM over pairs of synthetic
  samples, and over pairs of real images for reference. Lower means more diverse; a
  generator that collapses to one image scores near 1. Pinaya et al. 2022 report 0.66
  for real brain MRI. The standard setting (5 scales, 11-voxel Gaussian window) needs
  images larger than 160 voxels per side; :func:`ms_ssim_settings` keeps the largest window
  that allows at least 3 scales (11, 7, 5, then 3 voxels, sigma scaled by window/11) and
  renormalises the first weights of Wang et al.'s five. Settings are reported; compare
  numbers only between runs with the same settings.
- **Foreground intensity distance**: the Wasserstein-1 (earth mover's) distance between
  the intensity distributions of the foreground voxels (model scale > 0.05), pooled over
  each set. A shift of every foreground value by d gives exactly d.
- **Fréchet distance on fixed features** (:func:`image_features`, ``medidiff-stats-v1``):
  hand-crafted, fully specified statistics that need no weights and no download. NOT FID:
  no Inception network is involved, and the numbers are not comparable with published
  FIDs. See :func:`image_features` for what the features see and miss.
- **Memorisation**: for each synthetic sample, the real image with the highest SSIM
  (Gaussian window 11, sigma 1.5, MONAI's formulation; 2D samples against every training
  slice, 3D against every volume). A sample is flagged as a near-copy when that SSIM
  exceeds the threshold. Default threshold: ``max(0.95, q99)``, where q99 is the 99th
  percentile of the real-vs-real nearest-neighbour SSIM (each real image's nearest image
  from *another* scan): a synthetic sample closer to a training image than 99 % of real
  images are to another subject's, and above 0.95 in absolute terms, is suspicious. On
  cohorts whose subjects are very alike (e.g. simulated from one template) the data-driven
  part raises the bar so that ordinary similarity is not called copying.

Example:
    >>> import numpy as np
    >>> from medidiff.synthesis.metrics import frechet_distance
    >>> rng = np.random.default_rng(0)
    >>> a = rng.normal(size=(500, 3))
    >>> round(frechet_distance(a, a), 6)
    0.0
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medidiff.errors import ConfigError, DataError

__all__ = [
    "FEATURES_VERSION",
    "Diversity",
    "FrechetResult",
    "ImageSet",
    "MSSSIMSettings",
    "Memorisation",
    "RealReference",
    "SSIMSearch",
    "SynthesisEvaluation",
    "evaluate_against",
    "evaluate_synthesis",
    "foreground_wasserstein",
    "frechet_distance",
    "image_features",
    "load_real_images",
    "load_synthetic_images",
    "ms_ssim_diversity",
    "ms_ssim_settings",
]

FEATURES_VERSION = "medidiff-stats-v1"
FEATURES_DESCRIPTION = (
    "medidiff-stats-v1: hand-crafted statistics, no learned weights, no download. At 4 scales "
    "(average-pooled by 1, 2, 4, 8): mean, standard deviation, mean absolute first difference "
    "(edge strength), mean absolute discrete Laplacian (fine texture); plus a coarse layout "
    "(4x4 in-plane means for 2D, 2x2x2 for 3D) and the foreground fraction (> 0.05); all in "
    "model-scale intensity units (or fractions), used unscaled. NOT FID: no Inception "
    "network; numbers are not comparable with published FIDs. It sees intensity, contrast, "
    "edge/texture energy and coarse layout; it is blind to anatomical plausibility beyond "
    "these (a wrong-but-textured image can score well). Small sets bias it upwards (covariances "
    "from few samples): compare only runs with the same number of samples and real set."
)

#: Foreground on the model scale: skull-stripped MRI background maps to about 0.
DEFAULT_FOREGROUND_THRESHOLD = 0.05
#: The absolute floor of the default memorisation threshold (see the module docstring).
MEMORISATION_FLOOR = 0.95
#: The real-vs-real nearest-neighbour percentile that can raise the threshold above the floor.
MEMORISATION_PERCENTILE = 99.0

# Wang et al. 2003's scale weights (also MONAI's defaults).
_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_SSIM_WINDOW, _SSIM_SIGMA = 11, 1.5


# --------------------------------------------------------------------------------------------
# image sets
# --------------------------------------------------------------------------------------------


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
    """(Preprocessing, spatial_dims, min_foreground, intensity reference) of a checkpoint."""
    from medidiff.models.checkpoint import load_inference
    from medidiff.config import Config
    from medidiff.data.transforms import Preprocessing

    ckpt = load_inference(checkpoint)
    config = Config.from_dict(ckpt.config)
    dims = int(ckpt.model_kwargs.get("spatial_dims", config.model.spatial_dims))
    return (Preprocessing.from_dict(ckpt.preprocessing), dims, float(config.data.min_foreground),
            ckpt.extra.get("intensity_reference"))


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
    import json

    from medidiff.io.volume import is_volume_path, load_volume
    from medidiff.synthesis.folder import CONFIG_NAME, MANIFEST_NAME, read_manifest
    from medidiff.synthesis.synthesizer import INTENSITY_NATIVE
    from medidiff.data.transforms import Preprocessing, intensity_to_model, preprocess

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--synthetic {folder}: no such folder")
    config_path = folder / CONFIG_NAME
    recorded: dict[str, Any] | None = None
    if config_path.is_file():
        try:
            recorded = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{config_path}: unreadable ({exc})") from None
        _check_recorded(recorded, config_path)
    if recorded is None and checkpoint is None:
        raise ConfigError(
            f"--synthetic {folder} has no {CONFIG_NAME} (not written by `medidiff synthesize`); "
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

    rows = read_manifest(folder / MANIFEST_NAME)
    files = [folder / r["file"] for r in rows if r.get("file") and (folder / r["file"]).is_file()]
    if not files:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                       and is_volume_path(p))
    if not files:
        raise DataError(f"--synthetic {folder}: no synthetic volumes found")

    x, y, z = prep.shape
    expected = (x, y, 1) if dims == 2 else (x, y, z)
    arrays = []
    for path in files:
        volume = load_volume(path)
        if recorded is None and dims == 3:
            arrays.append(preprocess(volume, prep).image)
            continue
        if volume.shape != expected:
            raise DataError(
                f"{path}: shape {volume.shape}; samples of this model are {expected} "
                f"({'one axial slice of the model grid' if dims == 2 else 'the model grid'})"
            )
        values = volume.array.astype(np.float32)
        if reference:
            values = intensity_to_model(values, reference)
        arrays.append(values[:, :, 0] if dims == 2 else values)
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


# --------------------------------------------------------------------------------------------
# MS-SSIM diversity
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MSSSIMSettings:
    """MS-SSIM parameters that fit an image size.

    Attributes:
        scales: number of scales (1 .. 5).
        kernel_size: Gaussian window in voxels.
        kernel_sigma: its standard deviation (1.5 x kernel_size / 11).
        weights: per-scale weights (Wang et al.'s first ``scales``, renormalised to sum 1).
    """

    scales: int
    kernel_size: int
    kernel_sigma: float
    weights: tuple[float, ...]


def _ms_ssim_fits(size: int, scales: int, kernel: int) -> bool:
    # MONAI's check: size // max(1, scales - 1)**2 > kernel - 1; the coarsest scale
    # (size // 2**(scales - 1) voxels) must also hold one whole window (valid convolution).
    return size // max(1, scales - 1) ** 2 > kernel - 1 and size // 2 ** (scales - 1) >= kernel


def ms_ssim_settings(spatial_shape: Sequence[int]) -> MSSSIMSettings:
    """The MS-SSIM settings for images of ``spatial_shape``.

    The standard 5 scales with an 11-voxel window need more than 160 voxels per side.
    Smaller images keep the largest window (11, 7, 5, 3) that still allows at least 3
    scales, with as many scales as fit (up to 5); if none does, the most scales any
    window allows (down to plain SSIM, 1 scale).

    Args:
        spatial_shape: ``(X, Y)`` or ``(X, Y, Z)``.

    Raises:
        ConfigError: an image smaller than 3 voxels along some axis.
    """
    size = min(int(s) for s in spatial_shape)
    if size < 3:
        raise ConfigError(
            f"images of shape {tuple(spatial_shape)} are too small for SSIM (3 voxels at least)"
        )
    windows = (11, 7, 5, 3)

    def most_scales(kernel: int, at_least: int) -> int:
        return next((s for s in range(5, at_least - 1, -1) if _ms_ssim_fits(size, s, kernel)), 0)

    choice = next(((most_scales(k, 3), k) for k in windows if most_scales(k, 3)), None)
    if choice is None:  # fewer than 3 scales fit: the most scales any window allows
        choice = max(((most_scales(k, 1), k) for k in windows), key=lambda sk: (sk[0], sk[1]))
    scales, kernel = choice
    if scales:
        w = np.asarray(_MS_SSIM_WEIGHTS[:scales], dtype=np.float64)
        return MSSSIMSettings(scales, kernel, _SSIM_SIGMA * kernel / _SSIM_WINDOW,
                              tuple(float(v) for v in w / w.sum()))
    raise ConfigError(f"images of shape {tuple(spatial_shape)} are too small for SSIM")  # pragma: no cover


@dataclass(frozen=True)
class Diversity:
    """Mean pairwise MS-SSIM of a set (lower = more diverse).

    Attributes:
        mean, std: over the pairs evaluated (``nan`` with fewer than 2 images).
        pairs: number of pairs evaluated.
        all_pairs: whether every pair was evaluated (else a seeded random subset).
        settings: the MS-SSIM settings used.
    """

    mean: float
    std: float
    pairs: int
    all_pairs: bool
    settings: MSSSIMSettings


def _pairs(n: int, max_pairs: int, seed: int) -> tuple[np.ndarray, bool]:
    total = n * (n - 1) // 2
    if total <= max_pairs:
        i, j = np.triu_indices(n, k=1)
        return np.stack([i, j], 1), True
    rng = np.random.default_rng(seed)
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < max_pairs:
        a, b = rng.integers(0, n, size=2)
        if a != b:
            chosen.add((int(min(a, b)), int(max(a, b))))
    return np.asarray(sorted(chosen)), False


def ms_ssim_diversity(images: ImageSet, *, max_pairs: int = 500, seed: int = 0, batch: int = 64) -> Diversity:
    """Mean MS-SSIM over pairs of distinct images (all pairs, or ``max_pairs`` random ones).

    Args:
        images: the set.
        max_pairs: the most pairs to evaluate; above it a random subset (seeded) is used.
        seed: seed of the subset.
        batch: pairs per MONAI call.
    """
    from monai.metrics import MultiScaleSSIMMetric

    settings = ms_ssim_settings(images.images.shape[2:])
    if len(images) < 2:
        return Diversity(float("nan"), float("nan"), 0, True, settings)
    metric = MultiScaleSSIMMetric(
        spatial_dims=images.spatial_dims, data_range=1.0, kernel_size=settings.kernel_size,
        kernel_sigma=settings.kernel_sigma, weights=settings.weights, reduction="none",
    )
    pairs, complete = _pairs(len(images), max_pairs, seed)
    data = torch.from_numpy(images.images)
    values = []
    for start in range(0, len(pairs), batch):
        p = pairs[start : start + batch]
        values.append(metric(data[p[:, 0]], data[p[:, 1]]).reshape(-1))
    v = torch.cat(values).double().numpy()
    return Diversity(float(v.mean()), float(v.std()), len(v), complete, settings)


# --------------------------------------------------------------------------------------------
# foreground intensity distance
# --------------------------------------------------------------------------------------------


def foreground_values(images: ImageSet, threshold: float = DEFAULT_FOREGROUND_THRESHOLD) -> np.ndarray:
    """All voxel values above ``threshold`` (model scale), pooled over the set."""
    values = images.images.reshape(-1)
    return values[values > threshold].astype(np.float64)


def foreground_wasserstein(
    real: ImageSet | np.ndarray,
    synthetic: ImageSet | np.ndarray,
    *,
    threshold: float = DEFAULT_FOREGROUND_THRESHOLD,
) -> float:
    """Wasserstein-1 distance between foreground intensity distributions (model scale).

    W1(P, Q) = integral |F_P(v) - F_Q(v)| dv over the two empirical distributions
    (``scipy.stats.wasserstein_distance``). In model-scale units: shifting every
    foreground value by d gives d.

    Args:
        real, synthetic: image sets, or already extracted foreground values.
        threshold: foreground = values above it.

    Returns:
        The distance, or ``nan`` when either set has no foreground voxel.
    """
    from scipy.stats import wasserstein_distance

    def values(x: ImageSet | np.ndarray) -> np.ndarray:
        return foreground_values(x, threshold) if isinstance(x, ImageSet) else np.asarray(x, np.float64)

    a, b = values(real), values(synthetic)
    if a.size == 0 or b.size == 0:
        return float("nan")
    return float(wasserstein_distance(a, b))


# --------------------------------------------------------------------------------------------
# Fréchet distance on fixed features
# --------------------------------------------------------------------------------------------


def _abs_first_difference(x: torch.Tensor, dims: int) -> torch.Tensor:
    """Mean |x[i+1] - x[i]| over every spatial axis, per image: (N,)."""
    total = 0.0
    for axis in range(2, 2 + dims):
        total = total + x.diff(dim=axis).abs().flatten(1).mean(1)
    return total / dims


def _abs_laplacian(x: torch.Tensor, dims: int) -> torch.Tensor:
    """Mean |sum over axes of (x[i+1] - 2 x[i] + x[i-1])| on the interior, per image: (N,)."""
    inner = tuple(slice(1, -1) for _ in range(dims))
    lap = torch.zeros_like(x[(slice(None), slice(None), *inner)])
    for a in range(dims):
        def shifted(offset: int) -> torch.Tensor:
            index = [slice(None), slice(None), *inner]
            index[2 + a] = slice(1 + offset, x.shape[2 + a] - 1 + offset)
            return x[tuple(index)]
        lap = lap + shifted(1) - 2 * shifted(0) + shifted(-1)
    return lap.abs().flatten(1).mean(1)


def image_features(images: ImageSet | np.ndarray, spatial_dims: int | None = None) -> np.ndarray:
    """``medidiff-stats-v1`` features: fixed, weight-free statistics of each image.

    Per image (model scale), at 4 scales (the image average-pooled by 1, 2, 4, 8; a scale
    is skipped, its features 0, once an axis is below 3 voxels):

    - mean and standard deviation of the intensities,
    - mean absolute first difference over all axes (edge strength),
    - mean absolute discrete Laplacian (fine texture, noise);

    plus the coarse layout (adaptive average pool to 4 x 4 in 2D, 2 x 2 x 2 in 3D) and the
    foreground fraction (> 0.05). 2D: 16 + 16 + 1 = 33 features; 3D: 16 + 8 + 1 = 25.
    Deterministic and version-independent (no random weights). It is NOT an Inception
    network and the Fréchet distance on it is not FID.

    Args:
        images: an :class:`ImageSet` or an ``(N, 1, *spatial)`` array.
        spatial_dims: needed when ``images`` is an array.

    Returns:
        ``(N, F)`` float64.
    """
    if isinstance(images, ImageSet):
        spatial_dims, data = images.spatial_dims, images.images
    else:
        data = np.asarray(images)
        if spatial_dims is None:
            spatial_dims = data.ndim - 2
    x = torch.from_numpy(np.asarray(data, dtype=np.float64))
    pool = F.avg_pool2d if spatial_dims == 2 else F.avg_pool3d
    columns: list[torch.Tensor] = []
    scaled = x
    for scale in range(4):
        if scale:
            scaled = pool(scaled, kernel_size=2) if min(scaled.shape[2:]) >= 2 else scaled
        if min(scaled.shape[2:]) < 3:
            columns.extend([torch.zeros(len(x), dtype=x.dtype)] * 4)
            continue
        flat = scaled.flatten(1)
        columns += [flat.mean(1), flat.std(1, unbiased=False),
                    _abs_first_difference(scaled, spatial_dims), _abs_laplacian(scaled, spatial_dims)]
    layout_size = (4, 4) if spatial_dims == 2 else (2, 2, 2)
    adaptive = F.adaptive_avg_pool2d if spatial_dims == 2 else F.adaptive_avg_pool3d
    layout = adaptive(x, layout_size).flatten(1)
    fg = (x > DEFAULT_FOREGROUND_THRESHOLD).double().flatten(1).mean(1)
    return torch.cat([torch.stack(columns, 1), layout, fg[:, None]], 1).numpy()


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (eigenvalues < 0 -> 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Dowson & Landau 1982).

    d^2 = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), computed as
    Tr((S_a S_b)^(1/2)) = Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), a symmetric PSD form that
    stays real and stable when a covariance is singular (fewer samples than features).
    Covariances are unbiased (``ddof=1``), as in FID implementations.

    Args:
        features_a, features_b: ``(N_a, F)`` and ``(N_b, F)`` (1D arrays are one feature).

    Returns:
        d^2 (>= 0 up to rounding; FID reports this squared form too).
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    a = a[:, None] if a.ndim == 1 else a
    b = b[:, None] if b.ndim == 1 else b
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets differ in width: {a.shape[1]} vs {b.shape[1]}")
    if len(a) < 2 or len(b) < 2:
        raise DataError("the Fréchet distance needs at least 2 images per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrt_psd(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_sqrt = float(np.sqrt(np.clip(cross, 0, None)).sum())
    d2 = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)
    return max(d2, 0.0)


@dataclass(frozen=True)
class FrechetResult:
    """A Fréchet distance on ``medidiff-stats-v1`` features (NOT FID).

    Attributes:
        distance: d^2 on the raw features (model-scale intensity units).
        num_features: F.
        n_real, n_synthetic: set sizes.
        extractor: :data:`FEATURES_VERSION`.
        description: what the features are and their limits.
    """

    distance: float
    num_features: int
    n_real: int
    n_synthetic: int
    extractor: str = FEATURES_VERSION
    description: str = FEATURES_DESCRIPTION


# --------------------------------------------------------------------------------------------
# nearest neighbours by SSIM (memorisation)
# --------------------------------------------------------------------------------------------


def _gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return g / g.sum()


class SSIMSearch:
    """The highest-SSIM match of a query among many candidates, computed fast.

    SSIM as in MONAI's :func:`monai.metrics.regression.compute_ssim_and_cs` (Wang et al.
    2004: Gaussian window, valid convolution, K1 = 0.01, K2 = 0.03, data range 1, mean over
    the map), but the Gaussian filter is applied separably, and each candidate's local
    means and variances are computed once, so a query against M candidates costs one
    filtered product per candidate instead of five. Tests check it against MONAI's
    ``SSIMMetric``.

    Args:
        candidates: ``(M, 1, *spatial)`` on the model scale.
        spatial_dims: 2 or 3.
        window: Gaussian window (shrunk to the image size if larger), sigma 1.5 x window / 11.
        chunk: candidates per vectorised block.
    """

    def __init__(self, candidates: np.ndarray, spatial_dims: int, *, window: int = _SSIM_WINDOW,
                 chunk: int = 256) -> None:
        self.spatial_dims = spatial_dims
        self.candidates = torch.from_numpy(np.ascontiguousarray(candidates, dtype=np.float32))
        smallest = min(self.candidates.shape[2:])
        self.window = min(window, smallest if smallest % 2 else smallest - 1)
        sigma = _SSIM_SIGMA * self.window / _SSIM_WINDOW
        self._g = _gaussian_1d(self.window, sigma).float()
        self._bands: dict[int, torch.Tensor] = {}
        self.chunk = chunk
        self.c1, self.c2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2
        self._mu, self._var = [], []
        for block in self.candidates.split(chunk):
            mu = self._filter(block)
            self._mu.append(mu)
            self._var.append(self._filter(block * block) - mu * mu)

    def _filter(self, x: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian filter, valid region: (B, 1, *S) -> (B, 1, *S - window + 1).

        Each axis is filtered by a matrix product with a banded (S - w + 1, S) matrix of
        window weights (BLAS is much faster than a 1-channel convolution here).
        """
        for axis in range(self.spatial_dims):
            dim = 2 + axis
            x = torch.movedim(torch.tensordot(x, self._band(x.shape[dim]), dims=([dim], [1])), -1, dim)
        return x

    def _band(self, size: int) -> torch.Tensor:
        if size not in self._bands:
            band = torch.zeros(size - self.window + 1, size, dtype=torch.float32)
            for i in range(size - self.window + 1):
                band[i, i : i + self.window] = self._g
            self._bands[size] = band
        return self._bands[size]

    def ssim(self, query: np.ndarray) -> np.ndarray:
        """SSIM of ``query`` (``(1, *spatial)`` or ``(*spatial)``) with every candidate: ``(M,)``."""
        q = torch.as_tensor(np.asarray(query, dtype=np.float32)).reshape(1, 1, *self.candidates.shape[2:])
        mu_x = self._filter(q)
        var_x = self._filter(q * q) - mu_x * mu_x
        out = []
        for block, mu_y, var_y in zip(self.candidates.split(self.chunk), self._mu, self._var):
            cov = self._filter(q * block) - mu_x * mu_y
            luminance = (2 * mu_x * mu_y + self.c1) / (mu_x**2 + mu_y**2 + self.c1)
            contrast = (2 * cov + self.c2) / (var_x + var_y + self.c2)
            out.append((luminance * contrast).flatten(1).mean(1))
        return torch.cat(out).double().numpy()


@dataclass(frozen=True)
class Memorisation:
    """Nearest real image of each synthetic sample, by SSIM, and the near-copy flags.

    Attributes:
        threshold: SSIM above which a sample is flagged.
        threshold_rule: how it was set.
        nearest_ssim: per synthetic sample, the highest SSIM to any real image.
        nearest_real: the name of that real image.
        flagged: names of the flagged synthetic samples.
        real_nn_ssim: percentiles (``p50``, ``p95``, ``p99``, ``max``) of the real-vs-real
            nearest-neighbour SSIM (nearest image of another scan), and ``queries``.
    """

    threshold: float
    threshold_rule: str
    nearest_ssim: tuple[float, ...]
    nearest_real: tuple[str, ...]
    flagged: tuple[str, ...]
    real_nn_ssim: Mapping[str, float]


# --------------------------------------------------------------------------------------------
# putting it together
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RealReference:
    """Everything computed once from the real set (reused across synthetic sets).

    Build it with :meth:`build`; :func:`evaluate_against` then scores synthetic sets.
    """

    images: ImageSet
    features: np.ndarray
    foreground: np.ndarray
    diversity: Diversity
    search: SSIMSearch
    real_nn_ssim: Mapping[str, float]
    foreground_threshold: float
    max_pairs: int
    seed: int

    @staticmethod
    def build(
        real: ImageSet,
        *,
        foreground_threshold: float = DEFAULT_FOREGROUND_THRESHOLD,
        max_pairs: int = 500,
        reference_queries: int = 64,
        seed: int = 0,
    ) -> RealReference:
        """Features, diversity, SSIM index and real-vs-real nearest-neighbour SSIMs of ``real``.

        Args:
            real: the real images (ideally the training scans: memorisation is about them).
            foreground_threshold: model-scale foreground for the intensity distance.
            max_pairs: MS-SSIM pairs for the diversity.
            reference_queries: real images (seeded random subset) whose nearest image from
                another scan sets the real-vs-real SSIM distribution.
            seed: seed of the random subsets.
        """
        if len(real) < 2:
            raise DataError(f"need at least 2 real images; got {len(real)}")
        search = SSIMSearch(real.images, real.spatial_dims)
        groups = np.asarray(real.groups)
        rng = np.random.default_rng(seed)
        queries = rng.choice(len(real), size=min(reference_queries, len(real)), replace=False)
        nn = []
        for q in queries:
            others = groups != groups[q]
            if others.any():
                nn.append(float(search.ssim(real.images[q])[others].max()))
        stats = {"queries": len(nn)}
        if nn:
            stats.update({
                "p50": float(np.percentile(nn, 50)), "p95": float(np.percentile(nn, 95)),
                "p99": float(np.percentile(nn, 99)), "max": float(np.max(nn)),
            })
        return RealReference(
            images=real, features=image_features(real),
            foreground=foreground_values(real, foreground_threshold),
            diversity=ms_ssim_diversity(real, max_pairs=max_pairs, seed=seed), search=search,
            real_nn_ssim=stats, foreground_threshold=foreground_threshold, max_pairs=max_pairs, seed=seed,
        )

    def default_threshold(self) -> tuple[float, str]:
        """``max(0.95, p99 of real-vs-real nearest-neighbour SSIM)`` and its explanation."""
        p99 = self.real_nn_ssim.get("p99")
        if p99 is None or not math.isfinite(p99):
            return MEMORISATION_FLOOR, f"fixed {MEMORISATION_FLOOR} (no real-vs-real reference: one scan)"
        value = max(MEMORISATION_FLOOR, float(p99))
        return value, (
            f"max({MEMORISATION_FLOOR}, p{MEMORISATION_PERCENTILE:g} of real-vs-real nearest-neighbour "
            f"SSIM = {p99:.4f})"
        )


@dataclass(frozen=True)
class SynthesisEvaluation:
    """All synthesis metrics of one synthetic set against one real set.

    Attributes:
        n_real, n_synthetic: set sizes (images: slices for 2D, volumes for 3D).
        kind: ``"2d-slice"`` or ``"3d-volume"``.
        diversity_synthetic, diversity_real: mean pairwise MS-SSIM (lower = more diverse).
        foreground_w1: Wasserstein-1 between foreground intensity distributions (model scale).
        frechet: the Fréchet distance on fixed features (NOT FID).
        memorisation: nearest real image per sample and the near-copy flags.
        foreground_threshold: the model-scale foreground threshold used.
        sources: provenance (folders, checkpoint, grid).
    """

    n_real: int
    n_synthetic: int
    kind: str
    diversity_synthetic: Diversity
    diversity_real: Diversity
    foreground_w1: float
    frechet: FrechetResult
    memorisation: Memorisation
    foreground_threshold: float
    sources: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN written as ``NaN``)."""
        out = asdict(self)
        out["metric_notes"] = {
            "ms_ssim": "mean pairwise MS-SSIM (MONAI MultiScaleSSIMMetric); lower = more diverse",
            "foreground_w1": "Wasserstein-1 distance between foreground (> threshold) intensity "
                             "distributions on the model scale [0, 1]",
            "frechet": FEATURES_DESCRIPTION,
            "memorisation": "nearest real image by SSIM (window 11, sigma 1.5); flagged above threshold",
        }
        return out

    def table(self) -> str:
        """The aligned text table ``medidiff evaluate-synthesis`` prints."""
        d_s, d_r, m = self.diversity_synthetic, self.diversity_real, self.memorisation
        s = d_s.settings
        nn = np.asarray(m.nearest_ssim) if m.nearest_ssim else np.asarray([np.nan])
        rows = [
            ("images", f"{self.n_synthetic} synthetic vs {self.n_real} real ({self.kind})"),
            ("MS-SSIM synthetic",
             f"{d_s.mean:.4f} +- {d_s.std:.4f} ({d_s.pairs} pairs; lower = more diverse)"),
            ("MS-SSIM real", f"{d_r.mean:.4f} +- {d_r.std:.4f} ({d_r.pairs} pairs)"),
            ("MS-SSIM settings", f"{s.scales} scales, window {s.kernel_size} (sigma {s.kernel_sigma:.3g})"),
            ("foreground W1",
             f"{self.foreground_w1:.4f} (model scale, foreground > {self.foreground_threshold:g})"),
            ("Frechet (stats-v1)", f"{self.frechet.distance:.4f} ({self.frechet.num_features} fixed "
                                   "features; NOT FID)"),
            ("nearest real SSIM", f"median {np.nanmedian(nn):.4f}, max {np.nanmax(nn):.4f}"),
            ("memorisation", f"{len(m.flagged)} of {len(m.nearest_ssim)} flagged (SSIM > {m.threshold:.4f})"),
        ]
        rows += [("  near-copy", f"{name} ~ {real} (SSIM {v:.4f})")
                 for name, real, v in zip(self._synthetic_names(), m.nearest_real, m.nearest_ssim)
                 if name in m.flagged]
        width = max(len(r[0]) for r in rows) + 2
        return "\n".join(f"{k.ljust(width)}{v}" for k, v in rows)

    def _synthetic_names(self) -> tuple[str, ...]:
        return tuple(self.sources.get("synthetic_names", ()))


def evaluate_against(
    reference: RealReference,
    synthetic: ImageSet,
    *,
    memorisation_threshold: float | None = None,
    sources: Mapping[str, Any] | None = None,
) -> SynthesisEvaluation:
    """Score a synthetic set against a prepared real reference.

    Args:
        reference: from :meth:`RealReference.build`.
        synthetic: the synthetic images (same grid and ``spatial_dims`` as the real ones).
        memorisation_threshold: SSIM above which a sample is a near-copy; ``None``: the
            reference's default (:meth:`RealReference.default_threshold`).
        sources: provenance to keep in the result.

    Raises:
        DataError: the sets have different image shapes, or fewer than 2 synthetic images.
    """
    real = reference.images
    if synthetic.images.shape[1:] != real.images.shape[1:]:
        raise DataError(
            f"synthetic images {synthetic.images.shape[2:]} and real images {real.images.shape[2:]} "
            "are not on the same grid"
        )
    if len(synthetic) < 2:
        raise DataError(f"need at least 2 synthetic images; got {len(synthetic)}")
    if memorisation_threshold is None:
        threshold, rule = reference.default_threshold()
    else:
        if not 0 < memorisation_threshold <= 1:
            raise ConfigError(f"--memorisation-threshold must lie in (0, 1]; got {memorisation_threshold}")
        threshold, rule = float(memorisation_threshold), "given"
    feats = image_features(synthetic)
    frechet = FrechetResult(
        distance=frechet_distance(reference.features, feats), num_features=feats.shape[1],
        n_real=len(real), n_synthetic=len(synthetic),
    )
    nearest, names = [], []
    for image in synthetic.images:
        scores = reference.search.ssim(image)
        best = int(np.argmax(scores))
        nearest.append(float(scores[best]))
        names.append(real.names[best])
    flagged = tuple(n for n, v in zip(synthetic.names, nearest) if v > threshold)
    memo = Memorisation(threshold, rule, tuple(nearest), tuple(names), flagged, dict(reference.real_nn_ssim))
    kind = "2d-slice" if synthetic.spatial_dims == 2 else "3d-volume"
    return SynthesisEvaluation(
        n_real=len(real), n_synthetic=len(synthetic), kind=kind,
        diversity_synthetic=ms_ssim_diversity(synthetic, max_pairs=reference.max_pairs, seed=reference.seed),
        diversity_real=reference.diversity,
        foreground_w1=foreground_wasserstein(reference.foreground, foreground_values(
            synthetic, reference.foreground_threshold)),
        frechet=frechet, memorisation=memo, foreground_threshold=reference.foreground_threshold,
        sources={**(sources or {}), "synthetic_names": list(synthetic.names)},
    )


def evaluate_synthesis(
    real: Any,
    synthetic_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    split: str | None = None,
    memorisation_threshold: float | None = None,
    foreground_threshold: float = DEFAULT_FOREGROUND_THRESHOLD,
    max_pairs: int = 500,
    seed: int = 0,
) -> SynthesisEvaluation:
    """Evaluate a folder of synthetic samples against real scans.

    Args:
        real: real scans (files, folder, glob, datalist, or a list of these); pass the
            model's training scans for a meaningful memorisation check.
        synthetic_dir: a ``medidiff synthesize`` output folder (or any folder of volumes
            with ``checkpoint``).
        checkpoint: the model whose preprocessing defines the common grid; default: the
            one recorded in ``synthetic_dir/synthesis_config.json``.
        split: the split of a Decathlon ``real`` datalist (default ``training``).
        memorisation_threshold: SSIM above which a sample is a near-copy (default: see
            :meth:`RealReference.default_threshold`).
        foreground_threshold: model-scale foreground for the intensity distance.
        max_pairs: MS-SSIM pairs per set.
        seed: seed of random pair / query subsets.

    Returns:
        The :class:`SynthesisEvaluation`.
    """
    synthetic, source, prep, min_foreground = load_synthetic_images(synthetic_dir, checkpoint=checkpoint)
    real_set = load_real_images(real, prep, spatial_dims=synthetic.spatial_dims,
                                min_foreground=min_foreground, split=split)
    reference = RealReference.build(real_set, foreground_threshold=foreground_threshold,
                                    max_pairs=max_pairs, seed=seed)
    sources = {
        "synthetic": asdict(source),
        "real": [str(r) for r in (real if isinstance(real, (list, tuple)) else [real])],
        "model_grid": {"shape": list(prep.shape), "spacing": list(prep.spacing)},
        "real_min_foreground": min_foreground if synthetic.spatial_dims == 2 else None,
    }
    return evaluate_against(reference, synthetic, memorisation_threshold=memorisation_threshold,
                            sources=sources)
