"""Tests of medidiff.data.transforms: the invertible MONAI preprocessing chain."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medidiff.errors import ConfigError, VolumeContentError
from medidiff.io import Volume
from medidiff.data.transforms import (
    CT_WINDOWS,
    Preprocessing,
    intensity_to_model,
    intensity_to_native,
    preprocess,
    to_model,
    to_native,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*exceeds the model grid")

# An LPS, anisotropic native grid (spacing 1.5, 1.0, 3.0 mm), as ITK/DICOM would store it.
LPS_SHAPE = (40, 70, 24)
LPS_AFFINE = np.array(
    [[-1.5, 0, 0, 30.0], [0, -1.0, 0, 35.0], [0, 0, 3.0, -36.0], [0, 0, 0, 1]], dtype=np.float64
)


def world_coords(shape, affine) -> np.ndarray:
    """(X, Y, Z, 3) world (RAS mm) coordinates of every voxel centre."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def voxel_of(world: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return (world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T


def smooth_volume() -> Volume:
    """A smooth positive function of world position on the LPS grid."""
    w = world_coords(LPS_SHAPE, LPS_AFFINE)
    r2 = (w[..., 0] - 3) ** 2 + (w[..., 1] + 2) ** 2 + (w[..., 2] - 5) ** 2
    arr = 10.0 + 100.0 * np.exp(-r2 / (2 * 20.0**2))
    return Volume(arr.astype(np.float32), LPS_AFFINE, {"source": "smooth"})


def inside_fov(shape_native, native_affine, model_affine, model_shape, margin=1.0) -> np.ndarray:
    """Native voxels whose centres map inside the model grid, ``margin`` voxels from its edge."""
    v = voxel_of(world_coords(shape_native, native_affine), model_affine)
    return np.all((v >= margin) & (v <= np.asarray(model_shape) - 1 - margin), axis=-1)


# ----------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------


def test_round_trip_of_smooth_anisotropic_lps_volume():
    vol = smooth_volume()
    pre = preprocess(vol, Preprocessing(shape=(32, 32, 32), clip=False))
    back = intensity_to_native(to_native(pre.image, pre, vol), pre)
    assert back.shape == vol.shape and back.dtype == np.float32
    inside = inside_fov(vol.shape, vol.affine, pre.affine, pre.image.shape)
    assert inside.mean() > 0.5  # the test covers most of the volume
    rel = np.abs(back - vol.array)[inside] / np.ptp(vol.array)
    assert rel.max() < 0.02 and rel.mean() < 0.003
    # outside the model grid's field of view the result is 0
    v = voxel_of(world_coords(vol.shape, vol.affine), pre.affine)
    far_out = np.any((v < -1) | (v > np.asarray(pre.image.shape)), axis=-1)
    assert far_out.any() and np.all(to_native(pre.image, pre, vol)[far_out] == 0)


def test_round_trip_of_oblique_volume():
    """A scan tilted 12 degrees about z: the model grid keeps the tilt (MONAI Spacing,
    diagonal=False) and the inverse still lands on the native grid."""
    th = np.deg2rad(12.0)
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-1.2, 1.0, 2.5])
    affine[:3, 3] = [20.0, -30.0, -25.0]
    shape = (40, 60, 20)
    w = world_coords(shape, affine)
    centre = w.reshape(-1, 3).mean(0)
    arr = (10 + 100 * np.exp(-((w - centre) ** 2).sum(-1) / (2 * 20.0**2))).astype(np.float32)
    vol = Volume(arr, affine)
    pre = preprocess(vol, Preprocessing(shape=(40, 40, 32), clip=False))
    back = intensity_to_native(to_native(pre.image, pre, vol), pre)
    # native edge voxels see values MONAI extrapolated (border padding); skip 2 voxels
    interior = np.zeros(shape, bool)
    interior[2:-2, 2:-2, 2:-2] = True
    inside = interior & inside_fov(shape, affine, pre.affine, pre.image.shape)
    rel = np.abs(back - arr)[inside] / np.ptp(arr)
    assert inside.sum() > 10000 and rel.max() < 0.02


