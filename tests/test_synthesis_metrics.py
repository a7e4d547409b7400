"""Synthesis metrics on hand-made cases with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medidiff.synthesis.metrics import (
    ImageSet,
    RealReference,
    SSIMSearch,
    evaluate_against,
    foreground_wasserstein,
    frechet_distance,
    image_features,
    ms_ssim_diversity,
    ms_ssim_settings,
)


def _blobs(n: int, shape=(32, 40), seed: int = 0) -> np.ndarray:
    """``n`` distinct smooth "scans": a bright ellipse with random position, size and texture."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    out = []
    for _ in range(n):
        centre = rng.uniform(-0.3, 0.3, len(shape))
        radii = rng.uniform(0.4, 0.8, len(shape))
        r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
        freq = rng.uniform(2, 6, len(shape))
        texture = 0.5 + 0.25 * np.prod([np.sin(f * np.pi * g) for f, g in zip(freq, grids)], axis=0)
        out.append(np.where(r2 < 1, texture, 0.0).astype(np.float32))
    return np.stack(out)


# ---- Fréchet distance --------------------------------------------------------------------


def test_frechet_identical_sets_is_zero():
    a = np.random.default_rng(0).normal(size=(200, 6))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_one_dimensional_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.0, 1.0, 400), rng.normal(2.0, 3.0, 300)
    # 1D: (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2 with unbiased variances
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


def test_frechet_matches_scipy_sqrtm_reference():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(250, 5)) @ rng.normal(size=(5, 5)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * np.real(sqrtm(ca @ cb)))
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)


def test_frechet_with_fewer_samples_than_features_stays_finite():
    rng = np.random.default_rng(3)
    value = frechet_distance(rng.normal(size=(5, 20)), rng.normal(size=(6, 20)))
    assert np.isfinite(value) and value > 0


# ---- foreground intensity distance --------------------------------------------------------


def test_wasserstein_hand_computed():
    # equal-size samples: W1 = mean |sorted(a) - sorted(b)| = (0.1 + 0.3) / 2
    assert foreground_wasserstein(np.array([0.4, 0.2]), np.array([0.3, 0.7])) == pytest.approx(0.2)


def test_wasserstein_identical_and_shifted_sets():
    images = _blobs(4)
    real = ImageSet.from_arrays(images, 2)
    assert foreground_wasserstein(real, real) == 0.0
    shifted = ImageSet.from_arrays(np.where(images > 0, images + 0.1, 0.0), 2)
    assert foreground_wasserstein(real, shifted) == pytest.approx(0.1, abs=1e-6)


# ---- features ------------------------------------------------------------------------------


def test_features_closed_forms():
    ramp = np.tile(np.arange(16, dtype=np.float32)[:, None] / 16, (1, 16))  # x / 16 along axis 0
    f = image_features(np.stack([np.full((16, 16), 0.3, np.float32), ramp])[:, None], 2)
    assert f.shape == (2, 33)
    const, lin = f
    assert const[0] == pytest.approx(0.3) and const[1:4] == pytest.approx([0, 0, 0], abs=1e-12)
    assert const[32] == 1.0  # all of it above the 0.05 foreground threshold
    # the ramp: first differences 1/16 along axis 0 and 0 along axis 1, averaged over axes;
    # its discrete Laplacian is 0
    assert lin[2] == pytest.approx(1 / 32) and lin[3] == pytest.approx(0.0, abs=1e-12)
    assert image_features(np.zeros((1, 1, 16, 16, 16)), 3).shape == (1, 25)


def test_features_are_deterministic():
    images = ImageSet.from_arrays(_blobs(3), 2)
    np.testing.assert_array_equal(image_features(images), image_features(images))


# ---- MS-SSIM ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, scales, window",
    [((192, 224), 5, 11), ((64, 80), 3, 11), ((32, 40), 3, 7), ((16, 16, 16), 3, 3), ((8, 8), 2, 3)],
)
def test_ms_ssim_settings_fit_monai(shape, scales, window):
    from monai.metrics import MultiScaleSSIMMetric

    s = ms_ssim_settings(shape)
    assert (s.scales, s.kernel_size) == (scales, window)
    assert sum(s.weights) == pytest.approx(1.0)
    x = torch.rand(1, 1, *shape)
    metric = MultiScaleSSIMMetric(len(shape), kernel_size=s.kernel_size, kernel_sigma=s.kernel_sigma,
                                  weights=s.weights)
    assert torch.isfinite(metric(x, x)).all()  # MONAI accepts the settings at this size


def test_monai_default_ms_ssim_refuses_small_images():
    from monai.metrics import MultiScaleSSIMMetric

    with pytest.raises(ValueError, match="must be larger"):
        MultiScaleSSIMMetric(2)(torch.rand(1, 1, 32, 40), torch.rand(1, 1, 32, 40))


def test_diversity_of_copies_and_of_noise():
    copies = ImageSet.from_arrays([_blobs(1)[0]] * 4, 2)
    d = ms_ssim_diversity(copies)
    assert d.mean == pytest.approx(1.0, abs=1e-5) and d.pairs == 6 and d.all_pairs
    noise = ImageSet.from_arrays(np.random.default_rng(0).random((6, 32, 40)), 2)
    assert ms_ssim_diversity(noise).mean < 0.2
    subset = ms_ssim_diversity(noise, max_pairs=5)
    assert subset.pairs == 5 and not subset.all_pairs


