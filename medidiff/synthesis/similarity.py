"""Image similarity: MS-SSIM diversity of a set, and the SSIM nearest-neighbour search of the
memorisation check.

- **Diversity, MS-SSIM** (Wang, Simoncelli & Bovik 2003; MONAI's
  :class:`monai.metrics.MultiScaleSSIMMetric`): the mean MS-SSIM over pairs of images.
  Lower means more diverse; a generator that collapses to one image scores near 1. The
  standard setting (5 scales, 11-voxel Gaussian window) needs images larger than 160
  voxels per side; :func:`ms_ssim_settings` keeps the largest window that allows at least
  3 scales (11, 7, 5, then 3 voxels, sigma scaled by window/11) and renormalises the first
  weights of Wang et al.'s five.
- **Memorisation**: for each synthetic sample, the real image with the highest SSIM
  (Gaussian window 11, sigma 1.5, MONAI's formulation), see :class:`SSIMSearch`.

Example:
    >>> ms_ssim_settings((64, 80)).scales
    3
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medidiff.errors import ConfigError
from medidiff.synthesis.image_sets import ImageSet

__all__ = [
    "MEMORISATION_FLOOR",
    "MEMORISATION_PERCENTILE",
    "Diversity",
    "MSSSIMSettings",
    "Memorisation",
    "SSIMSearch",
    "ms_ssim_diversity",
    "ms_ssim_settings",
]

#: The absolute floor of the default memorisation threshold (see :mod:`medidiff.synthesis.metrics`).
MEMORISATION_FLOOR = 0.95
#: The real-vs-real nearest-neighbour percentile that can raise the threshold above the floor.
MEMORISATION_PERCENTILE = 99.0

# Wang et al. 2003's scale weights (also MONAI's defaults).
_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_SSIM_WINDOW, _SSIM_SIGMA = 11, 1.5


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
# SSIM nearest neighbours (memorisation)
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