def test_model_grid_is_ras_with_target_spacing_and_shape():
    vol = smooth_volume()
    cfg = Preprocessing(spacing=(2.0, 2.5, 3.0), shape=(24, 36, 40))
    pre = preprocess(vol, cfg)
    assert pre.image.shape == (24, 36, 40) and pre.image.dtype == np.float32
    np.testing.assert_allclose(pre.affine[:3, :3], np.diag([2.0, 2.5, 3.0]), atol=1e-6)
    assert pre.native_shape == vol.shape
    np.testing.assert_array_equal(pre.native_affine, vol.affine)


@pytest.mark.parametrize("shape", [(16, 16, 16), (33, 20, 47), (64, 8, 30)])
def test_output_shape_equals_configured_shape(shape):
    pre = preprocess(smooth_volume(), Preprocessing(shape=shape))
    assert pre.image.shape == shape and pre.foreground.shape == shape


def test_marked_native_point_lands_at_same_world_position():
    """A small blob centred at a known world point is centred there on the model grid too."""
    w = world_coords(LPS_SHAPE, LPS_AFFINE)
    centre = np.array([-4.0, 7.5, 2.0])  # mm, RAS
    r2 = ((w - centre) ** 2).sum(-1)
    arr = np.exp(-r2 / (2 * 3.0**2)).astype(np.float32)
    arr[arr < 1e-3] = 0
    vol = Volume(arr, LPS_AFFINE)
    pre = preprocess(vol, Preprocessing(shape=(32, 32, 32), clip=False))
    weights = pre.image * pre.foreground
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in pre.image.shape], indexing="ij"), -1)
    centroid_voxel = (weights[..., None] * idx).sum((0, 1, 2)) / weights.sum()
    centroid_world = pre.affine[:3, :3] @ centroid_voxel + pre.affine[:3, 3]
    np.testing.assert_allclose(centroid_world, centre, atol=0.3)


def test_marked_native_voxels_land_at_same_world_position_in_model_space():
    """A block of marked native voxels (a mask) sits at the same world place on the model grid."""
    vol = smooth_volume()
    mark = np.zeros(LPS_SHAPE, np.uint8)
    mark[15:18, 38:42, 8:10] = 1  # 4.5 x 4 x 6 mm
    native_world = world_coords(LPS_SHAPE, LPS_AFFINE)[mark == 1].mean(0)
    pre = preprocess(vol, Preprocessing(shape=(32, 32, 32)), mask=vol.with_array(mark))
    assert pre.mask is not None and pre.mask.dtype == np.uint8
    hits = np.argwhere(pre.mask == 1)
    assert len(hits) > 0
    model_world = (hits @ pre.affine[:3, :3].T + pre.affine[:3, 3]).mean(0)
    np.testing.assert_allclose(model_world, native_world, atol=1.0)  # half a model voxel
    # to_model (one resampling through the affines) equals the chain's nearest resampling
    np.testing.assert_array_equal(to_model(mark, pre, interpolation="nearest"), pre.mask)


def test_nearest_inversion_of_label_map_is_exact_away_from_borders():
    vol = smooth_volume()
    w = world_coords(LPS_SHAPE, LPS_AFFINE)
    labels = (1 + (w[..., 0] > 0) + 2 * (w[..., 1] > 10) + 4 * (w[..., 2] > -5)).astype(np.int16)
    pre = preprocess(vol, Preprocessing(shape=(32, 32, 32)), mask=vol.with_array(labels))
    assert pre.mask is not None and set(np.unique(pre.mask)) <= set(range(0, 9))
    back = to_native(pre.mask, pre, vol, interpolation="nearest")
    assert back.dtype == np.int16 and back.shape == vol.shape
    away = (
        (np.abs(w[..., 0]) > 3) & (np.abs(w[..., 1] - 10) > 3) & (np.abs(w[..., 2] + 5) > 3)
        & inside_fov(vol.shape, vol.affine, pre.affine, pre.image.shape, margin=1.0)
    )
    assert away.sum() > 1000
    np.testing.assert_array_equal(back[away], labels[away])


