"""medidiff.io: geometry survives every reader and the writer; bad files get one clear error.

References used (independent of medidiff's own conversion code): nibabel's header/affine
and orientation tools, SimpleITK's ``TransformIndexToPhysicalPoint`` / ``GetPixel`` and
its own NIfTI reader, and pydicom's reading of the DICOM tags SimpleITK wrote.

Tolerances: NIfTI stores the sform in float32, so an affine read back equals the
float32-rounded affine exactly; where the qform (quaternion) or another tool's reader is
involved, entries agree to 1e-4 mm (float32 rounding of values up to ~100 mm is ~1e-5).
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy.spatial.transform import Rotation

from medidiff.errors import ConfigError, MedidiffError, OutputError, VolumeContentError, VolumeError
from medidiff.io import (
    Volume,
    atomic_path,
    check_same_grid,
    is_volume_path,
    load_volume,
    save_volume,
    sitk_geometry_to_ras,
    strip_volume_suffix,
    write_json_atomic,
    write_text_atomic,
)
from medidiff.io.reading import quiet_readers
from medidiff.io.volume import _load_with_sitk

ATOL = 1e-4  # mm; see the module docstring
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ROT = Rotation.from_euler("xyz", [10.0, -7.0, 20.0], degrees=True).as_matrix()


def make_affine(
    codes: str = "RAS", spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), rotation=None
) -> np.ndarray:
    """Voxel->RAS affine whose axes point along ``codes`` (optionally rotated: oblique)."""
    ornt = axcodes2ornt(codes)  # per voxel axis: (world axis, +1/-1)
    m = np.zeros((3, 3))
    for i, (axis, sign) in enumerate(ornt):
        m[int(axis), i] = sign * spacing[i]
    if rotation is not None:
        m = rotation @ m
    aff = np.eye(4)
    aff[:3, :3] = m
    aff[:3, 3] = origin
    return aff


def f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def ramp(shape, dtype=np.float32) -> np.ndarray:
    return (np.arange(int(np.prod(shape))) % 251).reshape(shape).astype(dtype)


def expect_error(cls, path, reason, fn, *args, **kwargs):
    """Call ``fn`` and check the error class, its reason code and that it names the file."""
    with pytest.raises(cls) as info:
        fn(*args, **kwargs)
    assert Path(path).name in str(info.value)
    assert getattr(info.value, "reason", None) == reason, str(info.value)
    assert "\n" not in str(info.value)
    return info.value


# --------------------------------------------------------------------------- NIfTI round trips

GEOMETRIES = {
    "RAS-iso": make_affine("RAS", (1.0, 1.0, 1.0), (-10.0, 20.0, 5.0)),
    "LPS-aniso": make_affine("LPS", (0.8, 1.0, 3.0), (90.0, 110.0, -70.0)),
    "PIR-aniso": make_affine("PIR", (0.8, 1.0, 3.0), (3.0, -4.0, 12.5)),
    "oblique": make_affine("LAS", (0.8, 1.0, 3.0), (-91.3, 12.7, 40.1), rotation=ROT),
}


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_nifti_round_trip_is_exact(tmp_path, name, dtype):
    affine = GEOMETRIES[name]
    vol = Volume(ramp((5, 6, 7), dtype), affine)
    out = save_volume(vol, tmp_path / "a.nii.gz")
    back = load_volume(out)
    assert back.array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_array_equal(back.affine, f32(affine))  # sform = float32 affine, exactly
    np.testing.assert_allclose(back.spacing, vol.spacing, rtol=1e-6)
    # nibabel on its own agrees, and both codes say "use me"
    img = nib.load(str(out))
    np.testing.assert_allclose(img.affine, affine, atol=ATOL)
    np.testing.assert_allclose(img.get_qform(), affine, atol=ATOL)  # qform too (no shear here)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert back.meta["format"] == "nifti" and back.meta["source"] == str(out)


@pytest.mark.parametrize("codes", ["RAS", "LPS", "PIR", "ASL"])
def test_orientation_codes_follow_the_affine(tmp_nifti, codes):
    path = tmp_nifti(affine=make_affine(codes, (0.8, 1.0, 3.0)))
    vol = load_volume(path)
    assert vol.orientation == codes == vol.meta["orientation"]
    assert vol.spacing == pytest.approx((0.8, 1.0, 3.0), abs=1e-6)


def test_codes_are_kept(tmp_path, tmp_nifti):
    src = tmp_nifti(affine=GEOMETRIES["LPS-aniso"], qform_code=2, sform_code=4)
    vol = load_volume(src)
    assert (vol.meta["qform_code"], vol.meta["sform_code"]) == (2, 4)
    hdr = nib.load(str(save_volume(vol, tmp_path / "b.nii"))).header
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (2, 4)


def test_qform_only_source_keeps_codes_and_affine(tmp_path, tmp_nifti):
    affine = GEOMETRIES["oblique"]
    vol = load_volume(tmp_nifti(affine=affine, qform_code=1, sform_code=0))
    assert vol.meta["sform_code"] == 0
    back_path = save_volume(vol, tmp_path / "q.nii.gz")
    hdr = nib.load(str(back_path)).header
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (1, 0)
    np.testing.assert_allclose(load_volume(back_path).affine, affine, atol=ATOL)


def test_affine_a_qform_cannot_hold_gets_an_sform(tmp_path):
    sheared = make_affine("RAS", (1.0, 1.0, 2.0))
    sheared[0, 1] = 0.3  # shear: no quaternion represents it
    vol = Volume(ramp((4, 4, 4)), sheared, {"qform_code": 1, "sform_code": 0})
    back = load_volume(save_volume(vol, tmp_path / "s.nii.gz"))
    assert back.meta["sform_code"] == 1
    np.testing.assert_array_equal(back.affine, f32(sheared))


def test_no_codes_source_round_trips_with_a_warning(tmp_path, tmp_nifti):
    vol = load_volume(tmp_nifti(affine=np.diag([2.0, 2.0, 2.0, 1.0]), qform_code=0, sform_code=0))
    assert any("both 0" in w for w in vol.meta["warnings"])
    back = load_volume(save_volume(vol, tmp_path / "c.nii.gz"))
    np.testing.assert_allclose(back.affine, vol.affine, atol=ATOL)


def test_nifti2_round_trip(tmp_path, tmp_nifti):
    affine = GEOMETRIES["PIR-aniso"]
    src = tmp_nifti(ramp((4, 5, 6), np.int16), affine, name="n2.nii", nifti2=True)
    vol = load_volume(src)
    assert vol.meta["nifti_version"] == 2
    out = save_volume(vol, tmp_path / "n2_out.nii")
    assert isinstance(nib.load(str(out)), nib.Nifti2Image)
    back = load_volume(out)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_array_equal(back.affine, affine)  # NIfTI-2 stores the sform in float64


def test_big_endian_file_gives_native_array(tmp_path):
    data = ramp((3, 4, 5), np.int16)
    img = nib.Nifti1Image(data, np.eye(4), header=nib.Nifti1Header(endianness=">"), dtype=np.int16)
    nib.save(img, str(tmp_path / "be.nii"))
    assert nib.load(str(tmp_path / "be.nii")).get_data_dtype().byteorder == ">"
    vol = load_volume(tmp_path / "be.nii")
    assert vol.array.dtype.isnative and vol.array.dtype == np.int16
    assert vol.meta["dtype"] == "int16"
    np.testing.assert_array_equal(vol.array, data.astype(np.int16))


def test_scaled_nifti_is_returned_scaled(tmp_path):
    img = nib.Nifti1Image(ramp((3, 4, 5), np.int16), np.eye(4), dtype=np.int16)
    img.header.set_slope_inter(0.5, -10.0)
    nib.save(img, str(tmp_path / "sc.nii"))
    vol = load_volume(tmp_path / "sc.nii")
    np.testing.assert_allclose(vol.array, ramp((3, 4, 5)) * 0.5 - 10.0)
    assert vol.meta["dtype"] == "int16"


def test_mgh_reads_with_its_ras_affine(tmp_path):
    affine = make_affine("LIA", (1.0, 1.0, 1.0), (128.0, -128.0, 128.0))  # FreeSurfer conformed
    img = nib.MGHImage(ramp((6, 5, 4)), affine)
    nib.save(img, str(tmp_path / "t1.mgz"))
    vol = load_volume(tmp_path / "t1.mgz")
    assert vol.meta["format"] == "mgh" and vol.orientation == "LIA"
    np.testing.assert_allclose(vol.affine, nib.load(str(tmp_path / "t1.mgz")).affine)
    np.testing.assert_array_equal(vol.array, ramp((6, 5, 4)))


# --------------------------------------------------------------------------- world space


@pytest.mark.parametrize("codes", ["PIR", "LPS", "SAL"])
def test_reoriented_storage_is_the_same_scan_in_world_space(tmp_path, codes):
    """A RAS volume stored with permuted/flipped axes reads back as the same scan."""
    data = ramp((5, 6, 7))
    affine = make_affine("RAS", (0.8, 1.0, 3.0), (-2.0, 3.0, 4.0))
    transform = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(codes))
    stored = apply_orientation(data, transform)
    stored_affine = affine @ inv_ornt_aff(transform, data.shape)
    nib.save(nib.Nifti1Image(stored, stored_affine), str(tmp_path / "r.nii.gz"))

    vol = load_volume(tmp_path / "r.nii.gz")
    assert vol.orientation == codes
    # (1) every voxel: same value at the same world coordinate
    ijk = np.indices(vol.shape).reshape(3, -1)
    world = vol.affine[:3, :3] @ ijk + vol.affine[:3, 3:4]
    src = np.linalg.inv(affine)[:3, :3] @ world + np.linalg.inv(affine)[:3, 3:4]
    src_idx = np.rint(src).astype(int)
    np.testing.assert_allclose(src, src_idx, atol=1e-4)
    np.testing.assert_array_equal(vol.array.reshape(-1), data[tuple(src_idx)])
    # (2) nibabel's own canonical reorientation recovers the RAS original
    canon = nib.as_closest_canonical(nib.Nifti1Image(vol.array, vol.affine))
    np.testing.assert_array_equal(np.asanyarray(canon.dataobj), data)
    np.testing.assert_allclose(canon.affine, affine, atol=ATOL)


# --------------------------------------------------------------------------- SimpleITK formats


def sitk_image(shape_xyz, spacing, origin, direction, dtype=np.int16):
    arr = ramp(shape_xyz, dtype)
    img = sitk.GetImageFromArray(arr.transpose(2, 1, 0))  # SimpleITK wants (z, y, x)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection([float(d) for d in np.asarray(direction).ravel()])
    return img


def ras_of_index(img, index) -> np.ndarray:
    """ITK's own index->physical mapping (LPS), flipped to RAS."""
    x, y, z = img.TransformIndexToPhysicalPoint([int(i) for i in index])
    return np.array([-x, -y, z])


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr", ".mha", ".mhd"])
@pytest.mark.parametrize("direction", ["identity", "oblique", "flipped"])
def test_sitk_formats_give_the_ras_geometry_itk_means(tmp_path, suffix, direction):
    d = {"identity": np.eye(3), "oblique": ROT, "flipped": np.diag([1.0, -1.0, -1.0])}[direction]
    img = sitk_image((5, 6, 4), (0.8, 1.0, 3.0), (12.0, -7.5, 30.0), d)
    path = tmp_path / f"img{suffix}"
    sitk.WriteImage(img, str(path))
    vol = load_volume(path)
    assert vol.shape == (5, 6, 4) and vol.array.dtype == np.int16
    assert vol.meta["format"] == ("nrrd" if "nrrd" in suffix or suffix == ".nhdr" else "mha")
    for index in [(0, 0, 0), (4, 0, 0), (0, 5, 0), (0, 0, 3), (4, 5, 3), (2, 3, 1)]:
        np.testing.assert_allclose(
            vol.affine @ [*index, 1.0], [*ras_of_index(img, index), 1.0], atol=ATOL
        )
        assert vol.array[index] == img.GetPixel(*index)
    assert vol.spacing == pytest.approx((0.8, 1.0, 3.0))
    if direction == "identity":
        assert vol.orientation == "LPS"  # ITK's +x/+y point to Left/Posterior


