"""Distribution distances between synthetic and real images: the Fréchet distance on fixed,
hand-crafted features (``medidiff-stats-v1``, NOT FID) and the Wasserstein-1 distance of
foreground intensities.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a = rng.normal(size=(500, 3))
    >>> round(frechet_distance(a, a), 6)
    0.0
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medidiff.errors import DataError
from medidiff.synthesis.image_sets import ImageSet

__all__ = [
    "DEFAULT_FOREGROUND_THRESHOLD",
    "FEATURES_DESCRIPTION",
    "FEATURES_VERSION",
    "FrechetResult",
    "foreground_values",
    "foreground_wasserstein",
    "frechet_distance",
    "image_features",
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