def test_to_native_agrees_with_monai_inverse_of_the_same_chain():
    """Independent reference: MONAI's own inverse() of Orientation/Spacing/crop/pad."""
    from monai.data import MetaTensor
    from monai.transforms import BorderPad, Compose, Orientation, Spacing, SpatialCrop

    vol = smooth_volume()
    arr = vol.array.copy()
    arr[:4] = 0  # some background so the box is not the whole grid
    vol = vol.with_array(arr)
    pre = preprocess(vol, Preprocessing(shape=(30, 40, 28), clip=False))
    to_ras = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))
    spacing = Spacing(pixdim=(2.0, 2.0, 2.0), dtype=np.float32)
    resampled = spacing(to_ras(MetaTensor(torch.from_numpy(arr)[None], affine=torch.from_numpy(vol.affine))))
    lo = np.asarray(pre.box_start)
    hi, size = lo + np.asarray(pre.image.shape), np.asarray(resampled.shape[1:])
    crop = SpatialCrop(roi_start=np.maximum(lo, 0).tolist(), roi_end=np.minimum(hi, size).tolist())
    pad = BorderPad([int(b) for pair in zip(np.maximum(-lo, 0), np.maximum(hi - size, 0)) for b in pair],
                    value=float(resampled.min()))
    chain = Compose([to_ras, spacing, crop, pad])
    out = chain(MetaTensor(torch.from_numpy(arr)[None], affine=torch.from_numpy(vol.affine)))
    np.testing.assert_allclose(out.affine.numpy(), pre.affine, atol=1e-6)
    np.testing.assert_allclose(intensity_to_model(out[0].numpy(), pre), pre.image, atol=1e-5)
    model_map = np.random.default_rng(0).random(pre.image.shape).astype(np.float32)
    moved = MetaTensor(torch.from_numpy(model_map)[None], affine=out.affine.clone(),
                       applied_operations=out.applied_operations)
    reference = chain.inverse(moved)[0].numpy()
    ours = to_native(model_map, pre, vol)
    inside = inside_fov(vol.shape, vol.affine, pre.affine, pre.image.shape, margin=1.0)
    np.testing.assert_allclose(ours[inside], reference[inside], atol=1e-4)


def test_to_model_matches_chain_for_linear_image():
    vol = smooth_volume()
    pre = preprocess(vol, Preprocessing(shape=(24, 24, 24), clip=False))
    model = intensity_to_model(to_model(vol.array, pre, interpolation="linear"), pre)
    inner = (slice(1, -1),) * 3
    np.testing.assert_allclose(model[inner], pre.image[inner], atol=1e-4)


def test_crop_pad_centres_the_foreground_box():
    arr = np.zeros((50, 40, 30), np.float32)
    arr[10:20, 5:35, 3:9] = np.linspace(1, 9, 6)  # box: x 10-20, y 5-35, z 3-9 (RAS, 2 mm)
    vol = Volume(arr, np.diag([2.0, 2.0, 2.0, 1.0]))
    pre = preprocess(vol, Preprocessing(shape=(20, 20, 20)))
    # x: extent 10 -> 5 voxels of padding each side; y: extent 30 -> 5 cropped each side
    assert pre.box_start == (5, 10, -4)
    fg = np.argwhere(pre.foreground)
    assert fg.min(0).tolist() == [5, 0, 7] and fg.max(0).tolist() == [14, 19, 12]
    assert np.all(pre.image[~pre.foreground] == 0)  # background/padding -> 0


def test_warns_when_foreground_exceeds_the_grid():
    arr = np.zeros((30, 30, 30), np.float32)
    arr[2:28, 5:10, 5:10] = np.linspace(1, 9, 5)
    with pytest.warns(UserWarning, match="exceeds the model grid"):
        pre = preprocess(Volume(arr, np.diag([2.0, 2.0, 2.0, 1.0])), Preprocessing(shape=(20, 20, 20)))
    assert pre.box_start[0] == 2 + (26 - 20) // 2


# ----------------------------------------------------------------------------------------
# intensity
# ----------------------------------------------------------------------------------------


def _identity_grid_volume(values: np.ndarray) -> Volume:
    return Volume(values.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), {"source": "grid"})