def test_sitk_geometry_to_ras_closed_form():
    d = ROT
    s = (0.8, 1.0, 3.0)
    o = (1.0, 2.0, 3.0)
    expected = np.eye(4)
    expected[:3, :3] = d @ np.diag(s)
    expected[:3, 3] = o
    np.testing.assert_allclose(sitk_geometry_to_ras(d.ravel(), s, o), LPS_TO_RAS @ expected)
    # 2D: embedded with a unit third axis
    aff2 = sitk_geometry_to_ras([0.0, 1.0, 1.0, 0.0], (2.0, 3.0), (5.0, 6.0))
    np.testing.assert_allclose(aff2, [[0, -3, 0, -5], [-2, 0, 0, -6], [0, 0, 1, 0], [0, 0, 0, 1]])


def test_nrrd_to_nifti_keeps_itk_geometry(tmp_path):
    """NRRD -> medidiff -> NIfTI, read back by SimpleITK: the same ITK image geometry."""
    img = sitk_image((5, 6, 4), (0.8, 1.0, 3.0), (12.0, -7.5, 30.0), ROT, np.float32)
    sitk.WriteImage(img, str(tmp_path / "in.nrrd"))
    out = save_volume(load_volume(tmp_path / "in.nrrd"), tmp_path / "out.nii.gz")
    back = sitk.ReadImage(str(out))
    np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin(), atol=ATOL)
    np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing(), atol=ATOL)
    np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=ATOL)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))
    hdr = nib.load(str(out)).header
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_nibabel_and_sitk_agree_on_nifti(tmp_path, name):
    path = save_volume(Volume(ramp((5, 6, 7), np.int16), GEOMETRIES[name]), tmp_path / "x.nii.gz")
    a, b = load_volume(path), _load_with_sitk(path)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=ATOL)
    assert a.orientation == b.orientation


