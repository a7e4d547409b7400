"""The anomaly pipeline's library: post-processing maths, method configs, network-evaluation
counts, seeding, the 2D and 3D paths (sliding windows), geometry, and thresholds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medidiff.anomaly.detector import AnomalyDetector
from medidiff.anomaly.methods import MethodConfig, patch_grid
from medidiff.anomaly.runner import calibrate
from medidiff.anomaly.seeds import input_seed, noise_seed, patch_seed, stable_seed, start_seed
from medidiff.anomaly.thresholds import Thresholds
from medidiff.constants import MULTI_STARTS
from medidiff.errors import CheckpointError, ConfigError, VolumeContentError
from medidiff.anomaly.postprocess import (
    PostprocessConfig,
    anomaly_map,
    median_filter,
    remove_small_components,
    residual_map,
    scoring_mask,
    segment,
    threshold_at_fpr,
    top_fraction_mean,
)

ROOT = Path(__file__).resolve().parents[1]
TEST_IMAGES = ROOT / "sample_data" / "test" / "images"
#: fast settings: small noise level, few steps, no erosion (the synthetic grids are thin)
FAST = {"t_start": 6}
POST = PostprocessConfig(erode=0, median_size=3)


class CountingModel(torch.nn.Module):
    """Wraps a network and counts its calls and the inputs it evaluated."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.images = 0

    def forward(self, x, t, **kwargs):
        self.calls += 1
        self.images += int(x.shape[0])
        return self.inner(x, t, **kwargs)


