"""Property tests (hypothesis, issue 7): I/O round trips and the preprocessing inverse over
random shapes, dtypes, spacings and affines, including oblique and flipped ones.

Geometry is checked against independent encodings: NRRD/MetaImage files are written with
SimpleITK from the LPS form of the affine (``A_lps = diag(-1, -1, 1) A_ras``, spacing =
column norms, direction = normalised columns), not with medidiff's writer; the model grid
is checked by sampling an analytic function of world position.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from medidiff.io import Volume, load_volume, save_volume
from medidiff.data.transforms import Preprocessing, intensity_to_native, preprocess, to_model, to_native

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
DTYPES = ["uint8", "int16", "uint16", "int32", "float32", "float64"]


# ---- strategies ------------------------------------------------------------------------------


def rotation_from(q: tuple[float, float, float, float]) -> np.ndarray:
    """The rotation matrix of a (not necessarily unit) quaternion (w, x, y, z)."""
    w, x, y, z = np.asarray(q) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


@st.composite
def directions(draw, *, max_tilt_deg: float | None = None) -> np.ndarray:
    """A 3x3 orthonormal matrix: an axis permutation with flips (LPS, PIR, ...), optionally
    tilted by a rotation (oblique); improper (det -1) ones included."""
    perm = draw(st.permutations([0, 1, 2]))
    flips = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
    base = np.zeros((3, 3))
    for col, (row, sign) in enumerate(zip(perm, flips)):
        base[row, col] = sign
    if max_tilt_deg is None or draw(st.booleans()):
        if max_tilt_deg is None:
            q = draw(st.tuples(*[st.floats(-1, 1) for _ in range(4)]))
            assume(np.linalg.norm(q) > 0.1)
            return rotation_from(q) @ base
        axis = np.asarray(draw(st.tuples(*[st.floats(-1, 1) for _ in range(3)])))
        assume(np.linalg.norm(axis) > 0.1)
        angle = math.radians(draw(st.floats(-max_tilt_deg, max_tilt_deg)))
        axis = axis / np.linalg.norm(axis)
        q = (math.cos(angle / 2), *(math.sin(angle / 2) * axis))
        return rotation_from(q) @ base
    return base


@st.composite
def affines(draw, *, min_spacing=0.2, max_spacing=8.0, max_tilt_deg=None) -> np.ndarray:
    direction = draw(directions(max_tilt_deg=max_tilt_deg))
    spacing = draw(st.tuples(*[st.floats(min_spacing, max_spacing) for _ in range(3)]))
    origin = draw(st.tuples(*[st.floats(-300, 300) for _ in range(3)]))
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def random_array(rng: np.random.Generator, shape, dtype: str) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return (rng.standard_normal(shape) * 1000).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dt)


def assert_affine_close(actual: np.ndarray, expected: np.ndarray) -> None:
    # NIfTI keeps the sform in float32: about 1e-7 relative
    tol = 1e-5 * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol)


# ---- I/O round trips ------------------------------------------------------------------------


@SETTINGS
@given(
    shape=st.tuples(*[st.integers(1, 9) for _ in range(3)]),
    dtype=st.sampled_from(DTYPES),
    affine=affines(),
    seed=st.integers(0, 2**31 - 1),
    suffix=st.sampled_from([".nii", ".nii.gz"]),
)
def test_nifti_round_trip(tmp_path_factory, shape, dtype, affine, seed, suffix):
    data = random_array(np.random.default_rng(seed), shape, dtype)
    path = tmp_path_factory.mktemp("rt") / f"v{suffix}"
    save_volume(Volume(data, affine, {"dtype": dtype}), path)
    vol = load_volume(path)
    assert vol.shape == shape and vol.array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(vol.array, data)
    assert_affine_close(vol.affine, affine)
    np.testing.assert_allclose(vol.spacing, np.linalg.norm(affine[:3, :3], axis=0), rtol=1e-5)
    # and again: a second round trip changes nothing at all
    save_volume(vol, path)
    again = load_volume(path)
    np.testing.assert_array_equal(again.array, vol.array)
    np.testing.assert_array_equal(again.affine, vol.affine)
    assert again.meta["qform_code"] == vol.meta["qform_code"]
    assert again.meta["sform_code"] == vol.meta["sform_code"]


@SETTINGS
@given(
    shape=st.tuples(*[st.integers(2, 8) for _ in range(3)]),
    dtype=st.sampled_from(DTYPES),
    affine=affines(),
    seed=st.integers(0, 2**31 - 1),
    suffix=st.sampled_from([".nrrd", ".mha"]),
)
def test_itk_files_read_with_the_geometry_itk_wrote(tmp_path_factory, shape, dtype, affine,
                                                     seed, suffix):
    import SimpleITK as sitk

    data = random_array(np.random.default_rng(seed), shape, dtype)
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))  # (z, y, x)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps / spacing).ravel()])  # row-major 3x3
    image.SetOrigin([float(v) for v in np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]])
    path = tmp_path_factory.mktemp("itk") / f"v{suffix}"
    sitk.WriteImage(image, str(path))

    vol = load_volume(path)
    np.testing.assert_array_equal(vol.array, data)
    assert vol.array.dtype == np.dtype(dtype)
    np.testing.assert_allclose(vol.affine, affine, rtol=0, atol=1e-4 * max(1, np.abs(affine).max()))
    # ITK's own index -> physical point, in RAS, for a corner voxel
    corner = [s - 1 for s in shape]
    lps_point = np.asarray(image.TransformIndexToPhysicalPoint(corner))
    np.testing.assert_allclose(vol.affine @ [*corner, 1.0], [*(lps_point * [-1, -1, 1]), 1.0],
                               atol=1e-3)
    # and NIfTI keeps it when written back
    out = path.with_suffix(".nii.gz")
    save_volume(vol, out)
    assert_affine_close(load_volume(out).affine, vol.affine)


# ---- preprocessing and its inverse ------------------------------------------------------------


def world(shape, affine) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def smooth(points: np.ndarray, centre: np.ndarray, sigma: float) -> np.ndarray:
    """An analytic, positive, smooth function of world position (mm)."""
    return 20.0 + 200.0 * np.exp(-((points - centre) ** 2).sum(-1) / (2 * sigma**2))


@st.composite
def native_scans(draw, *, max_tilt_deg=25.0):
    shape = draw(st.tuples(*[st.integers(8, 16) for _ in range(3)]))
    affine = draw(affines(min_spacing=1.0, max_spacing=2.5, max_tilt_deg=max_tilt_deg))
    points = world(shape, affine)
    centre = points.reshape(-1, 3).mean(0)
    extent = np.ptp(points.reshape(-1, 3), axis=0)
    sigma = float(extent.mean()) / 2
    arr = smooth(points, centre, sigma).astype(np.float32)
    return Volume(arr, affine, {"source": "hypothesis"}), centre, sigma


def interpolation_bound(spacings: list[float], sigma: float) -> float:
    """Worst-case error of trilinear interpolation of :func:`smooth` on grids of these
    spacings: sum over axes of h^2 / 8 * max|f''| per resampling, max|f''| = A / sigma^2."""
    return sum(3 * h**2 / 8 * 200.0 / sigma**2 for h in spacings)


@settings(SETTINGS, max_examples=20)
@given(scan=native_scans(), model_spacing=st.floats(1.5, 3.0))
def test_preprocess_then_inverse_returns_the_input_grid(scan, model_spacing):
    vol, centre, sigma = scan
    h_native = max(vol.spacing)
    diagonal = float(np.linalg.norm(np.asarray(vol.shape) * vol.spacing))
    side = int(math.ceil(diagonal / model_spacing)) + 4  # covers the whole scan in any tilt
    prep = Preprocessing(spacing=(model_spacing,) * 3, shape=(side, side, side), clip=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pre = preprocess(vol, prep)

    # the model grid: the configured shape and spacing, values = the function at its points
    assert pre.image.shape == (side, side, side)
    np.testing.assert_allclose(np.linalg.norm(pre.affine[:3, :3], axis=0), model_spacing,
                               rtol=1e-5)
    model_points = world(pre.image.shape, pre.affine)
    inside = _interior(model_points, vol.affine, vol.shape, margin=1.5)
    assume(inside.sum() > 50)
    expected = smooth(model_points[inside], centre, sigma)
    got = intensity_to_native(pre.image[inside], pre)
    # one linear interpolation on the native grid
    assert np.abs(got - expected).max() < 1.2 * interpolation_bound([h_native], sigma) + 0.01

    # the inverse: exactly the input grid, and the input's values back
    back = to_native(pre.image, pre)
    assert back.shape == vol.shape and back.dtype == np.float32
    np.testing.assert_array_equal(pre.native_affine, vol.affine)
    assert pre.native_shape == vol.shape
    native_inside = _interior(world(vol.shape, vol.affine), vol.affine, vol.shape, margin=2)
    values = intensity_to_native(back, pre)[native_inside]
    # there and back: one interpolation on each grid
    bound = interpolation_bound([h_native, model_spacing], sigma)
    assert np.abs(values - vol.array[native_inside]).max() < 1.2 * bound + 0.01


def _interior(points: np.ndarray, affine: np.ndarray, shape, margin: float) -> np.ndarray:
    """Points whose voxel coordinates in (affine, shape) lie ``margin`` voxels inside."""
    voxels = (points - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    return np.all((voxels >= margin) & (voxels <= np.asarray(shape) - 1 - margin), axis=-1)


@SETTINGS
@given(
    shape=st.tuples(*[st.integers(6, 14) for _ in range(3)]),
    direction=directions(max_tilt_deg=0.0),  # axis permutations and flips only
    spacing=st.tuples(*[st.sampled_from([1.0, 1.5, 2.0]) for _ in range(3)]),
    origin=st.tuples(*[st.integers(-50, 50) for _ in range(3)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_axis_aligned_same_spacing_round_trip_is_exact(shape, direction, spacing, origin, seed):
    """On the native spacing and an axis-aligned grid (any of the 48 orientations), the model
    grid is a permutation, flip and shift of the native voxels: no interpolation, so the
    round trip returns the input exactly, and labels travel losslessly both ways."""
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing)
    affine[:3, 3] = origin
    rng = np.random.default_rng(seed)
    arr = (1.0 + rng.random(shape)).astype(np.float32)  # all foreground
    vol = Volume(arr, affine)
    ras_spacing = tuple(float(s) for s in np.abs(affine[:3, :3]).max(axis=1))  # per RAS axis
    side = max(shape) + 2
    prep = Preprocessing(spacing=ras_spacing, shape=(side, side, side), clip=False)
    pre = preprocess(vol, prep)
    back = intensity_to_native(to_native(pre.image, pre), pre)
    np.testing.assert_allclose(back, arr, rtol=1e-5, atol=1e-5)
    labels = rng.integers(0, 5, size=shape).astype(np.uint8)
    on_model = to_model(labels, pre)
    assert on_model.dtype == np.uint8 and on_model.sum() == labels.sum()
    np.testing.assert_array_equal(to_native(on_model, pre, interpolation="nearest"), labels)


def test_directions_strategy_covers_flips_and_obliques():
    """Guard: the strategies above really produce improper and oblique matrices."""
    found = {"improper": False, "oblique": False}

    @settings(max_examples=200, deadline=None)
    @given(d=directions(max_tilt_deg=25.0))
    def probe(d):
        np.testing.assert_allclose(d @ d.T, np.eye(3), atol=1e-9)
        found["improper"] |= np.linalg.det(d) < 0
        found["oblique"] |= np.abs(d).max(axis=0).min() < 0.999

    probe()
    assert all(found.values()), found


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
