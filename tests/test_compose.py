"""medidiff.data.compose: the preprocessing as an invertible MONAI Compose of dict transforms.

References: :func:`medidiff.data.transforms.preprocess` (forward, same arrays and affine)
and :func:`~medidiff.data.transforms.to_native` (inverse, same native-grid map), both
tested against closed forms and MONAI's array transforms in test_transforms.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from medidiff.data.compose import preprocessing_transforms
from medidiff.data.preprocessing import Preprocessing
from medidiff.data.transforms import intensity_to_native, preprocess, to_native
from medidiff.errors import VolumeContentError
from medidiff.io import Volume, load_volume

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"

pytestmark = pytest.mark.filterwarnings("ignore:.*exceeds the model grid")


def oblique_lps_volume() -> Volume:
    """An LPS scan, anisotropic (1.5, 1, 3 mm), tilted 12 degrees about z, with background."""
    th = np.deg2rad(12.0)
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-1.5, -1.0, 3.0])
    affine[:3, 3] = (30.0, 35.0, -36.0)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in (40, 70, 24)], indexing="ij"), -1)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    arr = 10.0 + 100.0 * np.exp(-np.sum((world - (3.0, -2.0, 5.0)) ** 2, -1) / (2 * 20.0**2))
    arr[:5] = 0.0  # background, so the window is not the whole grid
    return Volume(arr.astype(np.float32), affine, {"source": "oblique"})


def model_grid_input(item: dict, values: np.ndarray) -> MetaTensor:
    """A model output on the grid of ``item["image"]``, carrying its transform trace."""
    image = item["image"]
    return MetaTensor(
        torch.from_numpy(values)[None],
        affine=image.affine.clone(),
        applied_operations=copy.deepcopy(image.applied_operations),
    )


def inside_fov(vol: Volume, model_affine: np.ndarray, model_shape, margin: float = 1.0) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), -1)
    world = idx @ vol.affine[:3, :3].T + vol.affine[:3, 3]
    v = (world - model_affine[:3, 3]) @ np.linalg.inv(model_affine[:3, :3]).T
    return np.all((v >= margin) & (v <= np.asarray(model_shape) - 1 - margin), axis=-1)


@pytest.mark.parametrize("modality", ["mri", "ct"])
def test_compose_gives_the_model_grid_of_preprocess_on_sample_data(modality):
    folder = SAMPLE / ("test" if modality == "mri" else "ct")
    image = sorted((folder / "images").glob("*.nii.gz"))[0]
    mask = folder / "brainmasks" / image.name
    pre = Preprocessing(modality=modality)
    ref = preprocess(load_volume(image), pre, mask=load_volume(mask))
    item = preprocessing_transforms(pre, mask_keys=("mask",))({"image": image, "mask": mask})
    assert tuple(item["image"].shape) == (1, *pre.shape)
    np.testing.assert_allclose(item["image"][0].numpy(), ref.image, atol=1e-5)
    np.testing.assert_allclose(item["image"].affine.numpy(), ref.affine, atol=1e-6)
    np.testing.assert_array_equal(item["mask"][0].numpy(), ref.mask.astype(np.float32))
    np.testing.assert_array_equal(item["foreground"][0].numpy(), ref.foreground)


def test_compose_matches_preprocess_on_an_oblique_anisotropic_lps_scan():
    vol = oblique_lps_volume()
    pre = Preprocessing(shape=(30, 40, 28), clip=False)
    ref = preprocess(vol, pre)
    item = preprocessing_transforms(pre)({"image": vol})
    np.testing.assert_allclose(item["image"][0].numpy(), ref.image, atol=1e-5)
    np.testing.assert_allclose(item["image"].affine.numpy(), ref.affine, atol=1e-6)


def test_inverse_takes_a_map_back_to_the_input_grid_like_to_native():
    vol = oblique_lps_volume()
    pre = Preprocessing(shape=(30, 40, 28), clip=False)
    ref = preprocess(vol, pre)
    chain = preprocessing_transforms(pre, invert_intensity=False)
    item = chain({"image": vol})
    model_map = np.random.default_rng(0).random(pre.shape).astype(np.float32)
    back = chain.inverse({"image": model_grid_input(item, model_map)})["image"]
    assert tuple(back.shape) == (1, *vol.shape)
    np.testing.assert_allclose(back.affine.numpy(), vol.affine, atol=1e-6)
    ours = to_native(model_map, ref, vol)
    inside = inside_fov(vol, ref.affine, pre.shape)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(back[0].numpy()[inside], ours[inside], atol=1e-4)


def test_invertd_restores_native_intensities_of_a_reconstruction():
    """MONAI's Invertd with the Compose: geometry and intensity scale both undone."""
    vol = oblique_lps_volume()
    pre = Preprocessing(shape=(30, 40, 28), clip=False)
    ref = preprocess(vol, pre)
    chain = preprocessing_transforms(pre)
    item = chain({"image": vol})
    item["pred"] = MetaTensor(item["image"].as_tensor().clone(), affine=item["image"].affine.clone())
    back = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=False)(item)["pred"]
    expected = intensity_to_native(to_native(ref.image, ref, vol), ref)
    inside = inside_fov(vol, ref.affine, pre.shape)
    assert np.ptp(expected[inside]) > 50  # native units (10..110), not the model's [0, 1]
    np.testing.assert_allclose(back[0].numpy()[inside], expected[inside], atol=1e-3)


def test_constant_volume_is_refused_like_preprocess():
    """MONAI's Compose wraps a transform's error in a RuntimeError; the cause is ours."""
    vol = Volume(np.zeros((12, 12, 12), np.float32), np.eye(4), {"source": "empty.nii.gz"})
    with pytest.raises(RuntimeError) as info:
        preprocessing_transforms(Preprocessing(shape=(8, 8, 8)))({"image": vol})
    cause = info.value.__cause__
    assert isinstance(cause, VolumeContentError)
    assert str(cause).startswith("empty.nii.gz: no voxel above the foreground threshold")