def _brain(shape, slices=None, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic "brain" (an ellipsoid of textured intensities) and its mask."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = sum(g**2 for g in grid[:2]) < 0.6
    if slices is not None:
        keep = np.zeros(shape[2], bool)
        keep[list(slices)] = True
        mask &= keep[None, None, :]
    image = (
        np.where(mask, 0.5 + 0.2 * rng.standard_normal(shape), 0.0).clip(0, 1).astype(np.float32)
    )
    return image, mask


# ---- post-processing maths, against hand-computed values ------------------------------------


def test_threshold_at_fpr_is_the_inverted_cdf_quantile():
    values = np.arange(1, 101, dtype=np.float32)  # 1 .. 100, shuffled below
    np.random.default_rng(0).shuffle(values)
    thr = threshold_at_fpr(values, 0.05)
    assert thr == 95.0  # the ceil(0.95 * 100) = 95th smallest value
    assert np.mean(values > thr) == pytest.approx(0.05)  # exactly the target FPR
    assert threshold_at_fpr(values, 0.10) == 90.0
    assert threshold_at_fpr(values.reshape(10, 10), 0.01) == 99.0  # any shape, flattened
    # 7 values at 5 %: ceil(0.95 * 7) = 7th smallest = the maximum; nothing healthy flagged
    assert threshold_at_fpr(np.array([3.0, 1, 7, 5, 2, 4, 6]), 0.05) == 7.0
    # 40 values at 5 %: ceil(38.0) = 38th smallest; two values lie above
    forty = np.arange(40, dtype=np.float64)
    assert threshold_at_fpr(forty, 0.05) == 37.0 and np.sum(forty > 37.0) == 2
    with pytest.raises(ConfigError, match="fpr"):
        threshold_at_fpr(values, 0.0)
    with pytest.raises(ConfigError, match="fpr"):
        threshold_at_fpr(values, 1.5)
    with pytest.raises(ConfigError, match="no healthy"):
        threshold_at_fpr(np.zeros(0), 0.05)


def test_top_fraction_mean_by_hand():
    assert top_fraction_mean(np.arange(1, 201, dtype=np.float32), 0.01) == pytest.approx(
        199.5
    )  # top 2
    assert top_fraction_mean(np.array([5.0, 1.0, 3.0]), 0.01) == 5.0  # at least one value
    assert top_fraction_mean(np.array([4.0, 8.0, 6.0, 2.0]), 0.5) == 7.0  # (8 + 6) / 2
    assert math.isnan(top_fraction_mean(np.zeros(0)))


def test_residuals_by_hand():
    x = np.array([[[0.5, 0.2]]], np.float32)  # (1, 1, 2)
    r1 = np.array([[[0.1, 0.4]]], np.float32)
    r2 = np.array([[[0.5, 0.0]]], np.float32)
    np.testing.assert_allclose(residual_map(x, r1, "l1"), [[[0.4, 0.2]]], atol=1e-7)
    np.testing.assert_allclose(residual_map(x, r1, "l2"), [[[0.16, 0.04]]], atol=1e-7)
    # an ensemble averages the residuals, not the reconstructions: (|0.4|+0)/2, (0.2+0.2)/2
    np.testing.assert_allclose(residual_map(x, np.stack([r1, r2]), "l1"), [[[0.2, 0.2]]], atol=1e-7)


@pytest.mark.parametrize("size", [2, 3, 4, 9])
def test_median_filter_on_the_region_box_equals_the_whole_array_inside_the_region(size):
    rng = np.random.default_rng(size)
    values = rng.random((14, 12, 10)).astype(np.float32)
    full = median_filter(values, size)
    regions = []
    inner = np.zeros(values.shape, bool)
    inner[5:8, 4:7, 3:6] = True  # the box stays off the array's edges
    regions.append(inner)
    edge = np.zeros(values.shape, bool)
    edge[0:3, 9:12, 4] = True  # touches two edges: scipy's reflection must be the same
    edge[13, 0, 9] = True  # a far corner: the box spans the array
    regions.append(edge)
    regions.append(rng.random(values.shape) > 0.7)
    for region in regions:
        boxed = median_filter(values, size, region=region)
        np.testing.assert_array_equal(boxed[region], full[region])
    # outside the box the input comes back unchanged; an empty region filters nothing
    boxed = median_filter(values, size, region=inner)
    assert boxed[0, 0, 0] == values[0, 0, 0] and boxed[13, 11, 9] == values[13, 11, 9]
    np.testing.assert_array_equal(median_filter(values, size, region=np.zeros_like(inner)), values)


def test_erosion_median_and_components_by_hand():
    cube = np.zeros((11, 11, 11), bool)
    cube[2:9, 2:9, 2:9] = True  # 7^3
    assert scoring_mask(cube, 2).sum() == 27  # two 6-connected erosions: 7 -> 5 -> 3
    assert scoring_mask(cube, 0).sum() == 343
    spike = np.zeros((7, 7, 7), np.float32)
    spike[3, 3, 3] = 1.0
    assert median_filter(spike, 3).max() == 0.0  # an isolated voxel is a median outlier
    np.testing.assert_array_equal(median_filter(spike, 1), spike)  # 1 disables
    block = np.zeros((7, 7, 7), np.float32)
    block[1:6, 1:6, 1:6] = 1.0
    assert median_filter(block, 3)[3, 3, 3] == 1.0  # the inside of a 5^3 block survives
    seg = np.zeros((9, 9, 9), bool)
    seg[0, 0, 0] = True  # 1 voxel
    seg[4:6, 4:6, 4:6] = True  # 8 voxels
    kept = remove_small_components(seg, 2)
    assert kept.sum() == 8 and not kept[0, 0, 0]
    assert remove_small_components(seg, 0).sum() == 9
    values = np.where(seg, 0.9, 0.1)
    inside = np.ones_like(seg)
    inside[4, 4, 4] = False
    assert segment(values, inside, 0.5).sum() == 8  # strictly greater, inside the mask only


def test_anomaly_map_zero_outside_the_eroded_mask():
    image, mask = _brain((24, 24, 12))
    recon = image.copy()
    recon[10:14, 10:14, 5:8] += 0.4  # a 4x4x3 "lesion" the reconstruction removed
    amap, scored = anomaly_map(image, recon, mask, PostprocessConfig(erode=1, median_size=3))
    assert amap.dtype == np.float32 and (amap[~scored] == 0).all()
    assert scored.sum() < mask.sum()
    assert amap[11:13, 11:13, 6].min() == pytest.approx(0.4, abs=1e-6)  # core kept by the median
    assert amap[2, 2, 6] == 0.0


def test_postprocess_config_validation():
    with pytest.raises(ConfigError, match="residual"):
        PostprocessConfig(residual="l3")
    with pytest.raises(ConfigError, match="erode"):
        PostprocessConfig(erode=-1)
    with pytest.raises(ConfigError, match="top_fraction"):
        PostprocessConfig(top_fraction=0.0)
    with pytest.raises(ConfigError, match="unknown"):
        PostprocessConfig.from_dict({"median": 3})
    cfg = PostprocessConfig(median_size=0, min_component=10)
    assert PostprocessConfig.from_dict(cfg.to_dict()) == cfg


# ---- method configs --------------------------------------------------------------------------


def _resolved(method, **kw):
    return MethodConfig(method, **kw).resolve(
        num_train_timesteps=1000, noise="simplex", input_shape=(64, 80)
    )


def test_method_defaults_and_declared_cost():
    anoddpm, ddim, x0 = _resolved("anoddpm"), _resolved("ddim"), _resolved("x0")
    patched, ensemble = _resolved("patched"), _resolved("ensemble")
    assert (anoddpm.t_start, anoddpm.sampler, anoddpm.steps) == (250, "ddpm", 251)
    assert (ddim.t_start, ddim.sampler, ddim.steps) == (50, "ddim", 3)
    assert x0.steps == 1 and patched.t_start == 500 and ensemble.t_starts == (250, 500, 750)
    assert anoddpm.noise == "simplex"  # the checkpoint's noise by default
    assert _resolved("ddim", noise="gaussian").noise == "gaussian"
    # patches: half the input (32 x 40), stride half a patch: starts 0/16/32 and 0/20/40
    assert patched.patch_size == (32, 40) and patched.patch_stride == (16, 20)
    shape = (64, 80)
    costs = {m.method: m.nfe_per_image(shape) for m in (anoddpm, ddim, x0, patched, ensemble)}
    assert costs == {"anoddpm": 251, "ddim": 3, "x0": 1, "patched": 9, "ensemble": 3}
    assert costs["anoddpm"] / costs["ddim"] >= 20  # the speed target, by construction
    assert MethodConfig.from_dict(ddim.to_dict()) == ddim


def test_method_config_refuses_bad_combinations():
    with pytest.raises(ConfigError, match="unknown"):
        MethodConfig("dpm")
    with pytest.raises(ConfigError, match="t_starts"):
        MethodConfig("ensemble", t_start=100)
    with pytest.raises(ConfigError, match="sampler"):
        MethodConfig("anoddpm", sampler="ddim")
    with pytest.raises(ConfigError, match="one-shot"):
        MethodConfig("x0", steps=5)
    with pytest.raises(ConfigError, match="patched"):
        MethodConfig("ddim", patch_size=(8, 8))
    with pytest.raises(ConfigError, match="outside"):
        _resolved("ddim", t_start=1000)
    with pytest.raises(ConfigError, match="exceeds"):
        _resolved("ddim", t_start=5, steps=10)
    with pytest.raises(ConfigError, match="exceeds"):
        _resolved("patched", patch_size=(65, 10))
    assert _resolved("ddim", t_start=1).steps == 2  # default steps capped at t + 1


def test_patch_grid_covers_every_pixel():
    patches = patch_grid((10, 7), (4, 4), (3, 3))
    # x starts 0, 3, 6 (6 + 4 = 10); y starts 0, 3 (3 + 4 = 7)
    assert [(p[0].start, p[1].start) for p in patches] == [
        (0, 0),
        (0, 3),
        (3, 0),
        (3, 3),
        (6, 0),
        (6, 3),
    ]
    cover = np.zeros((10, 7), int)
    for p in patches:
        cover[p] += 1
    assert cover.min() >= 1


def test_stable_seed_is_stable_and_distinct():
    assert stable_seed(0, "a", 3) == stable_seed(0, "a", 3)
    assert len({stable_seed(0, "a", z) for z in range(100)}) == 100
    assert 0 <= stable_seed(1, "b") < 2**62


def test_seed_derivation_is_pinned():
    """The seeds of inputs, starts and patches: fixed numbers (maps stay reproducible across
    versions), and the composition the detector, the methods and the figures share."""
    base = input_seed(0, "tumor-000", 12, (0, 0))
    assert base == stable_seed(0, "tumor-000", 12, (0, 0)) == 3932767537862284683
    assert start_seed(base, 1) == stable_seed(base, 1) == 4345149247423622689
    assert patch_seed(start_seed(base, 0), 3) == stable_seed(stable_seed(base, 0), "patch", 3)
    assert noise_seed(0, "tumor-000", 12, (0, 0), 1) == start_seed(base, 1)
    assert input_seed(0, "x", 0, [np.int64(4), 0]) == input_seed(0, "x", 0, (4, 0))


# ---- the detector on the tiny 2D model ---------------------------------------------------------


@pytest.mark.parametrize(
    "method, kwargs, nfe",
    [
        ("anoddpm", {"t_start": 6}, 7),  # full chain: t + 1
        ("ddim", {"t_start": 6, "steps": 3}, 3),
        ("x0", {"t_start": 6}, 1),
        ("patched", {"t_start": 6}, 9),  # 3 x 3 patches of 16 x 20 on a 32 x 40 slice
        ("ensemble", {"t_starts": (3, 6)}, 2),
    ],
)
def test_declared_network_evaluations_are_what_runs(tiny_checkpoint_2d, method, kwargs, nfe):
    det = AnomalyDetector(tiny_checkpoint_2d, MethodConfig(method, **kwargs), POST, batch_size=64)
    assert det.input_shape == (32, 40) and det.nfe_per_input == nfe
    counter = CountingModel(det.model)
    det.model = counter
    image, mask = _brain((32, 40, 4), slices=(0, 1, 3))  # slice 2 has no brain: skipped
    grid = det.score_grid(image, mask, "case")
    assert counter.images == 3 * nfe == grid.network_evaluations
    # all 3 slices (x 9 patches) fit in one batch: one call per denoising step and start
    assert counter.calls == (1 if method == "patched" else nfe)
    np.testing.assert_array_equal(grid.reconstruction[:, :, 2], image[:, :, 2])
    assert (grid.anomaly_map[:, :, 2] == 0).all()
    assert grid.reconstruction.shape == image.shape and np.isfinite(grid.score)


def test_small_batches_split_the_calls_not_the_evaluations(tiny_checkpoint_2d):
    det = AnomalyDetector(
        tiny_checkpoint_2d, MethodConfig("ddim", t_start=6, steps=2), POST, batch_size=2
    )
    det.model = counter = CountingModel(det.model)
    image, mask = _brain((32, 40, 5))
    det.score_grid(image, mask, "case")
    assert counter.images == 5 * 2
    assert counter.calls == 3 * 2  # ceil(5 / 2) batches x 2 steps


def test_same_seed_same_map_whatever_the_batch_size(tiny_checkpoint_2d):
    image, mask = _brain((32, 40, 6))
    method = MethodConfig("ddim", t_start=40, steps=2)
    maps = [
        AnomalyDetector(tiny_checkpoint_2d, method, POST, batch_size=b, seed=s).score_grid(
            image, mask, "x"
        )
        for b, s in ((1, 7), (16, 7), (4, 8))
    ]
    np.testing.assert_allclose(maps[0].anomaly_map, maps[1].anomaly_map, atol=1e-5)
    np.testing.assert_allclose(maps[0].reconstruction, maps[1].reconstruction, atol=1e-5)
    assert np.abs(maps[0].reconstruction - maps[2].reconstruction).max() > 1e-3  # another seed
    # the scan name is part of the seed: another name, other noise
    other = AnomalyDetector(tiny_checkpoint_2d, method, POST, seed=7).score_grid(image, mask, "y")
    assert np.abs(other.reconstruction - maps[0].reconstruction).max() > 1e-3


def test_geometry_of_native_outputs(tiny_checkpoint_2d):
    det = AnomalyDetector(tiny_checkpoint_2d, MethodConfig("x0", **FAST))
    for name in ("tumor-001", "tumor-000"):  # PIR on disk, and RAS
        result = det.score_file(TEST_IMAGES / f"{name}.nii.gz")
        ref = result.reference
        assert result.anomaly_map.shape == ref.shape == result.reconstruction.shape
        assert result.anomaly_map.dtype == np.float32 and result.segmentation is None
        assert result.name == name and result.network_evaluations > 0
        # the reconstruction is in the input's intensity units: the background stays the input's
        background = ref.array <= 0
        np.testing.assert_array_equal(result.reconstruction[background], ref.array[background])
        inside = ref.array > 0
        assert abs(
            np.median(result.reconstruction[inside]) - np.median(ref.array[inside])
        ) < 0.3 * np.median(ref.array[inside])
        assert (result.anomaly_map[background] == 0).all()


def test_thresholds_quantiles_and_refusals(tiny_checkpoint_2d, tiny_checkpoint_3d, tmp_path):
    det = AnomalyDetector(tiny_checkpoint_2d, MethodConfig("x0", **FAST), POST)
    # hand-made maps: scan a holds 1..50, scan b 51..100 -> pooled 95th-percentile = 95
    thr = Thresholds.from_healthy(
        det,
        [np.arange(1, 51, dtype=np.float32), np.arange(51, 101, dtype=np.float32)],
        {"a": 0.2, "b": 0.4, "c": 0.3},
        fpr=0.05,
    )
    assert thr.voxel_threshold == 95.0 and thr.num_voxels == 100 and thr.num_scans == 3
    assert thr.scan_threshold == 0.4  # ceil(0.95 * 3) = 3rd smallest: the largest of 3
    assert "largest healthy score" in thr.scan_threshold_rule
    path = thr.save(tmp_path / "t.json")
    loaded = Thresholds.load(path)
    assert loaded == thr
    loaded.check(det)  # same checkpoint and config: accepted
    image, mask = _brain((32, 40, 4))
    with pytest.raises(ConfigError, match="steps"):
        AnomalyDetector(
            tiny_checkpoint_2d, MethodConfig("ddim", t_start=6, steps=2), POST
        ).score_grid(image, mask, "case", thresholds=loaded)
    with pytest.raises(ConfigError, match="median_size"):
        loaded.check(
            AnomalyDetector(tiny_checkpoint_2d, MethodConfig("x0", **FAST), PostprocessConfig(erode=0))
        )
    with pytest.raises(CheckpointError, match="calibrate"):
        loaded.check(AnomalyDetector(tiny_checkpoint_3d, MethodConfig("x0", **FAST), POST))
    (tmp_path / "bad.json").write_text('{"voxel_threshold": 1}')
    with pytest.raises(ConfigError, match="not a medidiff thresholds"):
        Thresholds.load(tmp_path / "bad.json")


def test_calibrate_then_segment(tiny_checkpoint_2d):
    det = AnomalyDetector(
        tiny_checkpoint_2d, MethodConfig("x0", **FAST), PostprocessConfig(erode=1)
    )
    val = sorted((ROOT / "sample_data" / "val" / "images").glob("*.nii.gz"))[:2]
    thr = calibrate(det, val, fpr=0.1, allow_few=True)
    assert thr.num_scans == 2 and set(thr.scan_scores) == {p.name[:-7] for p in val}
    assert det.score_file(val[0]).segmentation is None  # no thresholds given: no segmentation
    healthy = det.score_file(val[0], thresholds=thr)
    # on a calibration scan the flagged fraction of scored voxels is at most about the FPR
    assert healthy.grid.segmentation.sum() <= 0.2 * healthy.grid.mask.sum()
    assert (
        healthy.segmentation.dtype == np.uint8 and healthy.flagged is False
    )  # max score: not above
    assert healthy.voxels_over_threshold == int(healthy.segmentation.sum())
    # the thresholds' component rule applies to segmentations: at a threshold that flags
    # every scored voxel, components under the whole mask's size are all dropped
    from dataclasses import replace

    low = replace(thr, voxel_threshold=-1.0)
    assert det.score_file(val[0], thresholds=low).grid.segmentation.sum() > 0
    huge = replace(low, min_component=10**9)
    assert det.score_file(val[0], thresholds=huge).grid.segmentation.sum() == 0


def test_empty_mask_is_a_clear_error(tiny_checkpoint_2d):
    det = AnomalyDetector(tiny_checkpoint_2d, MethodConfig("x0", **FAST), POST)
    image, mask = _brain((32, 40, 4))
    with pytest.raises(VolumeContentError, match="empty"):
        det.score_grid(image, np.zeros_like(mask), "case")
    with pytest.raises(VolumeContentError, match="erod"):
        AnomalyDetector(
            tiny_checkpoint_2d, MethodConfig("x0", **FAST), PostprocessConfig(erode=3)
        ).score_grid(image, mask, "case")


# ---- the 3D path ---------------------------------------------------------------------------


def test_3d_whole_volume_and_sliding_windows(tiny_checkpoint_3d):
    det = AnomalyDetector(
        tiny_checkpoint_3d, MethodConfig("ddim", t_start=6, steps=2), POST, batch_size=8
    )
    assert det.spatial_dims == 3 and det.input_shape == (16, 16, 16)
    det.model = counter = CountingModel(det.model)
    image, mask = _brain((16, 16, 16))
    whole = det.score_grid(image, mask, "vol")
    assert counter.images == 2 and whole.network_evaluations == 2  # one volume, two steps
    # a grid larger than the trained 16^3: MONAI windows of 16^3 with 25 % overlap (interval 12):
    # x 24 -> starts 0, 8; y 20 -> 0, 4; z 16 -> 0: four windows, one batch of four per step
    counter.images = counter.calls = 0
    big, big_mask = _brain((24, 20, 16))
    result = det.score_grid(big, big_mask, "big")
    assert result.reconstruction.shape == (24, 20, 16) and result.anomaly_map.shape == (24, 20, 16)
    assert counter.images == 4 * 2 and counter.calls == 2
    assert np.isfinite(result.reconstruction).all()
    # each window is denoised from its own noise: the map is the same with one window per call
    det1 = AnomalyDetector(
        tiny_checkpoint_3d, MethodConfig("ddim", t_start=6, steps=2), POST, batch_size=1
    )
    again = det1.score_grid(big, big_mask, "big")
    np.testing.assert_allclose(again.reconstruction, result.reconstruction, atol=1e-5)


def test_3d_native_outputs(tiny_checkpoint_3d):
    det = AnomalyDetector(
        tiny_checkpoint_3d, MethodConfig("x0", **FAST), PostprocessConfig(erode=1)
    )
    result = det.score_file(TEST_IMAGES / "tumor-001.nii.gz")
    assert result.anomaly_map.shape == result.reference.shape == (112, 96, 96)
    assert result.network_evaluations == 1


def test_overlay_shows_the_most_anomalous_slice(tmp_path):
    from medidiff.viz.overlay import choose_slices, save_overlay

    image, mask = _brain((20, 20, 30))
    amap = np.zeros_like(image)
    amap[8:12, 8:12, 15] = 1.0  # all the anomaly in slice 15
    assert choose_slices(np.zeros_like(image), mask, 4) == [6, 12, 17, 23]  # evenly over 0..29
    assert choose_slices(amap, mask, 4) == [6, 12, 15, 23]  # the nearest one gives way to 15
    path = save_overlay(
        image, image, amap, tmp_path / "o.png", segmentation=amap > 0.5, truth=amap > 0.5
    )
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_overlay_colour_scale_is_shared_by_every_scan():
    """With thresholds every overlay uses 3x the voxel threshold; without, one fixed scale
    in the map's units (never each scan's own maximum)."""
    from types import SimpleNamespace

    from medidiff.viz.overlay import UNCALIBRATED_TOP, map_scale

    calibrated = map_scale(SimpleNamespace(voxel_threshold=0.05))
    assert calibrated.top == pytest.approx(0.15) and calibrated.threshold == 0.05
    for uncalibrated in (map_scale(None), map_scale(SimpleNamespace(voxel_threshold=0.0))):
        assert uncalibrated.top == UNCALIBRATED_TOP["l1"] and uncalibrated.threshold is None
        assert "not calibrated" in uncalibrated.how


def test_a_detector_is_composed_from_any_reconstructor(tiny_checkpoint_2d):
    """The detector scores whatever its reconstructor returns, and reports the network
    evaluations the reconstructor counted; it keeps no state between calls."""
    from medidiff.anomaly.results import Reconstruction

    class Halve:
        method = MethodConfig("x0")
        seed, input_shape, nfe_per_input, model = 5, (32, 40), 1, None

        def reconstruct(self, image, region, name, *, progress=None):
            if progress is not None:
                progress(7, 7)
            return Reconstruction(np.asarray(image, np.float32)[None] * 0.5, 7)

    det = AnomalyDetector(tiny_checkpoint_2d, postprocess=PostprocessConfig(erode=0, median_size=0),
                          reconstructor=Halve())
    assert det.model is None and det.seed == 5 and det.describe()["nfe_per_input"] == 1
    image, mask = _brain((32, 40, 4))
    seen = []
    grid = det.score_grid(image, mask, "case", progress=lambda done, total: seen.append(done))
    assert grid.network_evaluations == 7 and seen == [7]
    np.testing.assert_allclose(grid.anomaly_map[mask], 0.5 * image[mask], atol=1e-6)
    assert vars(det).keys() == {"reconstructor", "checkpoint", "preprocessing", "spatial_dims",
                                "postprocess", "input_profile", "input_check", "volume_index"}
    with pytest.raises(ConfigError, match="not both"):
        AnomalyDetector(tiny_checkpoint_2d, MethodConfig("x0"), reconstructor=Halve())


# ---- multi-reconstruction, THOR and structure-aware residuals ------------------------------------


def test_structure_residuals_vanish_on_a_perfect_reconstruction_and_see_a_moved_edge():
    from medidiff.anomaly.residuals import RESIDUALS, residual

    rng = np.random.default_rng(0)
    x = rng.random((12, 12, 6)).astype(np.float32)
    for kind in ("l1", "l2", "ssim", "gradient", "l1ssim"):
        assert np.abs(residual(kind, x, x)).max() < 1e-5, kind
    # a step edge moved by two voxels: equal intensities, different structure
    a = np.zeros((16, 16, 4), np.float32)
    a[:8] = 1.0
    b = np.zeros_like(a)
    b[:10] = 1.0
    for kind in ("ssim", "gradient"):
        r = residual(kind, a, b)
        assert r[7:11].mean() > 5 * r[:4].mean() + 1e-3, kind
    assert set(RESIDUALS) >= {"l1", "l2", "ssim", "gradient", "l1ssim", "mahalanobis"}
    with pytest.raises(ConfigError, match="residual must be"):
        residual("lpips", a, b)


def test_mahalanobis_residual_by_hand():
    from medidiff.anomaly.residuals import residual

    x = np.array([[[1.0, 0.5, 0.5]]], np.float32)
    recons = np.array([[[[0.0, 0.4, 0.5]]], [[[0.2, 0.6, 0.5]]]], np.float32)  # (K=2, 1, 1, 3)
    # mu = (0.1, 0.5, 0.5); sample variance (ddof 1) = (0.02, 0.02, 0); floor = median
    # sigma over the voxels = sqrt(0.02)
    out = residual("mahalanobis", x, recons)
    floor2 = 0.02
    expected = [0.9 / math.sqrt(0.02 + floor2), 0.0, 0.0]
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-4)
    with pytest.raises(ConfigError, match="several reconstructions"):
        residual("mahalanobis", x, recons[:1])