# ---- SSIM search and memorisation --------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 40), (16, 16, 16)])
def test_ssim_search_matches_monai(shape):
    from monai.metrics import SSIMMetric

    rng = np.random.default_rng(4)
    candidates = rng.random((5, 1, *shape)).astype(np.float32)
    query = (0.6 * candidates[2, 0] + 0.4 * rng.random(shape)).astype(np.float32)
    ours = SSIMSearch(candidates, len(shape), chunk=2).ssim(query)
    reference = SSIMMetric(len(shape), data_range=1.0, reduction="none")(
        torch.from_numpy(np.broadcast_to(query, candidates.shape[1:])[None].repeat(5, 0)),
        torch.from_numpy(candidates),
    ).reshape(-1).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    assert int(np.argmax(ours)) == 2


def test_exact_copy_is_flagged_and_a_new_image_is_not():
    real_images = _blobs(6, seed=10)
    real = ImageSet.from_arrays(real_images, 2, names=[f"real{i}" for i in range(6)])
    reference = RealReference.build(real, max_pairs=20)
    new = _blobs(1, seed=99)[0]
    synthetic = ImageSet.from_arrays([real_images[3], new], 2, names=["copy", "new"])
    result = evaluate_against(reference, synthetic)
    memo = result.memorisation
    assert memo.nearest_ssim[0] == pytest.approx(1.0, abs=1e-6) and memo.nearest_real[0] == "real3"
    assert memo.nearest_ssim[1] < memo.threshold
    assert memo.flagged == ("copy",)
    # the default threshold is at least the floor and above the real-vs-real nearest neighbours
    assert memo.threshold >= 0.95 and memo.threshold >= memo.real_nn_ssim["p99"]
    assert "near-copy" in result.table() and "copy ~ real3" in result.table()


def test_similar_subjects_raise_the_default_threshold():
    base = _blobs(3, seed=5)
    # two scans of "different subjects" that are almost identical (e.g. one template)
    near_twin = base[0] * np.float32(0.999)
    real = ImageSet.from_arrays([*base, near_twin], 2)
    reference = RealReference.build(real, reference_queries=4)
    threshold, rule = reference.default_threshold()
    assert threshold > 0.99 and "p99" in rule


def test_identical_sets_give_zero_distances():
    images = _blobs(8, seed=7)
    real = ImageSet.from_arrays(images, 2)
    result = evaluate_against(RealReference.build(real, max_pairs=50), ImageSet.from_arrays(images, 2),
                              memorisation_threshold=0.99)
    assert result.frechet.distance == pytest.approx(0.0, abs=1e-9)
    assert result.foreground_w1 == 0.0
    assert result.diversity_synthetic.mean == pytest.approx(result.diversity_real.mean)
    assert len(result.memorisation.flagged) == 8  # every one is a training image
    assert "NOT FID" in result.to_dict()["frechet"]["description"]


def test_benchmark_verdicts_two_sided_and_no_worse():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "pipelines" / "benchmark_synthesis.py"
    spec = importlib.util.spec_from_file_location("benchmark_synthesis", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ref = {"frechet": 1.0, "ms_ssim": 0.40}
    real = 0.25
    assert bench.no_worse({"frechet": 1.09, "ms_ssim": 0.43}, ref, real)  # within 10 % on both
    assert bench.no_worse({"frechet": 0.30, "ms_ssim": 0.30}, ref, real)  # better on both
    assert not bench.no_worse({"frechet": 1.20, "ms_ssim": 0.40}, ref, real)  # Frechet worse
    # less diverse than the reference by more than 10 %, and further from the real set
    assert not bench.no_worse({"frechet": 0.50, "ms_ssim": 0.50}, ref, real)


def test_small_sets_get_a_frechet_warning_and_large_ones_do_not():
    """Fréchet from < FRECHET_MIN_SAMPLES images per side is biased: table, JSON say so."""
    from medidiff.synthesis.metrics import FRECHET_MIN_SAMPLES

    real = ImageSet.from_arrays(_blobs(FRECHET_MIN_SAMPLES, seed=1), 2)
    reference = RealReference.build(real, max_pairs=20)
    few = evaluate_against(reference, ImageSet.from_arrays(_blobs(2, seed=2), 2))
    assert len(few.warnings) == 1 and "only 2 synthetic image(s)" in few.warnings[0]
    assert "real" not in few.warnings[0].split("(<")[0]  # the real side has enough
    assert few.table().splitlines()[0].startswith("WARNING: Frechet distance from only 2")
    assert json.loads(json.dumps(few.to_dict()))["warnings"] == list(few.warnings)
    enough = evaluate_against(
        reference, ImageSet.from_arrays(_blobs(FRECHET_MIN_SAMPLES, seed=3), 2))
    assert enough.warnings == () and "WARNING" not in enough.table()
    assert enough.to_dict()["warnings"] == []
