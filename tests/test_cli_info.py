"""``medidiff info``: the text table, the JSON object, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

REQUIRED_KEYS = {"shape", "spacing", "orientation", "affine", "dtype", "min", "max"}
# LPS storage, anisotropic voxels, a translation: every field has a distinct value
LPS_AFFINE = np.array([[-0.8, 0, 0, 90.0], [0, -1.0, 0, 110.0], [0, 0, 3.0, -70.0], [0, 0, 0, 1]])


@pytest.fixture
def lps_file(tmp_nifti):
    data = (np.arange(4 * 5 * 6).reshape(4, 5, 6) - 7).astype(np.int16)  # min -7, max 112
    return tmp_nifti(data, LPS_AFFINE, name="lps.nii.gz")


def info_json(run_cli, *args):
    rc, out, err = run_cli(["info", *args, "--json"])
    assert rc == 0 and err == "", err
    return json.loads(out)  # exactly one JSON object, nothing else on stdout


def test_text_output(lps_file, run_cli):
    rc, out, err = run_cli(["info", lps_file])
    assert rc == 0 and err == ""
    lines = {
        line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")
    }
    assert "4 x 5 x 6" in lines["shape"]
    assert "0.8 x 1 x 3 mm" in lines["spacing"]
    assert lines["orientation"].split()[1] == "LPS"
    assert "int16" in lines["dtype"]
    assert "-7 .. 112" in lines["range"]
    assert "lps.nii.gz" in lines["file"]
    # the affine: four bracketed rows, values aligned in columns
    rows = [line for line in out.splitlines() if "[" in line]
    assert len(rows) == 4 and len({row.index("]") for row in rows}) == 1
    assert rows[0].split("[")[1].split() == ["-0.8", "0", "0", "90", "]"]
    # labels are aligned: every value starts in the same column
    starts = {
        len(line) - len(line[len(line.split()[0]) :].lstrip())
        for line in out.splitlines()
        if line and not line.startswith(" ")
    }
    assert len(starts) == 1


def test_json_keys_and_values(lps_file, run_cli):
    info = info_json(run_cli, lps_file)
    assert set(info) >= REQUIRED_KEYS
    assert info["shape"] == [4, 5, 6]
    assert info["spacing"] == pytest.approx([0.8, 1.0, 3.0], abs=1e-6)
    assert info["orientation"] == "LPS"
    np.testing.assert_allclose(info["affine"], LPS_AFFINE, atol=1e-5)
    assert info["dtype"] == "int16"
    assert (info["min"], info["max"]) == (-7, 112) and isinstance(info["min"], int)
    assert (
        info["format"] == "nifti"
        and info["non_finite"] == 0
        and info["path"].endswith("lps.nii.gz")
    )


def test_json_for_an_itk_file_is_lps_in_ras_terms(tmp_path, run_cli):
    """An MHA with identity ITK direction: voxel axes point Left, Posterior, Superior."""
    img = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32))
    img.SetSpacing((0.5, 0.6, 2.0))
    img.SetOrigin((10.0, 20.0, 30.0))
    sitk.WriteImage(img, str(tmp_path / "itk.mha"))
    info = info_json(run_cli, tmp_path / "itk.mha")
    assert info["orientation"] == "LPS" and info["format"] == "mha" and info["shape"] == [5, 4, 3]
    np.testing.assert_allclose(
        info["affine"], [[-0.5, 0, 0, -10], [0, -0.6, 0, -20], [0, 0, 2, 30], [0, 0, 0, 1]]
    )


def test_json_for_a_dicom_file_matches_its_tags(run_cli):
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    info = info_json(run_cli, path)
    assert info["format"] == "dicom" and info["shape"] == [int(ds.Columns), int(ds.Rows), 1]
    ipp = np.asarray(ds.ImagePositionPatient, float)
    np.testing.assert_allclose(
        np.asarray(info["affine"])[:3, 3], [-ipp[0], -ipp[1], ipp[2]], atol=1e-4
    )
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert (info["min"], info["max"]) == (hu.min(), hu.max())


def test_non_finite_voxels_are_counted_not_refused(tmp_nifti, run_cli):
    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    data[0, 0, 0] = np.nan
    data[2, 3, 4] = np.inf
    info = info_json(run_cli, tmp_nifti(data, name="nan.nii"))
    assert info["non_finite"] == 2
    assert (info["min"], info["max"]) == (1.0, 58.0)  # over the finite voxels
    rc, out, _ = run_cli(["info", tmp_nifti(data, name="nan.nii")])
    assert "2 voxels (NaN/Inf)" in out


def test_4d_is_described_whole_or_by_index(tmp_nifti, run_cli):
    data = np.stack([np.full((3, 4, 5), v, np.int16) for v in (1, 5, 9)], axis=-1)
    path = tmp_nifti(data, name="bold.nii.gz")
    whole = info_json(run_cli, path)
    assert (
        whole["shape"] == [3, 4, 5, 3]
        and whole["volumes"] == 3
        and (whole["min"], whole["max"]) == (1, 9)
    )
    one = info_json(run_cli, path, "--volume-index", "1")
    assert (
        one["shape"] == [3, 4, 5]
        and one["volume_index"] == 1
        and (one["min"], one["max"]) == (5, 5)
    )
    rc, out, err = run_cli(["info", path, "--volume-index", "3"])
    assert rc == 1 and out == "" and err.count("\n") == 1 and "out of range" in err


def one_line_error(result, name: str) -> str:
    rc, out, err = result
    assert rc != 0 and out == ""
    assert err.count("\n") == 1 and err.startswith("medidiff: error: ")
    assert name in err and "Traceback" not in err
    return err


def test_missing_file(tmp_path, run_cli):
    err = one_line_error(run_cli(["info", tmp_path / "absent.nii.gz"]), "absent.nii.gz")
    assert "no such file" in err


def test_corrupt_file(tmp_path, run_cli):
    (tmp_path / "corrupt.nii").write_bytes(b"\0" * 100 + b"not a nifti header" * 30)
    err = one_line_error(run_cli(["info", tmp_path / "corrupt.nii"]), "corrupt.nii")
    assert "corrupt" in err


def test_truncated_file(tmp_nifti, run_cli):
    path = tmp_nifti(np.ones((30, 30, 30), np.float32) * np.arange(30), name="cut.nii.gz")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    one_line_error(run_cli(["info", path]), "cut.nii.gz")


def test_unsupported_and_empty(tmp_path, run_cli):
    (tmp_path / "scan.mnc").write_bytes(b"CDF" + b"\0" * 100)
    assert "unsupported format" in one_line_error(
        run_cli(["info", tmp_path / "scan.mnc"]), "scan.mnc"
    )
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    assert "0 bytes" in one_line_error(run_cli(["info", tmp_path / "empty.nii.gz"]), "empty.nii.gz")


def test_help_mentions_the_json_keys(run_cli):
    rc, out, _ = run_cli(["info", "--help"])
    assert rc == 0 and "--json" in out and "--volume-index" in out and "orientation" in out


def test_mgh_file(tmp_path, run_cli):
    affine = np.array([[-1.0, 0, 0, 128], [0, 0, 1, -128], [0, -1, 0, 128], [0, 0, 0, 1]])
    nib.save(nib.MGHImage(np.zeros((4, 4, 4), np.float32), affine), str(tmp_path / "t1.mgz"))
    info = info_json(run_cli, tmp_path / "t1.mgz")
    assert info["orientation"] == "LIA" and info["format"] == "mgh"
    assert Path(info["path"]).name == "t1.mgz"


def test_dicom_folder_with_several_series(run_cli):
    from pydicom.data import get_testdata_file

    folder = Path(get_testdata_file("MR2/6273", read=False) or "").parent
    if not folder.is_dir():
        pytest.skip("pydicom's dicomdirtests folder is not installed")
    err = one_line_error(run_cli(["info", folder]), "MR2")
    assert "3 DICOM series" in err and "--series-uid" in err
    listing = err.split("series in one folder: ")[1].split("; pick one")[0]
    uids = [part.split(" (")[0] for part in listing.split("; ")]
    loaded = 0
    for uid in uids:  # some of these series are irregular localiser sets: a one-line error
        rc, out, err = run_cli(["info", folder, "--series-uid", uid, "--json"])
        if rc == 0:
            info = json.loads(out)
            assert info["series_uid"] == uid and info["format"] == "dicom" and err == ""
            loaded += 1
        else:
            one_line_error((rc, out, err), "MR2")
    assert len(uids) == 3 and loaded >= 1


def test_output_into_a_closed_pipe_ends_quietly(lps_file):
    """``medidiff info FILE | head -2``: the reader leaves early; no error, status 141 (SIGPIPE)."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "medidiff", "info", str(lps_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    proc.stdout.close()  # before medidiff writes anything: every write fails
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == "", err
