"""Robustness corpus: the odd files nibabel and pydicom ship for their own tests.

Every file (and every pydicom folder, read as a DICOM series) is either loaded with the
same voxels and geometry a reference reader gives, or rejected with a MedidiffError that
names it; never another exception. ``medidiff info`` on each exits 0 with nothing on
stderr, or non-zero with exactly one ``medidiff: error:`` line.

References: nibabel (``np.asanyarray(img.dataobj)``, ``img.affine``) for NIfTI/MGH;
for DICOM, SimpleITK read directly (pixels, and its own ``TransformIndexToPhysicalPoint``
for geometry) plus pydicom, independently: the affine's first two columns and origin
from ImageOrientationPatient / PixelSpacing / ImagePositionPatient, and the pixels from
``pixel_array`` with the modality LUT where pydicom can decode them.

The table of outcomes: ``python pipelines/corpus_report.py``.
"""

from __future__ import annotations

import collections
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from medidiff.errors import MedidiffError
from medidiff.io import load_volume

_spec = importlib.util.spec_from_file_location(
    "corpus_report", Path(__file__).resolve().parents[1] / "pipelines" / "corpus_report.py"
)
corpus_report = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("corpus_report", corpus_report)  # dataclasses look their module up
_spec.loader.exec_module(corpus_report)

FILES = corpus_report.corpus_files()
IDS = [f.name for f in FILES]
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _reference_nibabel(path: Path, vol, volume_index=None) -> None:
    import nibabel as nib

    img = nib.load(str(path))
    ref = np.asanyarray(img.dataobj)
    if volume_index is not None:
        ref = ref[..., volume_index]
    assert ref.size == vol.array.size
    np.testing.assert_array_equal(vol.array, ref.reshape(vol.shape))
    np.testing.assert_allclose(vol.affine, img.affine, rtol=0, atol=1e-9)


def _reference_sitk(path: Path, vol) -> None:
    import SimpleITK as sitk

    if path.is_dir():
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), vol.meta["series_uid"])
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        img = reader.Execute()
    else:
        files = [str(path)]
        img = sitk.ReadImage(str(path))
    ref = sitk.GetArrayFromImage(img)  # (z, y, x)
    info = sitk.ImageFileReader()
    info.SetFileName(files[0])
    info.ReadImageInformation()
    if info.HasMetaDataKey("0028|0100") and info.GetMetaData("0028|0100").strip() == "1":
        ref = (ref != 0).astype(
            np.uint8
        )  # GDCM gives 1-bit pixels as 0/255; medidiff keeps the stored 0/1
    np.testing.assert_array_equal(vol.array, ref.transpose(2, 1, 0).reshape(vol.shape))
    size = img.GetSize()
    for index in [
        (0, 0, 0),
        (size[0] - 1, 0, 0),
        (0, size[1] - 1, 0),
        (0, 0, size[2] - 1),
        tuple(s - 1 for s in size),
    ]:
        lps = np.asarray(img.TransformIndexToPhysicalPoint([int(i) for i in index]))
        np.testing.assert_allclose((vol.affine @ [*index, 1.0])[:3], LPS_TO_RAS @ lps, atol=1e-4)