def test_percentile_rescale_maps_foreground_p1_p99_to_0_1():
    rng = np.random.default_rng(1)
    arr = np.zeros((20, 20, 20), np.float32)
    arr[2:18, 2:18, 2:18] = rng.gamma(4.0, 50.0, size=(16, 16, 16))
    vol = _identity_grid_volume(arr)
    native_fg = arr[arr > 0]
    p1, p99 = np.percentile(native_fg, [1, 99])
    pre = preprocess(vol, Preprocessing(shape=(20, 20, 20), clip=False))
    assert pre.intensity["scheme"] == "percentile"
    assert pre.intensity["a_min"] == pytest.approx(p1) and pre.intensity["a_max"] == pytest.approx(p99)
    got = np.percentile(pre.image[pre.foreground], [1, 99])
    np.testing.assert_allclose(got, [0.0, 1.0], atol=1e-5)
    clipped = preprocess(vol, Preprocessing(shape=(20, 20, 20)))
    assert clipped.image.min() == 0.0 and clipped.image.max() == 1.0
    # about 1 % of the foreground saturates at each end
    assert 0.005 < np.mean(clipped.image[clipped.foreground] == 1.0) < 0.02
    np.testing.assert_allclose(intensity_to_native(pre.image[pre.foreground], pre), arr[arr > 0], rtol=1e-4)


def test_custom_percentiles():
    arr = np.zeros((10, 10, 10), np.float32)
    arr[1:9, 1:9, 1:9] = np.arange(512).reshape(8, 8, 8) + 1
    pre = preprocess(_identity_grid_volume(arr), Preprocessing(shape=(10, 10, 10), lower_percentile=5,
                                                               upper_percentile=95, clip=False))
    np.testing.assert_allclose([pre.intensity["a_min"], pre.intensity["a_max"]],
                               np.percentile(np.arange(512) + 1, [5, 95]))


@pytest.mark.parametrize(
    "window, hu_to_model",
    [
        ("brain", {40: 0.5, 0: 0.0, 80: 1.0, 20: 0.25, 1000: 1.0, -100: 0.0}),
        ("subdural", {80: 0.5, -20: 0.0, 180: 1.0}),
        ("soft_tissue", {50: 0.5, -150: 0.0, 250: 1.0}),
        ("lung", {-600: 0.5, -1350: 0.0, 150: 1.0}),
        ("bone", {400: 0.5, -500: 0.0, 1300: 1.0}),
    ],
)
def test_ct_window_presets_give_expected_values(window, hu_to_model):
    hus = list(hu_to_model)
    arr = np.full((8, 8, 8), -400.0, np.float32)
    for i, hu in enumerate(hus):
        arr[i] = hu
    # every voxel is foreground (threshold -2000 HU), so the geometry is the identity
    cfg = Preprocessing(modality="ct", window=window, shape=(8, 8, 8), foreground_threshold=-2000)
    pre = preprocess(_identity_grid_volume(arr), cfg)
    assert pre.box_start == (0, 0, 0)
    for i, hu in enumerate(hus):
        np.testing.assert_allclose(pre.image[i], hu_to_model[hu], atol=1e-6, err_msg=f"{window} {hu} HU")
    center, width = CT_WINDOWS[window]
    assert pre.intensity["window_center"] == center and pre.intensity["window_width"] == width


def test_ct_explicit_window_and_background_threshold():
    arr = np.full((12, 12, 12), -1000.0, np.float32)  # air
    arr[3:9, 3:9, 3:9] = 50.0
    arr[4, 4, 4] = 100.0
    cfg = Preprocessing(modality="ct", window_center=50, window_width=100, shape=(12, 12, 12))
    assert cfg.foreground_threshold == -500.0 and cfg.window is None
    pre = preprocess(_identity_grid_volume(arr), cfg)
    assert pre.foreground.sum() == 6**3
    assert pre.image.max() == 1.0 and np.isclose(np.median(pre.image[pre.foreground]), 0.5)
    assert np.all(pre.image[~pre.foreground] == 0.0)  # air and padding below the window
    assert intensity_to_native(0.5, pre) == pytest.approx(50.0)


def test_ct_default_window_is_brain():
    cfg = Preprocessing(modality="ct")
    assert cfg.window == "brain" and cfg.ct_window == (40.0, 80.0)


# ----------------------------------------------------------------------------------------
# errors and config
# ----------------------------------------------------------------------------------------


def test_empty_foreground_raises():
    with pytest.raises(VolumeContentError, match="foreground threshold"):
        preprocess(_identity_grid_volume(np.zeros((8, 8, 8))), Preprocessing(shape=(8, 8, 8)))