def test_nibabel_and_sitk_agree_on_bundled_files():
    data = Path(nib.__file__).parent / "tests" / "data"
    for name, index in [
        ("anatomical.nii", None),
        ("reoriented_anat_moved.nii", None),
        ("example4d.nii.gz", 1),
    ]:
        a = load_volume(data / name, volume_index=index)
        b = _load_with_sitk(data / name, volume_index=index)
        np.testing.assert_array_equal(a.array, b.array, err_msg=name)
        np.testing.assert_allclose(a.affine, b.affine, atol=ATOL, err_msg=name)


# --------------------------------------------------------------------------- 2D and 4D


def test_2d_nifti_becomes_depth_one(tmp_path):
    affine = make_affine("LPS", (0.5, 0.7, 2.0), (1.0, 2.0, 3.0))
    nib.save(nib.Nifti1Image(ramp((6, 5)), affine), str(tmp_path / "slice.nii"))
    vol = load_volume(tmp_path / "slice.nii")
    assert vol.shape == (6, 5, 1)
    np.testing.assert_array_equal(vol.array[..., 0], ramp((6, 5)))
    np.testing.assert_array_equal(vol.affine, f32(affine))


def test_2d_mha_becomes_depth_one(tmp_path):
    img = sitk.GetImageFromArray(ramp((6, 5), np.uint8).T)  # 2D image, size (x=6, y=5)
    img.SetSpacing((0.5, 0.7))
    img.SetOrigin((1.0, 2.0))
    sitk.WriteImage(img, str(tmp_path / "slice.mha"))
    vol = load_volume(tmp_path / "slice.mha")
    assert vol.shape == (6, 5, 1)
    assert vol.array[4, 3, 0] == img.GetPixel(4, 3)
    np.testing.assert_allclose(
        vol.affine, np.diag([-0.5, -0.7, 1.0, 1.0]) + np.c_[np.zeros((4, 3)), [-1, -2, 0, 0]]
    )


