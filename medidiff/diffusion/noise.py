"""Noise for the diffusion forward process: Gaussian and multi-octave simplex, in 2D and 3D.

Denoising diffusion (Ho et al. 2020) corrupts an image with white Gaussian noise
eps ~ N(0, I). AnoDDPM (Wyatt et al. 2022, "AnoDDPM: Anomaly Detection with Denoising
Diffusion Probabilistic Models using Simplex Noise") replaces eps with multi-octave
*simplex* noise: smooth, spatially correlated noise whose low frequencies can hide a whole
lesion, so that the reverse process must repaint it as healthy tissue. They used 6 octaves,
persistence 0.8 and a base "frequency" of 64 on 256 x 256 slices.

Simplex noise here is Gustavson's classic lattice gradient noise ("Simplex noise
demystified", 2005), written in vectorised torch for 2D and 3D and evaluated on the target
device. Each sample gets its own seeded permutation table (which lattice gradient sits at
which lattice vertex) and its own random lattice offsets per octave and channel, so samples
and slices differ.

Everything is driven by :func:`sample_noise`. Per-sample reproducibility is a contract:
with ``seeds=[s_0, ..., s_{B-1}]`` (or one ``torch.Generator`` per sample) sample ``b``
depends only on ``s_b``, the shape and the device, never on the batch size or on the
sample's position in the batch.

Example:
    >>> spec = NoiseSpec("simplex")
    >>> eps = sample_noise(spec, (2, 1, 32, 32), seeds=[0, 1])
    >>> tuple(eps.shape)
    (2, 1, 32, 32)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from medidiff.constants import NOISE_KINDS
from medidiff.errors import ConfigError

__all__ = ["NOISE_KINDS", "NoiseSpec", "per_sample_generators", "sample_noise"]

# Period of the lattice hash: lattice coordinates are taken modulo 256.
_PERM_SIZE = 256


@dataclass(frozen=True)
class NoiseSpec:
    """Which noise to draw, and the simplex parameters.

    Args:
        kind: ``"gaussian"`` (white, eps ~ N(0, I)) or ``"simplex"`` (multi-octave simplex
            noise, as in AnoDDPM). The other fields only apply to ``"simplex"``.
        octaves: number of simplex layers; octave ``o`` has wavelength
            ``frequency / 2**o`` pixels and amplitude ``persistence**o``.
        persistence: amplitude ratio between consecutive octaves, in (0, 1].
        frequency: the wavelength of the coarsest octave in pixels (voxels), as AnoDDPM's
            ``frequency`` argument: lattice coordinates are ``pixel_index / frequency``.
            ``None`` (default) adapts it to the image: a quarter of the smallest spatial
            size (AnoDDPM's 64 on 256 x 256 slices), but at least ``2**(octaves - 1)`` so
            that the finest octave is no finer than one pixel (finer octaves only alias
            into white noise on small images).
    """

    kind: str = "gaussian"
    octaves: int = 6
    persistence: float = 0.8
    frequency: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise ConfigError(
                f"noise kind {self.kind!r} is unknown; use one of {', '.join(NOISE_KINDS)}"
            )
        if isinstance(self.octaves, bool) or not isinstance(self.octaves, int) or self.octaves < 1:
            raise ConfigError(f"noise octaves must be an integer >= 1, got {self.octaves!r}")
        if not _is_real(self.persistence) or not 0.0 < self.persistence <= 1.0:
            raise ConfigError(f"noise persistence must be in (0, 1], got {self.persistence!r}")
        if self.frequency is not None and (
            not _is_real(self.frequency) or not math.isfinite(self.frequency) or self.frequency <= 0
        ):
            raise ConfigError(
                f"noise frequency must be a positive number of pixels or None (auto), "
                f"got {self.frequency!r}"
            )

    @classmethod
    def from_config(cls, diffusion: Any, kind: str | None = None) -> NoiseSpec:
        """The noise of a ``diffusion`` config section (:class:`medidiff.config.DiffusionConfig`).

        Args:
            diffusion: has ``noise``, ``simplex_octaves``, ``simplex_persistence`` and
                ``simplex_frequency``.
            kind: another noise kind with the same simplex settings (e.g. an anomaly
                method's ``--noise``); default: the config's.

        Returns:
            The spec (``frequency`` None, i.e. adaptive, when the config leaves it unset).
        """
        return cls(
            kind=diffusion.noise if kind is None else kind,
            octaves=diffusion.simplex_octaves,
            persistence=diffusion.simplex_persistence,
            frequency=diffusion.simplex_frequency or None,
        )

    def resolved_frequency(self, spatial_shape: Sequence[int]) -> float:
        """The coarsest wavelength in pixels for an image of ``spatial_shape``.

        Args:
            spatial_shape: ``(H, W)`` or ``(H, W, D)``.

        Returns:
            ``frequency`` when set, else ``max(min(spatial_shape) / 4, 2**(octaves - 1))``.
        """
        if self.frequency is not None:
            return float(self.frequency)
        return max(min(spatial_shape) / 4.0, 2.0 ** (self.octaves - 1))


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def per_sample_generators(
    seeds: Sequence[int], device: torch.device | str | None = None
) -> list[torch.Generator]:
    """One seeded ``torch.Generator`` per sample, on ``device``.

    Drawing sample ``b`` only from generator ``b`` is what makes a sample reproducible
    whatever the batch it is drawn in. Streams are device-specific: the same seed gives the
    same numbers on the same kind of device.

    Args:
        seeds: ``B`` integers.
        device: where the generators (and the numbers they draw) live; default CPU.

    Returns:
        ``B`` generators, generator ``b`` seeded with ``seeds[b]``.
    """
    device = torch.device(device if device is not None else "cpu")
    generators = []
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seeds must be integers, got {seed!r}")
        generators.append(torch.Generator(device=device).manual_seed(seed))
    return generators


def sample_noise(
    spec: NoiseSpec,
    shape: Sequence[int],
    *,
    seeds: Sequence[int] | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw a batch of noise.

    Gaussian noise is i.i.d. N(0, 1) as drawn. Simplex noise is normalised per sample and
    channel to zero mean and unit variance, so that it can stand in for eps in
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

    Randomness, in order of precedence:

    - ``seeds``: a sequence of ``B`` ints; sample ``b`` is drawn from its own generator
      seeded with ``seeds[b]`` (see :func:`per_sample_generators`), created on ``device``.
    - ``generator``: either one ``torch.Generator`` for the whole batch, or a sequence of
      ``B`` generators, one per sample (each advanced, so a second call draws fresh noise:
      this is how samplers draw a per-sample stream of step noises).
    - neither: torch's global random state.

    Args:
        spec: the kind of noise and its parameters.
        shape: ``(B, C, H, W[, D])``: batch, channels and 2 or 3 spatial dims.
        seeds: per-sample seeds; exclusive with ``generator``.
        generator: one generator, or ``B`` generators.
        device: device of the returned tensor; default: the generators' device, else CPU.
            Simplex noise is computed there; random numbers are drawn on the generators'
            device and moved.
        dtype: floating dtype of the returned tensor.

    Returns:
        Noise of ``shape``, on ``device``, of ``dtype``.

    Raises:
        ConfigError: on a bad shape, seeds of the wrong length, or seeds and generator both
            given.
    """
    shape = _check_shape(spec, shape)
    batch = shape[0]
    if seeds is not None and generator is not None:
        raise ConfigError("give either seeds or generator to sample_noise, not both")
    if seeds is not None:
        if isinstance(seeds, (str, bytes)) or len(seeds) != batch:
            raise ConfigError(
                f"seeds must be a sequence of {batch} ints (one per sample), got {seeds!r}"
            )
        generator = per_sample_generators(seeds, device)

    generators: list[torch.Generator] | None = None
    single: torch.Generator | None = None
    if isinstance(generator, torch.Generator):
        single = generator
    elif generator is not None:
        generators = list(generator)
        if len(generators) != batch:
            raise ConfigError(
                f"generator must be one torch.Generator or {batch} of them (one per sample), "
                f"got {len(generators)}"
            )

    if device is None:
        if generators:
            device = generators[0].device
        elif single is not None:
            device = single.device
        else:
            device = torch.device("cpu")
    device = torch.device(device)
    # Compute in float32 (or float64 when asked), cast at the end.
    work_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    if spec.kind == "gaussian":
        noise = _gaussian(shape, generators, single, device, work_dtype)
    else:
        noise = _simplex(spec, shape, generators, single, device, work_dtype)
    return noise.to(dtype=dtype)


def _check_shape(spec: NoiseSpec, shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (4, 5) or any(s < 1 for s in shape):
        raise ConfigError(
            f"noise shape must be (B, C, H, W) or (B, C, H, W, D) with positive sizes, got {shape}"
        )
    if spec.kind == "simplex" and math.prod(shape[2:]) < 2:
        raise ConfigError(f"simplex noise needs at least 2 pixels per sample, got shape {shape}")
    return shape


def _gaussian(
    shape: tuple[int, ...],
    generators: list[torch.Generator] | None,
    single: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """eps ~ N(0, I) of ``shape``."""
    if generators is not None:
        per_sample = [
            torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generators
        ]
        return torch.stack(per_sample).to(device)
    if single is not None:
        return torch.randn(shape, generator=single, device=single.device, dtype=dtype).to(device)
    return torch.randn(shape, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Simplex noise
# --------------------------------------------------------------------------------------------


def _simplex(
    spec: NoiseSpec,
    shape: tuple[int, ...],
    generators: list[torch.Generator] | None,
    single: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """Multi-octave simplex noise of ``shape``, normalised per (sample, channel)."""
    batch, channels, spatial = shape[0], shape[1], shape[2:]
    ndim = len(spatial)

    # Per-sample random parameters, drawn from that sample's generator only:
    # a permutation of 0..255 (the lattice hash) and a lattice offset per octave/channel/axis.
    perms, offsets = [], []
    for b in range(batch):
        g = generators[b] if generators is not None else single
        g_device = g.device if g is not None else torch.device("cpu")
        perm = torch.randperm(_PERM_SIZE, generator=g, device=g_device)
        offset = torch.rand(
            (spec.octaves, channels, ndim), generator=g, device=g_device, dtype=torch.float64
        )
        perms.append(perm.to(device))
        offsets.append(offset.to(device))
    perm = torch.stack(perms).repeat(1, 2)  # (B, 512): doubled so hash sums need no wrap
    offset = torch.stack(offsets).to(dtype) * _PERM_SIZE  # (B, octaves, C, ndim)

    # Pixel coordinates, one row per spatial axis: (ndim, N) with N = prod(spatial).
    axes = [torch.arange(n, device=device, dtype=dtype) for n in spatial]
    grid = torch.stack([a.reshape(-1) for a in torch.meshgrid(*axes, indexing="ij")])

    wavelength = spec.resolved_frequency(spatial)
    amplitude = 1.0
    total = torch.zeros((batch, channels, grid.shape[1]), device=device, dtype=dtype)
    for octave in range(spec.octaves):
        # Lattice coordinates p = pixel / wavelength + offset, shape (B, C, N) per axis.
        coords = [
            grid[d].view(1, 1, -1) / wavelength + offset[:, octave, :, d, None] for d in range(ndim)
        ]
        coords = [c.reshape(batch, -1) for c in coords]  # (B, C*N)
        layer = _simplex_2d(*coords, perm) if ndim == 2 else _simplex_3d(*coords, perm)
        total += amplitude * layer.view(batch, channels, -1)
        wavelength /= 2.0
        amplitude *= spec.persistence

    # Normalise each (sample, channel) to zero mean and unit variance.
    total = total - total.mean(dim=-1, keepdim=True)
    total = total / total.std(dim=-1, unbiased=False, keepdim=True).clamp_min(1e-12)
    return total.view(shape)


# The 12 gradients at the midpoints of the edges of a cube (Gustavson 2005); 2D uses their
# first two components.
_GRADIENTS = (
    (1, 1, 0), (-1, 1, 0), (1, -1, 0), (-1, -1, 0),
    (1, 0, 1), (-1, 0, 1), (1, 0, -1), (-1, 0, -1),
    (0, 1, 1), (0, -1, 1), (0, 1, -1), (0, -1, -1),
)  # fmt: skip


def _hash(perm: Tensor, *lattice: Tensor) -> Tensor:
    """Gradient index of lattice vertices: perm[i + perm[j (+ perm[k])]] mod 12.

    Args:
        perm: (B, 512) doubled permutation table.
        lattice: integer lattice coordinates in [0, 256], each (B, M), outermost axis first.

    Returns:
        (B, M) long indices into the gradient table.
    """
    h = torch.zeros_like(lattice[0])
    for coordinate in reversed(lattice):
        h = torch.gather(perm, 1, coordinate + h)
    return h % len(_GRADIENTS)


def _corner(
    perm: Tensor, gradients: Tensor, lattice: list[Tensor], offsets: list[Tensor], radius2: float
) -> Tensor:
    """One simplex corner's contribution: max(0, r^2 - |d|^2)^4 * <g, d>.

    Args:
        perm: (B, 512) permutation table.
        gradients: (12, ndim) gradient table.
        lattice: the corner's integer lattice coordinates (mod 256), each (B, M).
        offsets: the point's displacement d from the corner, each (B, M).
        radius2: squared radius of the corner's kernel.
    """
    g = gradients[_hash(perm, *lattice)]  # (B, M, ndim)
    dot = sum(g[..., axis] * d for axis, d in enumerate(offsets))
    falloff = (radius2 - sum(d * d for d in offsets)).clamp_min(0.0)
    return falloff**4 * dot


def _simplex_2d(x: Tensor, y: Tensor, perm: Tensor) -> Tensor:
    """2D simplex noise at points (x, y), each (B, M); values in about [-1, 1]."""
    skew, unskew = 0.5 * (math.sqrt(3.0) - 1.0), (3.0 - math.sqrt(3.0)) / 6.0  # F2, G2
    gradients = torch.tensor(_GRADIENTS, dtype=x.dtype, device=x.device)[:, :2]

    # Skew the input space to find the simplex cell (i, j) the point lies in.
    s = (x + y) * skew
    i, j = torch.floor(x + s), torch.floor(y + s)
    t = (i + j) * unskew
    x0, y0 = x - (i - t), y - (j - t)  # displacement from the cell origin (unskewed)

    # Which of the cell's two triangles: lower (x0 > y0) steps in x first, else in y.
    i1 = (x0 > y0).to(x.dtype)
    j1 = 1.0 - i1
    x1, y1 = x0 - i1 + unskew, y0 - j1 + unskew  # from the middle corner
    x2, y2 = x0 - 1.0 + 2.0 * unskew, y0 - 1.0 + 2.0 * unskew  # from the far corner

    ii, jj = i.long() & (_PERM_SIZE - 1), j.long() & (_PERM_SIZE - 1)
    i1, j1 = i1.long(), j1.long()
    n = _corner(perm, gradients, [ii, jj], [x0, y0], 0.5)
    n = n + _corner(perm, gradients, [ii + i1, jj + j1], [x1, y1], 0.5)
    n = n + _corner(perm, gradients, [ii + 1, jj + 1], [x2, y2], 0.5)
    return 70.0 * n


def _simplex_3d(x: Tensor, y: Tensor, z: Tensor, perm: Tensor) -> Tensor:
    """3D simplex noise at points (x, y, z), each (B, M); values in about [-1, 1]."""
    skew, unskew = 1.0 / 3.0, 1.0 / 6.0  # F3, G3
    gradients = torch.tensor(_GRADIENTS, dtype=x.dtype, device=x.device)

    s = (x + y + z) * skew
    i, j, k = torch.floor(x + s), torch.floor(y + s), torch.floor(z + s)
    t = (i + j + k) * unskew
    x0, y0, z0 = x - (i - t), y - (j - t), z - (k - t)

    # The cube cell splits into 6 tetrahedra, chosen by the ordering of (x0, y0, z0): the
    # second corner steps along the largest axis, the third along the two largest.
    c_xy, c_yz, c_xz = x0 >= y0, y0 >= z0, x0 >= z0
    i1 = c_xy & (c_yz | c_xz)
    j1 = ~c_xy & c_yz
    k1 = ~c_yz & (~c_xy | ~c_xz)
    i2 = c_xy | (c_yz & c_xz)
    j2 = ~c_xy | c_yz
    k2 = ~c_yz | (~c_xy & ~c_xz)
    i1, j1, k1, i2, j2, k2 = (b.long() for b in (i1, j1, k1, i2, j2, k2))

    x1, y1, z1 = x0 - i1 + unskew, y0 - j1 + unskew, z0 - k1 + unskew
    x2, y2, z2 = x0 - i2 + 2.0 * unskew, y0 - j2 + 2.0 * unskew, z0 - k2 + 2.0 * unskew
    x3, y3, z3 = x0 - 1.0 + 3.0 * unskew, y0 - 1.0 + 3.0 * unskew, z0 - 1.0 + 3.0 * unskew

    mask = _PERM_SIZE - 1
    ii, jj, kk = i.long() & mask, j.long() & mask, k.long() & mask
    n = _corner(perm, gradients, [ii, jj, kk], [x0, y0, z0], 0.6)
    n = n + _corner(perm, gradients, [ii + i1, jj + j1, kk + k1], [x1, y1, z1], 0.6)
    n = n + _corner(perm, gradients, [ii + i2, jj + j2, kk + k2], [x2, y2, z2], 0.6)
    n = n + _corner(perm, gradients, [ii + 1, jj + 1, kk + 1], [x3, y3, z3], 0.6)
    return 32.0 * n
