"""Voxel-wise residuals between a scan and its pseudo-healthy reconstruction(s).

Each residual kind is one function ``(x, x_hat[, region]) -> r`` on the model grid, with
``x`` of shape ``(X, Y, Z)`` and ``x_hat`` of shape ``(K, X, Y, Z)`` (K reconstructions);
:func:`residual` picks one by name. Intensities are in [0, 1] (the model's scale).

====================  ==========================================================  ======
kind                  r(v) at voxel v                                             K
====================  ==========================================================  ======
``l1``                mean_k |x - x_hat_k| (Behrendt et al., MIDL 2023)           >= 1
``l2``                mean_k (x - x_hat_k)^2 (AnoDDPM's squared error)            >= 1
``ssim``              mean_k (1 - SSIM_local(x, x_hat_k)): structure, not         >= 1
                      intensity (Wang et al. 2004, Gaussian window sigma 1.5 vx)
``gradient``          mean_k | |grad x| - |grad x_hat_k| |: edges that appear,    >= 1
                      vanish or move (Gaussian derivatives, sigma 1 voxel)
``l1ssim``            ``l1`` x (1 + ``ssim`` / mean healthy-like ssim): the L1    >= 1
                      residual, weighted up where local structure also differs
``mahalanobis``       |x - mu| / sqrt(sigma^2 + s0^2), mu and sigma^2 the mean    >= 2
                      and variance of the K reconstructions at v, s0 the median
                      sigma inside the brain (a floor so that voxels the model
                      reconstructs identically every time do not blow up)
====================  ==========================================================  ======

``mahalanobis`` is the per-voxel Mahalanobis distance of the input to the distribution of
its own pseudo-healthy reconstructions (several starts or noise draws), after Behrendt et
al., "Leveraging the Mahalanobis distance to enhance unsupervised brain MRI anomaly
detection", MICCAI 2024 (arXiv 2407.12474): where the model is unsure what healthy tissue
looks like the reconstructions disagree and a difference counts less; where they agree a
small difference counts more. With one intensity per voxel the covariance is a variance.

Example:
    >>> import numpy as np
    >>> x = np.zeros((4, 4, 4), np.float32); xh = np.zeros((2, 4, 4, 4), np.float32)
    >>> float(residual("l1", x, xh).max()), float(residual("ssim", x, xh).max())
    (0.0, 0.0)
"""

from __future__ import annotations

import numpy as np

from medidiff.errors import ConfigError

__all__ = ["RESIDUALS", "residual"]

#: SSIM constants for data range 1 (Wang et al. 2004: K1 = 0.01, K2 = 0.03)
_C1, _C2 = 0.01**2, 0.03**2
_SSIM_SIGMA = 1.5
_GRADIENT_SIGMA = 1.0


def _l1(x: np.ndarray, xh: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    return np.abs(x[None] - xh).mean(axis=0)


def _l2(x: np.ndarray, xh: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    return ((x[None] - xh) ** 2).mean(axis=0)


def _ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Local SSIM of two volumes with a Gaussian window (sigma 1.5 voxels, all axes)."""
    from scipy.ndimage import gaussian_filter

    g = lambda v: gaussian_filter(v, _SSIM_SIGMA, mode="nearest")  # noqa: E731
    mu_a, mu_b = g(a), g(b)
    var_a = g(a * a) - mu_a**2
    var_b = g(b * b) - mu_b**2
    cov = g(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + _C1) * (2 * cov + _C2)
    den = (mu_a**2 + mu_b**2 + _C1) * (var_a + var_b + _C2)
    return num / den


def _ssim(x: np.ndarray, xh: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    return np.mean([np.clip(1.0 - _ssim_map(x, r), 0.0, 2.0) for r in xh], axis=0)


def _grad_magnitude(v: np.ndarray) -> np.ndarray:
    from scipy.ndimage import gaussian_gradient_magnitude

    return gaussian_gradient_magnitude(v, _GRADIENT_SIGMA, mode="nearest")


def _gradient(x: np.ndarray, xh: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    gx = _grad_magnitude(x)
    return np.mean([np.abs(gx - _grad_magnitude(r)) for r in xh], axis=0)


def _l1ssim(x: np.ndarray, xh: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    s = _ssim(x, xh, region)
    inside = s[region] if region is not None and region.any() else s
    scale = float(np.mean(inside)) or 1.0
    return _l1(x, xh, region) * (1.0 + s / scale)


def _mahalanobis(x: np.ndarray, xh: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    if xh.shape[0] < 2:
        raise ConfigError(
            "residual 'mahalanobis' needs several reconstructions (method 'multi' or "
            "'ensemble'); got one"
        )
    mu = xh.mean(axis=0)
    var = xh.var(axis=0, ddof=1)
    sigma = np.sqrt(var)
    inside = sigma[region] if region is not None and region.any() else sigma[sigma > 0]
    floor = float(np.median(inside)) if inside.size else 0.0
    floor = max(floor, 1e-3)  # one grey level in [0, 1] / 1000: never divide by zero
    return np.abs(x - mu) / np.sqrt(var + floor**2)


_KINDS = {
    "l1": _l1,
    "l2": _l2,
    "ssim": _ssim,
    "gradient": _gradient,
    "l1ssim": _l1ssim,
    "mahalanobis": _mahalanobis,
}
RESIDUALS = tuple(_KINDS)


def residual(
    kind: str, image: np.ndarray, reconstructions: np.ndarray, region: np.ndarray | None = None
) -> np.ndarray:
    """The voxel-wise residual of ``kind`` (see the module table).

    Args:
        kind: one of :data:`RESIDUALS`.
        image: x, ``(X, Y, Z)`` (or 2D) on the model grid.
        reconstructions: x_hat, same shape as ``image`` or ``(K, *image.shape)``.
        region: the brain mask (bool, ``image``'s shape); ``mahalanobis`` and ``l1ssim``
            take their normalising statistics inside it (default: the whole array).

    Returns:
        Float32 array of ``image``'s shape.

    Raises:
        ConfigError: unknown kind, or ``mahalanobis`` with a single reconstruction.
    """
    if kind not in _KINDS:
        raise ConfigError(f"residual must be one of {', '.join(RESIDUALS)}; got {kind!r}")
    x = np.asarray(image, dtype=np.float32)
    xh = np.asarray(reconstructions, dtype=np.float32)
    if xh.ndim == x.ndim:
        xh = xh[None]
    if xh.shape[1:] != x.shape:
        raise ConfigError(
            f"reconstructions of shape {xh.shape[1:]} do not match the image {x.shape}"
        )
    reg = None if region is None else np.asarray(region, dtype=bool)
    return np.asarray(_KINDS[kind](x, xh, reg), dtype=np.float32)