def test_trailing_singleton_axes_are_3d(tmp_nifti):
    vol = load_volume(tmp_nifti(ramp((4, 5, 6, 1, 1))))
    assert vol.shape == (4, 5, 6)


def test_4d_needs_a_volume_index(tmp_nifti):
    data = ramp((4, 5, 6, 3))
    path = tmp_nifti(data, name="bold.nii.gz")
    err = expect_error(VolumeContentError, path, "4d", load_volume, path)
    assert "volume_index" in str(err) and "3 volumes" in str(err)
    np.testing.assert_array_equal(load_volume(path, volume_index=1).array, data[..., 1])
    vol = load_volume(path, volume_index=-1)
    np.testing.assert_array_equal(vol.array, data[..., 2])
    assert vol.meta["volume_index"] == 2 and vol.meta["disk_shape"] == (4, 5, 6, 3)
    expect_error(VolumeContentError, path, "4d", load_volume, path, volume_index=3)
    assert load_volume(path, allow_4d=True).shape == (4, 5, 6, 3)


def test_volume_index_on_3d(tmp_nifti):
    path = tmp_nifti()
    assert load_volume(path, volume_index=0).shape == (4, 5, 6)
    expect_error(VolumeContentError, path, "4d", load_volume, path, volume_index=2)


def test_4d_nrrd_volume_index(tmp_path):
    arr = ramp((2, 4, 5, 3), np.int16)  # (t, z, y, x) as SimpleITK wants
    img = sitk.JoinSeries([sitk.GetImageFromArray(arr[t]) for t in range(2)])
    sitk.WriteImage(img, str(tmp_path / "ts.nrrd"))
    expect_error(VolumeContentError, tmp_path / "ts.nrrd", "4d", load_volume, tmp_path / "ts.nrrd")
    vol = load_volume(tmp_path / "ts.nrrd", volume_index=1)
    np.testing.assert_array_equal(vol.array, arr[1].transpose(2, 1, 0))


def test_5d_is_refused(tmp_nifti):
    path = tmp_nifti(ramp((3, 3, 3, 2, 2)))
    expect_error(VolumeContentError, path, "dimensions", load_volume, path, volume_index=0)


# --------------------------------------------------------------------------- DICOM


