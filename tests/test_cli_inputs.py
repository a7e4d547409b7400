"""How the CLI reads a lab's own inputs: datalist splits, 4D files, DICOM series names.

- ``anomaly --input dataset.json`` scores the ``test`` split unless ``--split`` says
  otherwise (it used to score ``training`` silently) and prints the split it read.
- 4D files: ``anomaly``/``calibrate --volume-index N`` pick one volume; the error for a 4D
  file names the flag and, for ``train``, how to split the file.
- A DICOM series folder ``patient/T1/`` gives outputs named ``patient_T1``, so the usual
  one-folder-per-sequence layout does not collide across patients.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
RAS = SAMPLE / "test" / "images" / "tumor-000.nii.gz"
FAST = ["--method", "ddim", "--t-start", "6", "--steps", "2", "--no-overlay", "--device", "cpu"]

pytestmark = pytest.mark.skipif(
    not (SAMPLE / "dataset.json").exists(), reason="sample_data not built"
)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _datalist(folder: Path, splits: dict[str, list[Path]]) -> Path:
    path = folder / "dataset.json"
    path.write_text(json.dumps({k: [{"image": str(p)} for p in v] for k, v in splits.items()}))
    return path


# ---- datalist splits ---------------------------------------------------------------------


def test_anomaly_on_a_datalist_scores_the_test_split_and_says_so(
    run_cli, tiny_checkpoint_2d, tmp_path
):
    train = sorted((SAMPLE / "train" / "images").glob("*.nii.gz"))[:2]
    datalist = _datalist(tmp_path, {"training": train, "test": [RAS]})
    base = ["anomaly", "--checkpoint", tiny_checkpoint_2d, "--input", datalist, *FAST]
    res = run_cli([*base, "--out", tmp_path / "a"])
    assert res.rc == 0, res.err
    first = res.out.splitlines()[0]
    assert first.startswith(f"scoring split 'test' of {datalist}: 1 scan(s) (the default;")
    assert "training" in first  # the other splits are named
    assert [r["name"] for r in _rows(tmp_path / "a" / "scores.csv")] == ["tumor-000"]

    res = run_cli([*base, "--split", "training", "--out", tmp_path / "b"])
    assert res.rc == 0, res.err
    assert res.out.splitlines()[0] == f"scoring split 'training' of {datalist}: 2 scan(s)"

    # a datalist without a test split: --split is required, before any work
    (tmp_path / "x").mkdir()
    no_test = _datalist(tmp_path / "x", {"training": train, "validation": [RAS]})
    res = run_cli(["anomaly", "--checkpoint", tiny_checkpoint_2d, "--input", no_test, *FAST,
                   "--out", tmp_path / "c"])
    assert res.rc != 0 and res.err.count("\n") == 1
    assert "no 'test' split" in res.err and "--split" in res.err
    assert "training, validation" in res.err
    assert not (tmp_path / "c").exists()


def test_the_split_help_says_each_commands_default():
    from medidiff.cli.main import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices
    helps = {name: {a.dest: a.help for a in sub[name]._actions}["split"]
             for name in ("anomaly", "calibrate")}
    assert "default: test" in helps["anomaly"]
    assert "default: training" in helps["calibrate"]


# ---- 4D files ----------------------------------------------------------------------------


def _four_d(tmp_path: Path) -> Path:
    """(X, Y, Z, 2): volume 0 empty (refused: constant), volume 1 a sample scan."""
    img = nib.load(RAS)
    data = np.asarray(img.dataobj, dtype=np.float32)
    path = tmp_path / "echoes.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([np.zeros_like(data), data], axis=-1), img.affine), path)
    return path


def test_anomaly_volume_index_scores_one_volume_of_a_4d_file(run_cli, tiny_checkpoint_2d,
                                                              tmp_path):
    path = _four_d(tmp_path)
    base = ["anomaly", "--checkpoint", tiny_checkpoint_2d, "--input", path, *FAST]
    res = run_cli([*base, "--out", tmp_path / "none"])
    assert res.rc == 4  # the scan is skipped with one line that says what to do
    assert "4D data" in res.err and "--volume-index N" in res.err and "fslsplit" in res.err

    res = run_cli([*base, "--volume-index", "1", "--out", tmp_path / "one"])
    assert res.rc == 0, res.err
    amap = nib.load(tmp_path / "one" / "echoes_anomaly.nii.gz")
    assert amap.shape == nib.load(RAS).shape
    np.testing.assert_allclose(amap.affine, nib.load(RAS).affine, atol=1e-4)


def test_calibrate_takes_volume_index_to_the_detector():
    """calibrate shares anomaly's detector options: --volume-index reaches the detector."""
    from medidiff.cli.commands.anomaly import build_detector
    from medidiff.cli.main import build_parser

    args = build_parser().parse_args(
        ["calibrate", "--healthy", "x.nii.gz", "--out", "t.json", "--volume-index", "2"])
    assert args.volume_index == 2
    seen = {}

    class Recorder:
        input_profile = "recorded"  # a checkpoint with a profile: no note printed

        def __init__(self, *a, **kw):
            seen.update(kw)

    import medidiff.anomaly.detector as detector_module

    original = detector_module.AnomalyDetector
    detector_module.AnomalyDetector = Recorder
    try:
        build_detector(args, Path("ckpt"), None, None, type("I", (), {"device": "cpu"})())
    finally:
        detector_module.AnomalyDetector = original
    assert seen["volume_index"] == 2