def test_constant_foreground_raises():
    arr = np.zeros((8, 8, 8)); arr[2:6, 2:6, 2:6] = 7.0
    with pytest.raises(VolumeContentError, match="constant"):
        preprocess(_identity_grid_volume(arr), Preprocessing(shape=(8, 8, 8)))


def test_mask_on_another_grid_raises():
    vol = smooth_volume()
    mask = Volume(np.ones((10, 10, 10), np.uint8), np.eye(4), {"source": "m.nii.gz"})
    with pytest.raises(VolumeContentError, match="m.nii.gz"):
        preprocess(vol, Preprocessing(), mask=mask)


def test_interpolation_argument_checked():
    vol = smooth_volume()
    pre = preprocess(vol, Preprocessing(shape=(16, 16, 16)))
    with pytest.raises(ConfigError, match="interpolation"):
        to_native(pre.image, pre, vol, interpolation="cubic")
    with pytest.raises(ValueError, match="model grid"):
        to_native(pre.image[:-1], pre, vol)


def test_preprocessing_dict_round_trip_is_json():
    for cfg in (Preprocessing(), Preprocessing(modality="ct", window="lung", spacing=1.5),
                Preprocessing(modality="ct", window_center=30, window_width=90, clip=False)):
        raw = json.loads(json.dumps(cfg.to_dict()))
        assert Preprocessing.from_dict(raw) == cfg
    assert Preprocessing(spacing=1.5).spacing == (1.5, 1.5, 1.5)
    assert Preprocessing().lower_percentile == 1.0 and Preprocessing().upper_percentile == 99.0


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"windw": "brain"}, "windw"),
        ({"modality": "ct", "window": "brian"}, "window"),
        ({"modality": "ct", "window": ["brain"]}, "window"),
        ({"modality": "pet"}, "modality"),
        ({"window": "brain"}, "window"),  # MRI
        ({"modality": "ct", "lower_percentile": 2}, "lower_percentile"),
        ({"lower_percentile": 99, "upper_percentile": 1}, "lower_percentile"),
        ({"upper_percentile": 101}, "upper_percentile"),
        ({"modality": "ct", "window": "brain", "window_width": 80}, "window"),
        ({"modality": "ct", "window_center": 40}, "window_width"),
        ({"modality": "ct", "window_center": 40, "window_width": -5}, "window_width"),
        ({"spacing": [2, 2]}, "spacing"),
        ({"spacing": [2, 0, 2]}, "spacing"),
        ({"shape": [32, 32.5, 32]}, "shape"),
        ({"shape": "96"}, "shape"),
        ({"orientation": "LPS"}, "orientation"),
        ({"clip": "yes"}, "clip"),
        ({"foreground_threshold": "0"}, "foreground_threshold"),
    ],
)
def test_config_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=rf"data\.preprocessing\.{key}\b"):
        Preprocessing.from_dict(raw, prefix="data.preprocessing")


def test_grid_affine_centres_grid():
    cfg = Preprocessing(spacing=(2, 2, 3), shape=(10, 20, 5))
    aff = cfg.grid_affine(center=(1.0, -2.0, 3.0))
    centre_voxel = (np.asarray(cfg.shape) - 1) / 2
    np.testing.assert_allclose(aff[:3, :3] @ centre_voxel + aff[:3, 3], [1.0, -2.0, 3.0])
    np.testing.assert_allclose(np.diag(aff)[:3], [2, 2, 3])


def test_preprocessing_speed_is_reasonable():
    """A 2 mm ~80x96x80 brain-like volume preprocesses well under a second (loose bound)."""
    import time

    w = world_coords((80, 96, 80), np.diag([2.0, 2.0, 2.0, 1.0]))
    r2 = ((w - np.array([80.0, 95.0, 80.0])) ** 2 / np.array([60.0, 75.0, 55.0]) ** 2).sum(-1)
    arr = np.where(r2 < 1, 100 + 50 * np.sin(w[..., 0] / 7), 0).astype(np.float32)
    aff = np.diag([-2.0, 2.0, 2.0, 1.0])  # non-RAS on disk
    cfg = Preprocessing(shape=(96, 96, 80))
    preprocess(Volume(arr, aff), cfg)  # warm-up (imports)
    t0 = time.perf_counter()
    preprocess(Volume(arr, aff), cfg)
    assert time.perf_counter() - t0 < 2.0