def _reference_pydicom(path: Path, vol) -> None:
    """Independent of SimpleITK: geometry from the tags, pixels from pydicom's decoders."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(str(path))
    if vol.shape[2] == 1 and all(
        k in ds for k in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")
    ):
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        row_spacing, col_spacing = (
            float(v) for v in ds.PixelSpacing
        )  # between rows, between columns
        np.testing.assert_allclose(vol.affine[:3, 0], LPS_TO_RAS @ iop[:3] * col_spacing, atol=1e-4)
        np.testing.assert_allclose(vol.affine[:3, 1], LPS_TO_RAS @ iop[3:] * row_spacing, atol=1e-4)
        np.testing.assert_allclose(
            vol.affine[:3, 3], LPS_TO_RAS @ np.asarray(ds.ImagePositionPatient, float), atol=1e-4
        )
    try:
        stored = ds.pixel_array
    except Exception:  # noqa: BLE001 - no pydicom decoder for this transfer syntax here
        return
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        # documented medidiff/GDCM behaviour: grey levels inverted to MONOCHROME2 before the rescale
        assert int(ds.PixelRepresentation) == 0
        stored = (2 ** int(ds.BitsStored) - 1) - stored.astype(np.int64)
        assert any("MONOCHROME1" in w for w in vol.meta["warnings"])
    pixels = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    pixels = pixels.reshape((-1, int(ds.Rows), int(ds.Columns)))  # (frames, y, x)
    expected = pixels.transpose(2, 1, 0)
    lossy = ds.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")
    # lossy JPEG: two decoders may differ by a grey level (different IDCTs)
    np.testing.assert_allclose(
        vol.array.astype(np.float64), expected.reshape(vol.shape), atol=2 if lossy else 0
    )


# outcome per corpus name ("load" or the reason code), filled as the per-file tests run so
# the summary tests below need not load everything again
_SEEN: dict[str, str] = {}


def _outcome(item) -> str:
    if item.name not in _SEEN:
        result = corpus_report.check(item)
        _SEEN[item.name] = (
            "load"
            if result.outcome == "load"
            else (result.reason if result.outcome == "reject" else "CRASH")
        )
    return _SEEN[item.name]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's remarks on odd reference files
@pytest.mark.parametrize("item", FILES, ids=IDS)
def test_load_matches_reference_or_is_rejected(item):
    path = item.path
    try:
        vol = load_volume(path)
        _SEEN[item.name] = "load"
    except MedidiffError as exc:
        assert path.name in str(exc), "the message must name the file"
        reason = getattr(exc, "reason", None)
        assert reason, f"no reason code on {exc!r}"
        _SEEN[item.name] = reason
        # the content-level refusals can be lifted; what loads then must still be right
        if reason in ("4d", "non-finite"):
            vol = load_volume(
                path,
                volume_index=0 if reason == "4d" else None,
                allow_non_finite=reason == "non-finite",
            )
            if vol.meta["format"] in ("nifti", "mgh"):
                _reference_nibabel(path, vol, volume_index=0 if reason == "4d" else None)
        return
    if vol.meta["format"] in ("nifti", "mgh"):
        _reference_nibabel(path, vol)
    else:
        assert vol.meta["format"] == "dicom"
        _reference_sitk(path, vol)
        if path.is_file():
            _reference_pydicom(path, vol)


@pytest.mark.parametrize("item", FILES, ids=IDS)
def test_info_exits_cleanly(item, run_cli):
    rc, out, err = run_cli(["info", item.path])
    assert "Traceback" not in err + out
    if rc == 0:
        assert err == "", f"stderr chatter: {err!r}"
        assert "shape" in out and "orientation" in out
    else:
        assert rc == 1
        assert err.endswith("\n") and err.count("\n") == 1, err
        assert err.startswith("medidiff: error: ") and item.path.name in err
        assert out == ""


# Outcomes pinned so that a regression in either direction (crash, or loading garbage) shows.
EXPECTED = {
    "nibabel:anatomical.nii": "load",
    "nibabel:standard.nii.gz": "load",
    "nibabel:reoriented_anat_moved.nii": "load",
    "nibabel:0.dcm": "load",
    "pydicom:MR_small.dcm": "load",
    "pydicom:MR_small_bigendian.dcm": "load",
    "pydicom:CT_small.dcm": "load",
    "pydicom:rtdose.dcm": "load",
    "pydicom-dir:dicomdirtests/98892001/CT5N/": "load",
    "nibabel:example4d.nii.gz": "4d",
    "nibabel:example_nifti2.nii.gz": "4d",
    "nibabel:test.mgz": "4d",
    "nibabel:resampled_anat_moved.nii": "non-finite",
    "nibabel:row_major.dconn.nii": "no-voxel-grid",
    "nibabel:nifti1.hdr": "unsupported-format",
    "nibabel:minc1_1_scale.mnc": "unsupported-format",
    "pydicom:SC_rgb_rle.dcm": "multi-component",
    "pydicom:rtdose_expb.dcm": "dicom-unsupported",
    "pydicom:MR_truncated.dcm": "dicom-unreadable",
    "pydicom:dicomdirtests/DICOMDIR": "dicom-unreadable",
    "pydicom:JPEG2000-embedded-sequence-delimiter.dcm": "corrupt",
    "pydicom-dir:dicomdirtests/98892003/MR2/": "dicom-series",
    "pydicom-dir:dicomdirtests/98892001/CT2N/": "dicom-geometry",
}


def test_corpus_outcomes():
    by_name = {f.name: f for f in FILES}
    missing = sorted(set(EXPECTED) - set(by_name))
    assert not missing, missing
    assert {name: _outcome(by_name[name]) for name in EXPECTED} == EXPECTED


def test_corpus_is_not_trivially_rejected():
    counts = collections.Counter(
        (f.source, "load" if _outcome(f) == "load" else "reject") for f in FILES
    )
    assert not [f.name for f in FILES if _outcome(f) == "CRASH"]
    assert counts[("nibabel", "load")] >= 5
    assert counts[("pydicom", "load")] >= 50
