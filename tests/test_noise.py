"""Tests for medidiff.diffusion.noise: Gaussian and simplex noise, seeding contracts, validation."""

from __future__ import annotations

import math
import time

import pytest
import torch

from medidiff.errors import ConfigError
from medidiff.diffusion.noise import (
    NoiseSpec,
    _simplex_2d,
    _simplex_3d,
    per_sample_generators,
    sample_noise,
)

SHAPES = {2: (4, 1, 64, 64), 3: (2, 1, 32, 32, 32)}


def lag1_autocorrelation(noise: torch.Tensor, dim: int) -> float:
    """Pearson correlation between neighbours along ``dim`` (pooled over the batch)."""
    a = noise.narrow(dim, 1, noise.shape[dim] - 1).flatten().double()
    b = noise.narrow(dim, 0, noise.shape[dim] - 1).flatten().double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


# ---------------------------------------------------------------------------------------------
# NoiseSpec validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"kind": "perlin"}, "kind"),
        ({"kind": "simplex", "octaves": 0}, "octaves"),
        ({"kind": "simplex", "octaves": 2.5}, "octaves"),
        ({"kind": "simplex", "persistence": 0.0}, "persistence"),
        ({"kind": "simplex", "persistence": 1.5}, "persistence"),
        ({"kind": "simplex", "frequency": -3.0}, "frequency"),
        ({"kind": "simplex", "frequency": float("nan")}, "frequency"),
    ],
)
def test_bad_spec_raises_config_error_naming_the_field(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        NoiseSpec(**kwargs)


def test_spec_is_frozen():
    spec = NoiseSpec("simplex")
    with pytest.raises(AttributeError):
        spec.kind = "gaussian"  # type: ignore[misc]


def test_auto_frequency_follows_anoddpm_and_keeps_octaves_above_a_pixel():
    spec = NoiseSpec("simplex")  # 6 octaves
    assert spec.resolved_frequency((256, 256)) == 64.0  # Wyatt et al.: 64 on 256^2
    assert spec.resolved_frequency((512, 400)) == 100.0
    assert spec.resolved_frequency((64, 64)) == 32.0  # finest octave 32 / 2^5 = 1 px
    assert NoiseSpec("simplex", frequency=10).resolved_frequency((256, 256)) == 10.0


@pytest.mark.parametrize(
    "shape", [(1, 64, 64), (2, 1, 8), (2, 1, 4, 4, 4, 4), (0, 1, 8, 8), (2, 1, 1, 1)]
)
def test_bad_shape_raises(shape):
    spec = NoiseSpec("simplex")  # (2, 1, 1, 1) is fine for Gaussian, not for simplex
    with pytest.raises(ConfigError, match="shape"):
        sample_noise(spec, shape)


def test_bad_seed_arguments_raise():
    with pytest.raises(ConfigError, match="seeds"):
        sample_noise(NoiseSpec(), (3, 1, 8, 8), seeds=[1, 2])
    with pytest.raises(ConfigError, match="not both"):
        sample_noise(NoiseSpec(), (1, 1, 8, 8), seeds=[1], generator=torch.Generator())
    with pytest.raises(ConfigError, match="generator"):
        sample_noise(NoiseSpec(), (3, 1, 8, 8), generator=per_sample_generators([1, 2]))
    with pytest.raises(ConfigError, match="integers"):
        per_sample_generators([1.5])


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("kind", ["gaussian", "simplex"])
def test_mean_zero_std_one(kind, spatial_dims):
    noise = sample_noise(
        NoiseSpec(kind), SHAPES[spatial_dims], seeds=[0, 1, 2, 3][: SHAPES[spatial_dims][0]]
    )
    assert abs(noise.mean().item()) < 0.02
    assert abs(noise.std().item() - 1.0) < 0.02


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_simplex_is_normalised_per_sample_and_channel(spatial_dims):
    shape = (3, 2) + (16,) * spatial_dims
    noise = sample_noise(NoiseSpec("simplex"), shape, seeds=[4, 5, 6]).flatten(2)
    torch.testing.assert_close(noise.mean(-1), torch.zeros(3, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(noise.std(-1, unbiased=False), torch.ones(3, 2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gaussian_is_white_and_simplex_is_smooth(spatial_dims):
    shape = SHAPES[spatial_dims]
    seeds = list(range(shape[0]))
    white = sample_noise(NoiseSpec("gaussian"), shape, seeds=seeds)
    smooth = sample_noise(NoiseSpec("simplex"), shape, seeds=seeds)
    for dim in range(2, 2 + spatial_dims):
        assert abs(lag1_autocorrelation(white, dim)) < 0.05
        assert lag1_autocorrelation(smooth, dim) > 0.5


def test_more_octaves_of_finer_detail_lower_the_correlation():
    shape, seeds = (2, 1, 64, 64), [0, 1]
    coarse = sample_noise(NoiseSpec("simplex", octaves=1, frequency=16), shape, seeds=seeds)
    fine = sample_noise(NoiseSpec("simplex", octaves=5, frequency=16), shape, seeds=seeds)
    assert lag1_autocorrelation(coarse, 2) > lag1_autocorrelation(fine, 2) + 0.1


# ---------------------------------------------------------------------------------------------
# Seeding contracts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("kind", ["gaussian", "simplex"])
def test_same_seeds_reproduce_and_different_seeds_differ(kind, spatial_dims):
    shape = (2, 1) + (16,) * spatial_dims
    a = sample_noise(NoiseSpec(kind), shape, seeds=[7, 8])
    b = sample_noise(NoiseSpec(kind), shape, seeds=[7, 8])
    c = sample_noise(NoiseSpec(kind), shape, seeds=[9, 10])
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], c[0])
    assert not torch.allclose(a[0], a[1])  # samples of one batch differ too


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("kind", ["gaussian", "simplex"])
def test_sample_depends_only_on_its_own_seed(kind, spatial_dims):
    spatial = (16,) * spatial_dims
    spec = NoiseSpec(kind)
    alone = sample_noise(spec, (1, 2) + spatial, seeds=[42])[0]
    in_batch = sample_noise(spec, (3, 2) + spatial, seeds=[1, 42, 3])[1]
    elsewhere = sample_noise(spec, (2, 2) + spatial, seeds=[42, 99])[0]
    assert torch.equal(alone, in_batch)
    assert torch.equal(alone, elsewhere)


def test_simplex_channels_differ():
    noise = sample_noise(NoiseSpec("simplex"), (1, 3, 32, 32), seeds=[0])
    assert not torch.allclose(noise[0, 0], noise[0, 1], atol=0.1)
    assert not torch.allclose(noise[0, 1], noise[0, 2], atol=0.1)


@pytest.mark.parametrize("kind", ["gaussian", "simplex"])
def test_generator_sequence_gives_a_fresh_reproducible_stream(kind):
    shape, spec = (2, 1, 16, 16), NoiseSpec(kind)
    generators = per_sample_generators([3, 4])
    first = sample_noise(spec, shape, generator=generators)
    second = sample_noise(spec, shape, generator=generators)
    assert not torch.allclose(first, second)
    assert torch.equal(first, sample_noise(spec, shape, seeds=[3, 4]))
    # The stream of sample 1 alone is the same as inside the batch.
    solo = per_sample_generators([4])
    sample_noise(spec, (1, 1, 16, 16), generator=solo)
    assert torch.equal(second[1:], sample_noise(spec, (1, 1, 16, 16), generator=solo))


@pytest.mark.parametrize("kind", ["gaussian", "simplex"])
def test_single_generator_and_global_seed_reproduce(kind):
    spec, shape = NoiseSpec(kind), (2, 1, 16, 16)
    a = sample_noise(spec, shape, generator=torch.Generator().manual_seed(5))
    b = sample_noise(spec, shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    torch.manual_seed(11)
    c = sample_noise(spec, shape)
    torch.manual_seed(11)
    d = sample_noise(spec, shape)
    assert torch.equal(c, d)


# ---------------------------------------------------------------------------------------------
# Device and dtype
# ---------------------------------------------------------------------------------------------

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", ["gaussian", "simplex"])
def test_device_and_dtype_are_respected(kind, dtype, device):
    noise = sample_noise(NoiseSpec(kind), (2, 1, 8, 8, 8), seeds=[0, 1], device=device, dtype=dtype)
    assert noise.dtype == dtype
    assert noise.device.type == device
    assert torch.isfinite(noise.float()).all()


def test_generators_on_cpu_can_feed_another_device():
    generators = per_sample_generators([1, 2], "cpu")
    noise = sample_noise(NoiseSpec("simplex"), (2, 1, 8, 8), generator=generators, device="meta")
    assert noise.device.type == "meta"


def test_simplex_speed_sanity():
    """16 x 1 x 64 x 64 simplex: vectorised, well under a second on a CPU (not asserted)."""
    start = time.perf_counter()
    noise = sample_noise(NoiseSpec("simplex"), (16, 1, 64, 64), seeds=list(range(16)))
    elapsed = time.perf_counter() - start
    assert noise.shape == (16, 1, 64, 64)
    print(f"simplex 16x1x64x64: {elapsed:.3f} s")


# ---------------------------------------------------------------------------------------------
# The vectorised simplex against a scalar reference (Gustavson 2005, written branch by branch)
# ---------------------------------------------------------------------------------------------

GRAD3 = [
    (1, 1, 0), (-1, 1, 0), (1, -1, 0), (-1, -1, 0), (1, 0, 1), (-1, 0, 1),
    (1, 0, -1), (-1, 0, -1), (0, 1, 1), (0, -1, 1), (0, 1, -1), (0, -1, -1),
]  # fmt: skip


def reference_simplex_2d(x: float, y: float, p: list[int]) -> float:
    f2, g2 = 0.5 * (math.sqrt(3) - 1), (3 - math.sqrt(3)) / 6
    s = (x + y) * f2
    i, j = math.floor(x + s), math.floor(y + s)
    t = (i + j) * g2
    x0, y0 = x - (i - t), y - (j - t)
    i1, j1 = (1, 0) if x0 > y0 else (0, 1)
    corners = [
        (x0, y0, 0, 0),
        (x0 - i1 + g2, y0 - j1 + g2, i1, j1),
        (x0 - 1 + 2 * g2, y0 - 1 + 2 * g2, 1, 1),
    ]
    ii, jj = i & 255, j & 255
    total = 0.0
    for dx, dy, oi, oj in corners:
        gi = p[ii + oi + p[jj + oj]] % 12
        tt = 0.5 - dx * dx - dy * dy
        if tt > 0:
            total += tt**4 * (GRAD3[gi][0] * dx + GRAD3[gi][1] * dy)
    return 70.0 * total


def reference_simplex_3d(x: float, y: float, z: float, p: list[int]) -> float:
    f3, g3 = 1 / 3, 1 / 6
    s = (x + y + z) * f3
    i, j, k = math.floor(x + s), math.floor(y + s), math.floor(z + s)
    t = (i + j + k) * g3
    x0, y0, z0 = x - (i - t), y - (j - t), z - (k - t)
    if x0 >= y0:
        if y0 >= z0:
            o1, o2 = (1, 0, 0), (1, 1, 0)
        elif x0 >= z0:
            o1, o2 = (1, 0, 0), (1, 0, 1)
        else:
            o1, o2 = (0, 0, 1), (1, 0, 1)
    else:
        if y0 < z0:
            o1, o2 = (0, 0, 1), (0, 1, 1)
        elif x0 < z0:
            o1, o2 = (0, 1, 0), (0, 1, 1)
        else:
            o1, o2 = (0, 1, 0), (1, 1, 0)
    offsets = [(0, 0, 0), o1, o2, (1, 1, 1)]
    ii, jj, kk = i & 255, j & 255, k & 255
    total = 0.0
    for n, (oi, oj, ok) in enumerate(offsets):
        dx, dy, dz = x0 - oi + n * g3, y0 - oj + n * g3, z0 - ok + n * g3
        gi = p[ii + oi + p[jj + oj + p[kk + ok]]] % 12
        tt = 0.6 - dx * dx - dy * dy - dz * dz
        if tt > 0:
            g = GRAD3[gi]
            total += tt**4 * (g[0] * dx + g[1] * dy + g[2] * dz)
    return 32.0 * total


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_vectorised_simplex_matches_scalar_reference(spatial_dims):
    generator = torch.Generator().manual_seed(0)
    perm = torch.randperm(256, generator=generator).repeat(2)
    points = torch.rand((spatial_dims, 400), generator=generator, dtype=torch.float64) * 40 - 5
    # Include exact ties (x0 == y0 == z0 on lattice points) to exercise the branch edges.
    points[:, :8] = torch.arange(8, dtype=torch.float64)
    p = perm.tolist()
    coords = [points[d][None] for d in range(spatial_dims)]
    if spatial_dims == 2:
        ours = _simplex_2d(*coords, perm[None])[0]
        ref = [reference_simplex_2d(x, y, p) for x, y in points.T.tolist()]
    else:
        ours = _simplex_3d(*coords, perm[None])[0]
        ref = [reference_simplex_3d(x, y, z, p) for x, y, z in points.T.tolist()]
    torch.testing.assert_close(ours, torch.tensor(ref, dtype=torch.float64), atol=1e-12, rtol=0)
    assert ours.abs().max() > 0.1  # not trivially zero