def test_train_on_a_4d_file_says_how_to_split_it(run_cli, tmp_path):
    path = _four_d(tmp_path)
    (tmp_path / "list.csv").write_text(f"image\n{path}\n")
    res = run_cli(["train", "--config", ROOT / "configs" / "tiny_test.yaml", "--out",
                   tmp_path / "run", "--set", f"data.datalist={tmp_path / 'list.csv'}",
                   "--no-progress", "--device", "cpu"])
    assert res.rc != 0 and res.err.count("\n") == 1
    assert "4D data" in res.err and "fslsplit" in res.err and "train" in res.err


# ---- DICOM series names ------------------------------------------------------------------


def _dicom_series(folder: Path, array: np.ndarray, spacing: float, uid: str) -> None:
    """One DICOM file per axial slice (int16, identity direction), as a scanner exports."""
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    img = sitk.GetImageFromArray(array.transpose(2, 1, 0).astype(np.int16))
    img.SetSpacing([spacing] * 3)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[2]):
        sl = img[:, :, k]
        ipp = img.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {"0008|0060": "MR", "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
                           "0008|0018": f"{uid}.{k + 1}", "0020|000e": uid,
                           "0020|0013": str(k + 1),
                           "0020|0032": "\\".join(f"{v:.6f}" for v in ipp),
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": f"{spacing}"}.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_folders_are_named_with_their_parent(run_cli, tiny_checkpoint_2d, tmp_path):
    data = np.asarray(nib.load(RAS).dataobj)[::3, ::3, ::3]  # 32 x 38 x 32 at 6 mm
    for i, patient in enumerate(("p1", "p2")):
        _dicom_series(tmp_path / "cohort" / patient / "T1", data, 6.0,
                      f"1.2.826.0.1.3680043.2.1125.7{i}")
    from medidiff.data.datalist import load_datalist

    entries = load_datalist(str(tmp_path / "cohort" / "*" / "T1"))
    assert [e.name for e in entries] == ["p1_T1", "p2_T1"]
    res = run_cli(["anomaly", "--checkpoint", tiny_checkpoint_2d, "--input",
                   tmp_path / "cohort" / "p1" / "T1", tmp_path / "cohort" / "p2" / "T1",
                   *FAST, "--out", tmp_path / "out"])
    assert res.rc == 0, res.err
    assert sorted(p.name for p in (tmp_path / "out").glob("*_anomaly.nii.gz")) == [
        "p1_T1_anomaly.nii.gz", "p2_T1_anomaly.nii.gz"]
    assert [r["name"] for r in _rows(tmp_path / "out" / "scores.csv")] == ["p1_T1", "p2_T1"]

    # the same patient/series names under two sites: refused before any work
    (tmp_path / "site2").mkdir()
    (tmp_path / "cohort" / "p1").rename(tmp_path / "site2" / "p1")
    _dicom_series(tmp_path / "cohort" / "p1" / "T1", data, 6.0, "1.2.826.0.1.3680043.2.1125.79")
    res = run_cli(["anomaly", "--checkpoint", tiny_checkpoint_2d, "--input",
                   tmp_path / "cohort" / "p1" / "T1", tmp_path / "site2" / "p1" / "T1",
                   *FAST, "--out", tmp_path / "out2"])
    assert res.rc != 0 and "both named 'p1_T1'" in res.err and res.err.count("\n") == 1
    assert not (tmp_path / "out2").exists()