def test_thor_guide_keeps_the_input_path_where_the_estimate_agrees():
    from medidiff.anomaly.methods import thor_guide
    from medidiff.diffusion.schedules import NoiseSchedule

    schedule = NoiseSchedule.create("linear_beta", 100)
    x0 = torch.rand(1, 1, 16, 16)
    eps = torch.randn_like(x0)
    x_prev = torch.randn_like(x0)
    pred = x0.clone()
    pred[..., 6:9, 6:9] += 0.5  # the estimate disagrees with the input in one spot
    guided = thor_guide(schedule, x0, "epsilon")(40, x_prev, pred, eps)
    a = schedule.alphas_cumprod[40].float()
    on_input_path = a.sqrt() * x0 + (1 - a).sqrt() * eps
    # far from the spot: the noised input; at the spot (weight 1): the model's state
    torch.testing.assert_close(guided[..., 0, 0], on_input_path[..., 0, 0])
    torch.testing.assert_close(guided[..., 7, 7], x_prev[..., 7, 7])


def test_multi_and_thor_declare_their_cost(tiny_checkpoint_2d):
    multi, thor = _resolved("multi"), _resolved("thor")
    assert multi.t_starts == MULTI_STARTS and multi.steps == 1
    assert multi.nfe_per_image((64, 80)) == len(MULTI_STARTS)
    assert thor.nfe_per_image((64, 80)) == thor.steps
    with pytest.raises(ConfigError, match="several starts"):
        MethodConfig("multi", t_start=50)
    det = AnomalyDetector(tiny_checkpoint_2d, MethodConfig("multi", t_starts=(3, 3, 6)))
    assert det.postprocess.residual == "l1ssim"  # multi's default residual
    det.postprocess = PostprocessConfig(residual="mahalanobis", erode=0, median_size=3)
    image, mask = _brain((32, 40, 3))
    det.model = counter = CountingModel(det.model)
    grid = det.score_grid(image, mask, "case")
    assert counter.images == 3 * 3 and np.isfinite(grid.anomaly_map).all()
    thor_det = AnomalyDetector(tiny_checkpoint_2d, MethodConfig("thor", t_start=6, steps=3), POST)
    thor_det.model = counter = CountingModel(thor_det.model)
    grid = thor_det.score_grid(image, mask, "case")
    assert counter.images == 3 * 3 and np.isfinite(grid.anomaly_map).all()