def write_dicom_series(
    folder: Path,
    array: np.ndarray,
    spacing,
    origin,
    direction,
    uid: str,
    prefix: str = "IM",
    reverse_names: bool = True,
) -> list[Path]:
    """Write an (X, Y, Z) int16 array as one DICOM file per slice with full geometry tags.

    Follows SimpleITK's "DICOM series from array" recipe: each slice carries its own
    ImagePositionPatient (ITK's physical point of voxel (0, 0, k)) and the shared
    ImageOrientationPatient (direction columns 0 and 1, LPS).
    """
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(array.transpose(2, 1, 0))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    d = np.asarray(direction, dtype=float)
    img.SetDirection(d.ravel().tolist())
    iop = "\\".join(f"{v:.10f}" for v in (*d[:, 0], *d[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    n = array.shape[2]
    for k in range(n):
        sl = img[:, :, k]
        ipp = img.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {
            "0008|0060": "MR",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
            "0008|0018": f"{uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.10f}" for v in ipp),
            "0020|0037": iop,
            "0018|0050": f"{spacing[2]:.10f}",
        }.items():
            sl.SetMetaData(tag, value)
        # names in the opposite order of the positions: the reader must sort by position
        path = folder / f"{prefix}{(n - 1 - k) if reverse_names else k:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        paths.append(path)
    return paths


DICOM_DIR = np.linalg.qr(ROT)[0] * np.sign(np.diag(np.linalg.qr(ROT)[1]))  # orthonormal, oblique
UID_A = "1.2.826.0.1.3680043.2.1125.10"
UID_B = "1.2.826.0.1.3680043.2.1125.20"


@pytest.fixture
def dicom_series(tmp_path):
    data = ramp((8, 8, 4), np.int16) - 100
    spacing, origin = (0.8, 1.0, 3.0), (-50.0, 20.0, 10.0)
    paths = write_dicom_series(tmp_path / "series", data, spacing, origin, DICOM_DIR, UID_A)
    expected = np.eye(4)
    expected[:3, :3] = DICOM_DIR @ np.diag(spacing)
    expected[:3, 3] = origin
    return tmp_path / "series", data, LPS_TO_RAS @ expected, paths


def test_dicom_series_folder_loads_with_the_right_affine(dicom_series):
    folder, data, expected, paths = dicom_series
    vol = load_volume(folder)
    np.testing.assert_array_equal(vol.array, data)
    np.testing.assert_allclose(vol.affine, expected, atol=ATOL)
    assert (
        vol.meta["format"] == "dicom"
        and vol.meta["series_uid"] == UID_A
        and vol.meta["n_files"] == 4
    )
    # pydicom, independently: each slice's ImagePositionPatient (LPS) is affine @ (0, 0, k)
    import pydicom

    for k, path in enumerate(paths):
        ipp = np.asarray(
            pydicom.dcmread(str(path), stop_before_pixels=True).ImagePositionPatient, float
        )
        np.testing.assert_allclose(
            (vol.affine @ [0, 0, k, 1])[:3], LPS_TO_RAS[:3, :3] @ ipp, atol=ATOL
        )


def test_single_dicom_file_is_one_slice(dicom_series):
    folder, data, expected, paths = dicom_series
    vol = load_volume(paths[2])
    assert vol.shape == (8, 8, 1)
    np.testing.assert_array_equal(vol.array[..., 0], data[..., 2])
    np.testing.assert_allclose(vol.affine[:3, :2], expected[:3, :2], atol=ATOL)
    np.testing.assert_allclose(vol.affine[:3, 3], (expected @ [0, 0, 2, 1])[:3], atol=ATOL)


def test_suffixless_dicom_is_recognised(dicom_series, tmp_path):
    folder, data, expected, paths = dicom_series
    bare = tmp_path / "IMAGE0001"
    shutil.copy(paths[0], bare)
    np.testing.assert_array_equal(load_volume(bare).array[..., 0], data[..., 0])


def test_two_series_in_one_folder(dicom_series):
    folder, data, expected, paths = dicom_series
    write_dicom_series(
        folder, data[:, :, :3] + 7, (0.8, 1.0, 3.0), (0.0, 0.0, 0.0), np.eye(3), UID_B, prefix="B"
    )
    err = expect_error(VolumeError, folder, "dicom-series", load_volume, folder)
    assert UID_A in str(err) and UID_B in str(err) and "series_uid" in str(err)
    np.testing.assert_array_equal(load_volume(folder, series_uid=UID_B).array, data[:, :, :3] + 7)
    np.testing.assert_array_equal(load_volume(folder, series_uid=UID_A).array, data)
    expect_error(VolumeError, folder, "dicom-series", load_volume, folder, series_uid="1.2.3")


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    paths = write_dicom_series(
        tmp_path / "gap", ramp((8, 8, 5), np.int16), (1.0, 1.0, 2.0), (0, 0, 0), np.eye(3), UID_A
    )
    paths[2].unlink()
    err = expect_error(
        VolumeContentError, tmp_path / "gap", "dicom-geometry", load_volume, tmp_path / "gap"
    )
    assert "regular" in str(err)


def test_folder_without_dicom(tmp_path, tmp_nifti):
    tmp_nifti(name="inside/vol.nii.gz")
    expect_error(VolumeError, tmp_path / "inside", "dicom-series", load_volume, tmp_path / "inside")


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    expect_error(
        VolumeError, tmp_path / "nope.nii.gz", "missing", load_volume, tmp_path / "nope.nii.gz"
    )


@pytest.mark.parametrize("name", ["zero.nii.gz", "zero.nii", "zero.nrrd", "zero.dcm"])
def test_zero_byte_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    expect_error(VolumeError, tmp_path / name, "empty-file", load_volume, tmp_path / name)


@pytest.mark.parametrize("name", ["junk.nii", "junk.nii.gz", "junk.mgz", "junk.nrrd", "junk.mha"])
def test_garbage_file_is_corrupt(tmp_path, name):
    (tmp_path / name).write_bytes(np.random.default_rng(0).bytes(2000))
    expect_error(VolumeError, tmp_path / name, "corrupt", load_volume, tmp_path / name)


def test_truncated_nii_gz(tmp_nifti):
    path = tmp_nifti(ramp((20, 20, 20)), name="cut.nii.gz")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # header intact, data stops half way
    err = expect_error(VolumeError, path, "corrupt", load_volume, path)
    assert "truncated" in str(err)


def test_truncated_nii(tmp_nifti):
    path = tmp_nifti(ramp((20, 20, 20)), name="cut.nii")
    raw = path.read_bytes()
    path.write_bytes(raw[:1000])
    expect_error(VolumeError, path, "corrupt", load_volume, path)


def test_mhd_without_its_raw_file(tmp_path):
    sitk.WriteImage(sitk_image((4, 4, 4), (1, 1, 1), (0, 0, 0), np.eye(3)), str(tmp_path / "m.mhd"))
    (tmp_path / "m.raw").unlink()
    expect_error(VolumeError, tmp_path / "m.mhd", "corrupt", load_volume, tmp_path / "m.mhd")


@pytest.mark.parametrize("name", ["notes.txt", "scan.hdr", "scan.mnc", "README", "scan.png"])
def test_unsupported_format(tmp_path, name):
    (tmp_path / name).write_bytes(b"x" * 400)
    err = expect_error(
        VolumeError, tmp_path / name, "unsupported-format", load_volume, tmp_path / name
    )
    assert ".nii.gz" in str(err)  # says what is supported


def test_non_finite_values(tmp_nifti):
    data = ramp((4, 5, 6))
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    path = tmp_nifti(data, name="nan.nii.gz")
    err = expect_error(VolumeContentError, path, "non-finite", load_volume, path)
    assert "2 NaN/Inf" in str(err)
    vol = load_volume(path, allow_non_finite=True)
    assert np.isnan(vol.array[1, 2, 3]) and np.isinf(vol.array[0, 0, 0])


def test_zero_size_array(tmp_nifti):
    path = tmp_nifti(np.zeros((4, 0, 3), np.float32), name="empty.nii.gz")
    expect_error(VolumeContentError, path, "dimensions", load_volume, path)


def test_1d_is_refused(tmp_nifti):
    path = tmp_nifti(np.zeros((7,), np.float32), name="line.nii")
    expect_error(VolumeContentError, path, "dimensions", load_volume, path)


def test_rgb_and_complex_are_refused(tmp_path):
    rgb = np.zeros((3, 3, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(tmp_path / "rgb.nii"))
    expect_error(
        VolumeContentError,
        tmp_path / "rgb.nii",
        "multi-component",
        load_volume,
        tmp_path / "rgb.nii",
    )
    cplx = (ramp((3, 3, 3)) + 1j).astype(np.complex64)
    nib.save(nib.Nifti1Image(cplx, np.eye(4)), str(tmp_path / "c.nii"))
    expect_error(VolumeContentError, tmp_path / "c.nii", "complex", load_volume, tmp_path / "c.nii")
    rgb_img = sitk.Compose([sitk.GetImageFromArray(ramp((3, 4, 5), np.uint8))] * 3)
    sitk.WriteImage(rgb_img, str(tmp_path / "rgb.mha"))
    expect_error(
        VolumeContentError,
        tmp_path / "rgb.mha",
        "multi-component",
        load_volume,
        tmp_path / "rgb.mha",
    )


def test_degenerate_affine(tmp_path):
    img = nib.Nifti1Image(ramp((3, 3, 3)), None)
    img.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)  # a zero voxel size along y
    path = tmp_path / "flat.nii.gz"
    nib.save(img, str(path))
    expect_error(VolumeContentError, path, "bad-affine", load_volume, path)


def test_size_guard_uses_the_env_var(tmp_nifti, monkeypatch):
    path = tmp_nifti(ramp((10, 10, 10)), name="big.nii.gz")  # 4000 bytes of float32
    monkeypatch.setenv("MEDIDIFF_MAX_VOXEL_BYTES", "3999")
    err = expect_error(VolumeContentError, path, "too-large", load_volume, path)
    assert "MEDIDIFF_MAX_VOXEL_BYTES" in str(err) and "GiB" in str(err)
    monkeypatch.setenv("MEDIDIFF_MAX_VOXEL_BYTES", "4000")
    assert load_volume(path).shape == (10, 10, 10)
    monkeypatch.setenv("MEDIDIFF_MAX_VOXEL_BYTES", "lots")
    with pytest.raises(ConfigError, match="MEDIDIFF_MAX_VOXEL_BYTES"):
        load_volume(path)


def test_absurd_header_is_refused_before_reading(tmp_path):
    """A header claiming 30000^3 float64 voxels (~196 TiB): refused, nothing allocated."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30000, 30000, 30000))
    hdr.set_data_dtype(np.float64)
    path = tmp_path / "huge.nii"
    with open(path, "wb") as fh:
        hdr.write_to(fh)
        fh.write(b"\0" * 4)
    err = expect_error(VolumeContentError, path, "too-large", load_volume, path)
    assert "2.01e+05 GiB" in str(err)  # 30000**3 * 8 bytes = 201,166 GiB


def test_errors_are_medidiff_errors_for_the_cli(tmp_path, run_cli):
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 50)
    rc, out, err = run_cli(["info", tmp_path / "bad.nii.gz"])
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("medidiff: error: ") and "bad.nii.gz" in err


def test_reader_chatter_is_collected_without_touching_stderr(capfd):
    """Warnings and nibabel's log records are collected with the libraries' own switches;
    file descriptor 2 is never redirected (a library must not do that to its host)."""
    import warnings

    import nibabel.imageglobals as nib_globals

    handlers = nib_globals.logger.handlers[:]
    messages: list[str] = []
    with quiet_readers(messages, itk=True):
        assert sitk.ProcessObject.GetGlobalWarningDisplay() is False
        warnings.warn("python says hello", UserWarning, stacklevel=1)
        nib_globals.logger.warning("nibabel says hello")
        os.write(2, b"native text still reaches stderr\n")
    assert {"python says hello", "nibabel says hello"} <= set(messages)
    assert capfd.readouterr().err == "native text still reaches stderr\n"
    assert nib_globals.logger.handlers == handlers  # restored
    assert sitk.ProcessObject.GetGlobalWarningDisplay() is True  # restored


def test_itk_warnings_switch_is_restored_even_if_it_was_off():
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        with quiet_readers([], itk=True):
            pass
        assert sitk.ProcessObject.GetGlobalWarningDisplay() is False
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(True)


# --------------------------------------------------------------------------- writing


def test_atomic_path_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "map.nii.gz"
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a file")
        assert tmp.parent == target.parent and tmp.name.endswith(".nii.gz")
        raise RuntimeError("disk on fire")
    assert list(target.parent.iterdir()) == []


def test_atomic_path_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("new")
        raise KeyboardInterrupt
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_save_volume_failure_inside_the_writer_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "v.nii.gz"
    save_volume(Volume(ramp((3, 3, 3)), np.eye(4)), target)
    before = target.read_bytes()

    def broken_save(img, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OutputError, match="No space left"):
        save_volume(Volume(ramp((3, 3, 3)) + 1, np.eye(4)), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.nii.gz"]


def test_overwrite_false(tmp_path):
    target = write_text_atomic(tmp_path / "x.txt", "first")
    with pytest.raises(OutputError, match="x.txt"):
        write_text_atomic(target, "second", overwrite=False)
    assert target.read_text(encoding="utf-8") == "first"


def test_written_files_have_normal_permissions(tmp_path):
    target = write_text_atomic(tmp_path / "p.txt", "hi")
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


def test_nii_gz_is_really_gzip(tmp_path):
    out = save_volume(Volume(ramp((3, 3, 3)), np.eye(4)), tmp_path / "z.nii.gz")
    assert out.read_bytes()[:2] == b"\x1f\x8b"
    assert gzip.decompress(out.read_bytes())[344:348] == b"n+1\x00"


def test_write_json_atomic_handles_numpy(tmp_path):
    import json

    out = write_json_atomic(
        tmp_path / "m.json", {"a": np.float32(0.5), "b": np.arange(3), "c": tmp_path}
    )
    assert json.loads(out.read_text(encoding="utf-8")) == {"a": 0.5, "b": [0, 1, 2], "c": str(tmp_path)}


def test_save_volume_refuses_other_suffixes(tmp_path):
    with pytest.raises(OutputError, match="NIfTI"):
        save_volume(Volume(ramp((3, 3, 3)), np.eye(4)), tmp_path / "x.nrrd")


@pytest.mark.parametrize(
    "array, dtype, meta, on_disk",
    [
        (ramp((3, 3, 3), np.float64), None, {}, np.float32),  # computed float64 maps -> float32
        (
            ramp((3, 3, 3), np.float64),
            None,
            {"dtype": "float64"},
            np.float64,
        ),  # float64 source kept
        (ramp((3, 3, 3)) > 100, None, {}, np.uint8),  # masks
        (ramp((3, 3, 3), np.int64), None, {}, np.int64),
        (ramp((3, 3, 3)) + 0.4, "int16", {}, np.int16),  # rounded
    ],
)
def test_save_dtype_rules(tmp_path, array, dtype, meta, on_disk):
    out = save_volume(Volume(array, np.eye(4), meta), tmp_path / "d.nii.gz", dtype=dtype)
    assert nib.load(str(out)).get_data_dtype() == np.dtype(on_disk)
    np.testing.assert_array_equal(
        load_volume(out).array,
        np.rint(array.astype(np.float64)).astype(on_disk) if dtype else array.astype(on_disk),
    )


def test_save_refuses_values_that_do_not_fit(tmp_path):
    with pytest.raises(OutputError, match="do not fit"):
        save_volume(Volume(ramp((3, 3, 3)) * 1000, np.eye(4)), tmp_path / "o.nii", dtype="uint8")
    nan = ramp((3, 3, 3))
    nan[0, 0, 0] = np.nan
    with pytest.raises(OutputError, match="NaN"):
        save_volume(Volume(nan, np.eye(4)), tmp_path / "o.nii", dtype="int16")
    assert not (tmp_path / "o.nii").exists()


# --------------------------------------------------------------------------- small helpers


@pytest.mark.parametrize(
    "name, expected",
    [
        ("a.nii.gz", True),
        ("A.NII.GZ", True),
        ("b.nii", True),
        ("c.nrrd", True),
        ("c.nhdr", True),
        ("d.mha", True),
        ("d.mhd", True),
        ("e.mgz", True),
        ("e.mgh", True),
        ("f.dcm", False),
        ("g.gz", False),
        ("h.hdr", False),
        ("folder", False),
        ("x.nii.gz.bak", False),
    ],
)
def test_is_volume_path(name, expected):
    assert is_volume_path(name) is expected


@pytest.mark.parametrize(
    "name, expected",
    [
        ("a.nii.gz", "a"),
        ("b.nrrd", "b"),
        ("c.mha", "c"),
        ("d.nii", "d"),
        ("e.MGZ", "e"),
        ("f.dcm", "f"),
        ("sub-01.ses-1_T1w.nii.gz", "sub-01.ses-1_T1w"),
        ("case.01", "case.01"),
        ("dir/x.nii.gz", "dir/x"),
        (".nii.gz", ".nii.gz"),
    ],
)
def test_strip_volume_suffix(name, expected):
    assert strip_volume_suffix(name) == expected


def test_check_same_grid():
    a = Volume(np.zeros((3, 4, 5)), np.eye(4), {"source": "a.nii.gz"})
    check_same_grid(a, Volume(np.ones((3, 4, 5)), np.eye(4) + 1e-5))
    with pytest.raises(VolumeContentError, match="b.nii.gz"):
        check_same_grid(a, Volume(np.zeros((3, 4, 6)), np.eye(4), {"source": "b.nii.gz"}))
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    with pytest.raises(VolumeContentError, match="0.5 mm"):
        check_same_grid(a, Volume(np.zeros((3, 4, 5)), shifted, {"source": "b.nii.gz"}))


def test_volume_repr_is_short():
    text = repr(
        Volume(
            np.zeros((64, 64, 64), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), {"source": "x.nii"}
        )
    )
    assert "shape=(64, 64, 64)" in text and "RAS" in text and len(text) < 200


def test_errors_subclass_medidiff_error():
    assert issubclass(VolumeContentError, VolumeError) and issubclass(VolumeError, MedidiffError)
