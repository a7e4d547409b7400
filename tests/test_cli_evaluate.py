"""``medidiff evaluate`` end to end on tiny NIfTI files written with nibabel.

The two lesion scans are the worked example of ``tests/test_metrics.py`` (5 voxels each):
A = scores 0.9 0.8 0.7 0.6 0.55 / labels 1 1 0 1 0, B = 0.5 0.4 0.3 0.2 0.1 / 0 1 0 0 0.
At threshold 0.45: dataset-wise Dice 0.6, per-scan 0.375 ± 0.375, voxel AUROC 20/24,
oracle Dice 0.75.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medidiff.cli.commands import evaluate as evaluate_command

A_SCORES = [0.9, 0.8, 0.7, 0.6, 0.55]
A_TRUTH = [1, 1, 0, 1, 0]
B_SCORES = [0.5, 0.4, 0.3, 0.2, 0.1]
B_TRUTH = [0, 1, 0, 0, 0]
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _vol(values, dtype=np.float32) -> np.ndarray:
    return np.asarray(values, dtype=dtype).reshape(5, 1, 1)


@pytest.fixture
def layout(tmp_nifti):
    """truth/{A,B,H}.nii.gz, pred/{A,B,H}_anomaly.nii.gz, pred/scores.csv, thresholds.json."""
    root = None
    for name, scores, truth in (("A", A_SCORES, A_TRUTH), ("B", B_SCORES, B_TRUTH),
                                ("H", [0.05] * 5, [0] * 5)):
        t = tmp_nifti(_vol(truth, np.uint8), AFFINE, name=f"truth/{name}.nii.gz")
        tmp_nifti(_vol(scores), AFFINE, name=f"pred/{name}_anomaly.nii.gz")
        root = t.parent.parent
    (root / "pred" / "scores.csv").write_text(
        "file,score,flagged\n/data/A.nii.gz,0.8,1\n/data/B.nii.gz,0.3,0\n/data/H.nii.gz,0.1,0\n"
    )
    (root / "thresholds.json").write_text(json.dumps(
        {"voxel_threshold": 0.45, "scan_threshold": 0.2, "fpr": 0.05, "method": {"name": "ddim"}}))
    return root


def test_docstring_no_longer_says_not_implemented():
    assert "NOT IMPLEMENTED YET" not in (evaluate_command.__doc__ or "")


def test_end_to_end_folder_truth(layout, run_cli):
    out = layout / "metrics.json"
    r = run_cli(["evaluate", "--pred", layout / "pred", "--truth", layout / "truth",
                 "--thresholds", layout / "thresholds.json", "--out", out])
    assert r.rc == 0, r.err
    d = json.loads(out.read_text(encoding="utf-8"))
    o = d["overall"]
    # H adds 5 normal voxels at 0.05, below every lesion: 20 + 4*5 pairs of 4*11
    assert o["voxel_auroc"] == pytest.approx(40 / 44)
    assert o["dice_dataset_wise"] == pytest.approx(0.6)
    assert o["dice_per_scan_mean"] == pytest.approx(0.375)
    assert o["dice_per_scan_std"] == pytest.approx(0.375)
    assert o["oracle_dice_dataset_wise"] == pytest.approx(0.75)
    assert 0.55 <= o["oracle_threshold"] < 0.6
    # scan scores {0.8, 0.3} (lesion) vs {0.1} (healthy) -> AUROC 1
    assert o["scan_auroc"] == pytest.approx(1.0)
    assert (o["n_lesion_scans"], o["n_healthy_scans"]) == (2, 1)
    assert d["voxel_threshold"] == 0.45 and d["threshold_source"] == "voxel_threshold"
    # no brain masks anywhere: said loudly, first, on stdout, stderr and in the JSON
    assert d["masks"] == "none (background voxels counted: optimistic)"
    assert d["inputs"]["masks"] == "none"
    assert len(d["warnings"]) == 1 and "optimistic" in d["warnings"][0]
    assert r.out.splitlines()[0].startswith("WARNING: no scan has a brain mask")
    assert r.err.startswith("medidiff: warning: no scan has a brain mask")
    assert d["missing_predictions"] == []
    assert [c["name"] for c in d["cases"]] == ["A", "B", "H"]
    assert "| all" in r.out and "oracle" in r.out
    assert r.out.rstrip().splitlines()[-1] == f"metrics written to {out}"


@pytest.mark.parametrize("folder", ["brainmasks", "brain_masks"])
def test_brain_masks_of_the_standard_layout_are_found(layout, tmp_nifti, run_cli, folder):
    """truth/ with a brainmasks/ folder beside it (sample_data's layout): used without
    --masks, and said so; --no-masks counts every voxel again; a folder that lacks a mask
    for some scan is not used."""
    for name in ("A", "B", "H"):  # drop B's last two voxels (0.2, 0.1; both normal)
        tmp_nifti(_vol([1, 1, 1, 0, 0] if name == "B" else [1] * 5, np.uint8), AFFINE,
                  name=f"{folder}/{name}.nii.gz")
    base = ["evaluate", "--pred", layout / "pred", "--truth", layout / "truth"]
    r = run_cli([*base, "--out", layout / "m.json"])
    assert r.rc == 0, r.err
    d = json.loads((layout / "m.json").read_text(encoding="utf-8"))
    assert d["masks"] == "voxels inside the brain masks" and d["warnings"] == []
    assert d["inputs"]["masks"] == f"found: {layout / folder}"
    assert d["cases"][1]["voxels"] == 3
    assert r.out.splitlines()[0].startswith(f"brain masks: {layout / folder}")
    assert "WARNING" not in r.out and r.err == ""

    r = run_cli([*base, "--no-masks", "--out", layout / "n.json"])
    d = json.loads((layout / "n.json").read_text(encoding="utf-8"))
    assert d["inputs"]["masks"] == "none (--no-masks)" and d["cases"][1]["voxels"] == 5
    assert r.out.startswith("WARNING:") and r.err == ""  # asked for: stdout and JSON say it

    (layout / folder / "H.nii.gz").unlink()
    r = run_cli([*base, "--out", layout / "o.json"])
    d = json.loads((layout / "o.json").read_text(encoding="utf-8"))
    assert d["inputs"]["masks"] == "none" and d["warnings"]


def test_seg_files_and_masks_folder(layout, tmp_nifti, run_cli):
    # A's own segmentation: first voxel only -> TP 1, FN 2 -> Dice 0.5 (B still thresholded)
    tmp_nifti(_vol([1, 0, 0, 0, 0], np.uint8), AFFINE, name="pred/A_seg.nii.gz")
    for name in ("A", "B", "H"):  # masks drop B's last two voxels (0.2, 0.1; both normal)
        tmp_nifti(_vol([1, 1, 1, 0, 0] if name == "B" else [1] * 5, np.uint8), AFFINE,
                  name=f"masks/{name}.nii.gz")
    out = layout / "m.json"
    r = run_cli(["evaluate", "--pred", layout / "pred", "--truth", layout / "truth", "--masks",
                 layout / "masks", "--thresholds", layout / "thresholds.json", "--out", out])
    assert r.rc == 0, r.err
    d = json.loads(out.read_text(encoding="utf-8"))
    assert d["threshold_source"] == "segmentation+voxel_threshold"
    assert [c["dice"] for c in d["cases"][:2]] == pytest.approx([0.5, 0.0])
    assert d["cases"][1]["voxels"] == 3
    assert d["masks"] == "voxels inside the brain masks"
    assert any("_seg file" in n for n in d["notes"])


def test_datalist_truth_groups_and_masks(layout, tmp_nifti, run_cli):
    for name in ("A", "B", "H"):
        tmp_nifti(_vol([1, 1, 1, 1, 0], np.uint8), AFFINE, name=f"brain/{name}.nii.gz")
    kinds = {"A": "tumor", "B": "ms", "H": "healthy"}
    datalist = {
        "training": [{"image": "./img/X.nii.gz"}],
        "test": [{"image": f"./img/{n}.nii.gz", "label": f"./truth/{n}.nii.gz",
                  "mask": f"./brain/{n}.nii.gz", "kind": k} for n, k in kinds.items()],
    }
    for n in [*kinds, "X"]:
        tmp_nifti(_vol([0] * 5), AFFINE, name=f"img/{n}.nii.gz")
    (layout / "dataset.json").write_text(json.dumps(datalist))
    out = layout / "m.json"
    r = run_cli(["evaluate", "--pred", layout / "pred", "--truth", layout / "dataset.json",
                 "--out", out])
    assert r.rc == 0, r.err
    d = json.loads(out.read_text(encoding="utf-8"))
    assert set(d["groups"]) == {"tumor", "ms", "healthy"}
    assert d["inputs"]["split"] == "test"
    # tumor = scan A without its last voxel: lesions {0.9, 0.8, 0.6} vs normal {0.7} -> 2/3
    assert d["groups"]["tumor"]["voxel_auroc"] == pytest.approx(2 / 3)
    assert d["groups"]["healthy"]["voxel_auroc"] is None
    assert d["threshold_source"] == "none" and d["overall"]["dice_dataset_wise"] is None
    assert d["masks"] == "voxels inside the brain masks"


def test_geometry_mismatch_names_both_files(layout, tmp_nifti, run_cli):
    shifted = AFFINE.copy()
    shifted[0, 3] = 10.0
    bad = tmp_nifti(_vol(B_SCORES), shifted, name="pred/B_anomaly.nii.gz")
    out = layout / "m.json"
    r = run_cli(["evaluate", "--pred", layout / "pred", "--truth", layout / "truth", "--out", out])
    assert r.rc == 1
    assert r.err.startswith("medidiff: error:") and r.err.count("\n") == 1
    assert str(bad) in r.err and str(layout / "truth" / "B.nii.gz") in r.err
    assert not out.exists()
    tmp_nifti(np.zeros((5, 2, 1), np.float32), AFFINE, name="pred/B_anomaly.nii.gz")
    r = run_cli(["evaluate", "--pred", layout / "pred", "--truth", layout / "truth"])
    assert r.rc == 1 and "B_anomaly.nii.gz" in r.err and "B.nii.gz" in r.err


def test_missing_prediction_is_reported_and_exits_4(layout, run_cli):
    (layout / "pred" / "B_anomaly.nii.gz").unlink()
    out = layout / "m.json"
    r = run_cli(["evaluate", "--pred", layout / "pred", "--truth", layout / "truth",
                 "--thresholds", layout / "thresholds.json", "--out", out, "--no-masks"])
    assert r.rc == evaluate_command.EXIT_MISSING == 4
    d = json.loads(out.read_text(encoding="utf-8"))
    assert d["missing_predictions"] == ["B"]
    assert [c["name"] for c in d["cases"]] == ["A", "H"]
    assert d["overall"]["dice_dataset_wise"] == pytest.approx(0.75)  # A alone
    assert "no prediction" in r.out
    assert r.err.count("\n") == 1 and "1 ground-truth cases had no prediction" in r.err and "B" in r.err


def test_no_prediction_at_all_is_an_error(layout, tmp_path, run_cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli(["evaluate", "--pred", empty, "--truth", layout / "truth"])
    assert r.rc == 1 and "A_anomaly.nii.gz" in r.err and r.err.count("\n") == 1
    r = run_cli(["evaluate", "--pred", tmp_path / "nope", "--truth", layout / "truth"])
    assert r.rc == 1 and "--pred" in r.err


def test_bad_thresholds_and_scores(layout, run_cli):
    bad = layout / "bad.json"
    bad.write_text(json.dumps({"scan_threshold": 1.0}))
    r = run_cli(["evaluate", "--pred", layout / "pred", "--truth", layout / "truth",
                 "--thresholds", bad])
    assert r.rc == 1 and "voxel_threshold" in r.err and str(bad) in r.err
    bad.write_text(json.dumps({"voxel_threshold": "high"}))
    r = run_cli(["evaluate", "--pred", layout / "pred", "--truth", layout / "truth",
                 "--thresholds", bad])
    assert r.rc == 1 and "finite number" in r.err
    (layout / "pred" / "scores.csv").write_text("file,score\nA.nii.gz,abc\n")
    r = run_cli(["evaluate", "--pred", layout / "pred", "--truth", layout / "truth"])
    assert r.rc == 1 and "scores.csv:2" in r.err


def test_sample_data_native_grids(tmp_path, run_cli):
    """Real files, including non-RAS ones (tumor-001 is PIR, ms-001 LPS): maps on their grids."""
    import nibabel as nib

    root = Path(__file__).resolve().parents[1] / "sample_data"
    pred = tmp_path / "pred"
    pred.mkdir()
    rng = np.random.default_rng(0)
    for name in ("tumor-001", "ms-001", "healthy-000"):
        label = nib.load(root / "test" / "labels" / f"{name}.nii.gz")
        truth = np.asarray(label.dataobj) > 0
        amap = (truth * 0.6 + rng.random(truth.shape) * 0.5).astype(np.float32)
        nib.save(nib.Nifti1Image(amap, label.affine, label.header), pred / f"{name}_anomaly.nii.gz")
    out = tmp_path / "m.json"
    r = run_cli(["evaluate", "--pred", pred, "--truth", root / "dataset.json", "--out", out])
    assert r.rc == 4, r.err
    d = json.loads(out.read_text(encoding="utf-8"))
    assert len(d["missing_predictions"]) == 13
    assert {c["name"] for c in d["cases"]} == {"tumor-001", "ms-001", "healthy-000"}
    # lesion voxels score in [0.6, 1.1), others in [0, 0.5): perfect ranking
    assert d["overall"]["voxel_auroc"] == pytest.approx(1.0)
    assert d["overall"]["oracle_dice_dataset_wise"] == pytest.approx(1.0)
    assert d["masks"] == "voxels inside the brain masks"
    assert set(d["groups"]) == {"tumor", "ms", "healthy"}
    assert d["overall"]["n_lesion_voxels"] > 0 and d["overall"]["n_healthy_scans"] == 1
