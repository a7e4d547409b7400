"""`medidiff calibrate` and `medidiff anomaly` end to end with the tiny checkpoints."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
PIR = SAMPLE / "test" / "images" / "tumor-001.nii.gz"  # stored PIR
RAS = SAMPLE / "test" / "images" / "tumor-000.nii.gz"
FAST = ["--method", "ddim", "--t-start", "6", "--steps", "2"]

pytestmark = pytest.mark.skipif(
    not (SAMPLE / "dataset.json").exists(), reason="sample_data not built"
)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_missing_default_model_is_one_clear_line(run_cli, tmp_path, monkeypatch):
    """Without --checkpoint the shipped model is used; an installation without it says so."""
    import medidiff.models.pretrained as pretrained

    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", tmp_path / "no_weights")
    res = run_cli(["anomaly", "--input", RAS, "--out", tmp_path / "o"])
    assert res.rc == 1 and "brain_mri_2d" in res.err and "missing" in res.err
    assert res.err.count("\n") == 1
    res = run_cli(["calibrate", "--healthy", RAS, "--out", tmp_path / "t.json"])
    assert res.rc == 1 and "brain_mri_2d" in res.err and "--checkpoint" in res.err
    assert not (tmp_path / "o").exists() and not (tmp_path / "t.json").exists()


def test_outputs_on_the_input_grid_and_resume(run_cli, tiny_checkpoint_2d, tmp_path):
    out = tmp_path / "out"
    args = ["anomaly", "--checkpoint", tiny_checkpoint_2d, "--input", PIR, RAS, "--out", out, *FAST]
    res = run_cli(args)
    assert res.rc == 0, res.err
    assert res.out.strip().splitlines()[-1].startswith("wrote anomaly maps of 2 scan(s) to")
    assert str(out) in res.out.strip().splitlines()[-1]
    for src in (PIR, RAS):
        name = src.name[: -len(".nii.gz")]
        ref = nib.load(src)
        for suffix, dtype in (("anomaly", np.float32), ("recon", np.float32)):
            img = nib.load(out / f"{name}_{suffix}.nii.gz")
            assert img.shape == ref.shape, (name, suffix)
            np.testing.assert_allclose(img.affine, ref.affine, atol=1e-4)
            assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(ref.affine)
            assert img.get_data_dtype() == dtype
        assert not (out / f"{name}_seg.nii.gz").exists()  # no thresholds, no segmentation
        assert (out / f"{name}_overlay.png").read_bytes()[:4] == b"\x89PNG"
    assert nib.aff2axcodes(nib.load(out / "tumor-001_anomaly.nii.gz").affine) == ("P", "I", "R")
    rows = _rows(out / "scores.csv")
    assert [r["name"] for r in rows] == ["tumor-001", "tumor-000"]
    assert rows[0]["file"] == str(PIR) and float(rows[0]["score"]) > 0
    # without thresholds: "not calibrated", no threshold or volume columns filled
    assert rows[0]["flagged"] == "not calibrated" and rows[0]["input_check"] == "ok"
    assert rows[0]["scan_threshold"] == rows[0]["anomalous_ml"] == rows[0]["voxel_threshold"] == ""
    assert int(rows[0]["network_evaluations"]) % 2 == 0 and rows[0]["nfe_per_input"] == "2"
    # scores.json describes every column (BIDS-style sidecar)
    columns = json.loads((out / "scores.json").read_text(encoding="utf-8"))
    assert list(columns) == list(rows[0])
    assert all(c["Description"] for c in columns.values())
    assert "per network input" in columns["nfe_per_input"]["Description"]
    assert "nfe_per_input" in columns["network_evaluations"]["Description"]
    assert columns["anomalous_ml"]["Units"] == "ml" and "not calibrated" in columns["flagged"]["Levels"]
    record = json.loads((out / "anomaly_config.json").read_text(encoding="utf-8"))
    from medidiff.models.checkpoint import file_sha256

    assert record["checkpoint"]["sha256"] == file_sha256(tiny_checkpoint_2d)
    assert record["method"]["steps"] == 2 and record["seed"] == 0 and record["medidiff_version"]

    # a second run resumes: nothing is recomputed
    before = (out / "tumor-000_anomaly.nii.gz").stat().st_mtime_ns
    res = run_cli(args)
    assert res.rc == 0 and "resumed: 2 scan(s)" in res.out
    assert (out / "tumor-000_anomaly.nii.gz").stat().st_mtime_ns == before
    assert len(_rows(out / "scores.csv")) == 2
    # other options into the same folder: refused unless --overwrite
    res = run_cli([*args, "--seed", "3"])
    assert res.rc == 1 and "another run" in res.err and "seed" in res.err
    res = run_cli([*args[:-2], "--steps", "3", "--input", RAS, "--overwrite", "--no-overlay"])
    assert res.rc == 0 and _rows(out / "scores.csv")[0]["nfe_per_input"] == "3"


def test_a_corrupt_file_is_reported_and_skipped(run_cli, tiny_checkpoint_2d, tmp_path):
    bad = tmp_path / "inputs" / "broken.nii.gz"
    bad.parent.mkdir()
    raw = gzip.decompress(RAS.read_bytes())
    bad.write_bytes(gzip.compress(raw[: len(raw) // 3]))  # truncated voxel data
    good = tmp_path / "inputs" / "good.nii.gz"
    good.write_bytes(RAS.read_bytes())
    out = tmp_path / "out"
    res = run_cli(
        [
            "anomaly",
            "--checkpoint",
            tiny_checkpoint_2d,
            "--input",
            tmp_path / "inputs",
            "--out",
            out,
            "--no-overlay",
            *FAST,
        ]
    )
    assert res.rc == 4
    error_lines = [line for line in res.err.splitlines() if line.startswith("medidiff: error:")]
    assert len(error_lines) == 1 and str(bad) in error_lines[0]
    assert "1 of 2 input(s) failed" in res.err
    assert (out / "good_anomaly.nii.gz").exists() and (out / "good_recon.nii.gz").exists()
    assert not list(out.glob("broken_*"))
    assert [r["name"] for r in _rows(out / "scores.csv")] == ["good"]


def test_calibrate_then_segment_and_refusals(
    run_cli, tiny_checkpoint_2d, tiny_checkpoint_3d, tmp_path
):
    thresholds = tmp_path / "thresholds.json"
    calib = [
        "calibrate",
        "--checkpoint",
        tiny_checkpoint_2d,
        "--healthy",
        SAMPLE / "dataset.json",
        "--split",
        "validation",
        "--out",
        thresholds,
        "--fpr",
        "0.1",
        *FAST,
        "--erode",
        "1",
    ]
    res = run_cli(calib)
    assert res.rc == 0, res.err
    assert res.out.strip().splitlines()[-1] == f"wrote thresholds to {thresholds}"
    data = json.loads(thresholds.read_text(encoding="utf-8"))
    assert data["num_scans"] == 6 and data["fpr"] == 0.1 and data["num_voxels"] > 1000
    assert data["method"]["steps"] == 2 and data["postprocess"]["erode"] == 1
    assert len(data["checkpoint"]["sha256"]) == 64 and data["medidiff_version"]
    # 6 healthy scans at 10 %: ceil(0.9 * 6) = 6th smallest, i.e. the largest healthy score
    assert data["scan_threshold"] == max(data["scan_scores"].values())
    assert "largest healthy score" in data["scan_threshold_rule"]

    res = run_cli(calib)
    assert res.rc == 1 and "already exists" in res.err  # no silent overwrite

    out = tmp_path / "out"
    anomaly = [
        "anomaly",
        "--checkpoint",
        tiny_checkpoint_2d,
        "--input",
        RAS,
        "--out",
        out,
        "--thresholds",
        thresholds,
        *FAST,
        "--erode",
        "1",
        "--no-overlay",
    ]
    res = run_cli(anomaly)
    assert res.rc == 0, res.err
    seg = nib.load(out / "tumor-000_seg.nii.gz")
    assert seg.get_data_dtype() == np.uint8 and seg.shape == nib.load(RAS).shape
    row = _rows(out / "scores.csv")[0]
    assert row["flagged"] == ("yes" if float(row["score"]) > data["scan_threshold"] else "no")
    voxels = int(np.asarray(seg.dataobj).sum())
    assert int(row["voxels_over_threshold"]) == voxels
    # the thresholds used, and the volume in ml (2 mm voxels: 8 mm^3 each)
    assert float(row["scan_threshold"]) == data["scan_threshold"]
    assert float(row["voxel_threshold"]) == data["voxel_threshold"]
    assert float(row["anomalous_ml"]) == pytest.approx(voxels * 8 / 1000, abs=1e-3)

    # another method config, another checkpoint: refused with one clear line
    res = run_cli([*anomaly[:-1], "--steps", "3", "--out", tmp_path / "o2"])
    assert res.rc == 1 and "another method config" in res.err and "steps" in res.err
    assert res.err.count("\n") == 1
    res = run_cli(
        [
            "anomaly",
            "--checkpoint",
            tiny_checkpoint_3d,
            "--input",
            RAS,
            "--out",
            tmp_path / "o3",
            "--thresholds",
            thresholds,
            *FAST,
            "--erode",
            "1",
        ]
    )
    assert res.rc == 1 and "calibrated for checkpoint" in res.err
    assert not (tmp_path / "o2").exists() or not list((tmp_path / "o2").glob("*.nii.gz"))


def test_calibrate_in_workers_skips_a_corrupt_file(run_cli, tiny_checkpoint_2d, tmp_path):
    """--workers: a file that fails in a worker process is one error line and is left out;
    the thresholds of the others are those of a single process on the good files alone."""
    folder = tmp_path / "healthy"
    folder.mkdir()
    good = sorted((SAMPLE / "val" / "images").glob("*.nii.gz"))[:2]
    for path in good:
        (folder / path.name).write_bytes(path.read_bytes())
    raw = gzip.decompress(good[0].read_bytes())
    bad = folder / "broken.nii.gz"
    bad.write_bytes(gzip.compress(raw[: len(raw) // 3]))
    base = ["calibrate", "--checkpoint", tiny_checkpoint_2d, *FAST, "--erode", "1", "--allow-few"]
    res = run_cli([*base, "--healthy", folder, "--out", tmp_path / "two.json", "--workers", "2"])
    assert res.rc == 4, res.err
    error_lines = [line for line in res.err.splitlines() if line.startswith("medidiff: error:")]
    assert len(error_lines) == 1 and str(bad) in error_lines[0]
    assert "1 of 3 input(s) failed and were left out" in res.err
    res = run_cli([*base, "--healthy", *good, "--out", tmp_path / "one.json"])
    assert res.rc == 0, res.err
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two["num_scans"] == 2 and list(two["scan_scores"]) == [p.name[:-7] for p in good]
    for key in ("voxel_threshold", "scan_threshold", "num_voxels", "scan_scores"):
        assert two[key] == one[key], key


def test_3d_checkpoint_and_masks_folder(run_cli, tiny_checkpoint_3d, tmp_path):
    out = tmp_path / "out"
    res = run_cli(
        [
            "anomaly",
            "--checkpoint",
            tiny_checkpoint_3d,
            "--input",
            PIR,
            "--out",
            out,
            "--masks",
            SAMPLE / "test" / "brainmasks",
            "--method",
            "x0",
            "--t-start",
            "6",
            "--erode",
            "1",
            "--no-overlay",
        ]
    )
    assert res.rc == 0, res.err
    amap = nib.load(out / "tumor-001_anomaly.nii.gz")
    assert amap.shape == nib.load(PIR).shape
    brain = np.asarray(nib.load(SAMPLE / "test" / "brainmasks" / "tumor-001.nii.gz").dataobj) > 0
    assert (np.asarray(amap.dataobj)[~brain] == 0).all()  # nothing outside the given brain mask
    assert _rows(out / "scores.csv")[0]["network_evaluations"] == "1"  # one volume, one shot
    res = run_cli(
        [
            "anomaly",
            "--checkpoint",
            tiny_checkpoint_3d,
            "--input",
            PIR,
            "--out",
            tmp_path / "o2",
            "--masks",
            tmp_path,
            "--method",
            "x0",
        ]
    )
    assert res.rc == 1 and "no mask for tumor-001" in res.err


CT = SAMPLE / "ct" / "images" / "ct-000.nii.gz"


def test_ct_given_to_an_mri_model_warns_or_is_refused(run_cli, tiny_checkpoint_2d, tmp_path,
                                                     recwarn):
    """The issue's case: a CT volume scored by an MRI model gets one warning line naming the
    scan and what is out of profile (recorded in scores.csv), no Python warning text;
    --strict refuses it and writes nothing."""
    out = tmp_path / "out"
    base = ["anomaly", "--checkpoint", tiny_checkpoint_2d, *FAST, "--no-overlay"]
    res = run_cli([*base, "--input", CT, RAS, "--out", out])
    assert res.rc == 0, res.err
    warnings = [line for line in res.err.splitlines() if line.startswith("medidiff: warning:")]
    assert len(warnings) == 1 and str(CT) in warnings[0]
    assert "does not look like the model's training scans" in warnings[0]
    assert "CT in Hounsfield units" in warnings[0] and "--strict" in warnings[0]
    assert "Warning:" not in res.err and ".py:" not in res.err  # no raw Python warning
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    rows = {r["name"]: r for r in _rows(out / "scores.csv")}
    assert rows["ct-000"]["input_check"].startswith("out of profile: ")
    assert "edges cropped" not in rows["tumor-000"]["input_check"]
    assert rows["tumor-000"]["input_check"] == "ok"

    strict = tmp_path / "strict"
    res = run_cli([*base, "--input", CT, "--out", strict, "--strict"])
    assert res.rc == 4
    errors = [line for line in res.err.splitlines() if line.startswith("medidiff: error:")]
    assert len(errors) == 1 and errors[0].count(str(CT)) == 1 and "refused" in errors[0]
    assert "(--strict)" in errors[0]
    assert not strict.exists()  # nothing scored, nothing written


def test_the_default_model_refuses_ct_under_strict(run_cli, tmp_path):
    """`medidiff anomaly --input ct-000.nii.gz` with the shipped 2D model: refused under
    --strict before any denoising (without --strict it warns: see
    test_profile.test_ct_is_out_of_the_mri_profile_and_sample_mri_is_not)."""
    res = run_cli(["anomaly", "--input", CT, "--out", tmp_path / "o", "--strict"])
    assert res.rc == 4 and "CT in Hounsfield units" in res.err and "(--strict)" in res.err
    assert "note:" not in res.err  # the shipped model has a profile
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_without_profile_says_so_once(run_cli, tiny_checkpoint_2d, tmp_path):
    from medidiff.models.checkpoint import load_inference, replace_extra

    old = tmp_path / "old.safetensors"
    old.write_bytes(tiny_checkpoint_2d.read_bytes())
    extra = load_inference(old).extra
    replace_extra(old, {k: v for k, v in extra.items() if k != "input_profile"})
    out = tmp_path / "out"
    res = run_cli(["anomaly", "--checkpoint", old, "--input", RAS, PIR, "--out", out, *FAST,
                   "--no-overlay"])
    assert res.rc == 0, res.err
    notes = [line for line in res.err.splitlines() if line.startswith("medidiff: note:")]
    assert len(notes) == 1 and "records no profile of its training scans" in notes[0]
    assert {r["input_check"] for r in _rows(out / "scores.csv")} == {"unchecked"}


@pytest.mark.slow
def test_calibrate_strict_leaves_out_scans_out_of_profile(run_cli, tiny_checkpoint_2d, tmp_path):
    healthy = sorted((SAMPLE / "val" / "images").glob("*.nii.gz"))
    out = tmp_path / "t.json"
    res = run_cli(["calibrate", "--checkpoint", tiny_checkpoint_2d, *FAST, "--erode", "1",
                   "--healthy", *healthy, CT, "--out", out, "--strict"])
    assert res.rc == 4, res.err
    assert "refused" in res.err and str(CT) in res.err and "1 of 7 input(s) failed" in res.err
    assert json.loads(out.read_text(encoding="utf-8"))["num_scans"] == len(healthy)


@pytest.mark.slow
def test_torchrun_shards_inputs(tiny_checkpoint_2d, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    inputs = [
        str(SAMPLE / "test" / "images" / f"{n}.nii.gz")
        for n in ("tumor-000", "tumor-001", "ms-000")
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "medidiff",
        "anomaly",
        "--checkpoint",
        str(tiny_checkpoint_2d),
        "--input",
        *inputs,
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-overlay",
        *FAST,
    ]
    proc = subprocess.run(
        cmd, check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["name"] for r in _rows(out / "scores.csv")] == ["tumor-000", "tumor-001", "ms-000"]
    assert proc.stdout.count("wrote anomaly maps of 3 scan(s)") == 1  # rank 0 only
    single = tmp_path / "single"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "medidiff",
            "anomaly",
            "--checkpoint",
            str(tiny_checkpoint_2d),
            "--input",
            inputs[1],
            "--out",
            str(single),
            "--device",
            "cpu",
            "--no-overlay",
            *FAST,
        ],
        check=True,
        capture_output=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    # the same seed gives the same map on whichever rank scores the scan
    a = np.asarray(nib.load(out / "tumor-001_anomaly.nii.gz").dataobj)
    b = np.asarray(nib.load(single / "tumor-001_anomaly.nii.gz").dataobj)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_model_carries_its_tuned_filter_sizes(run_cli, tiny_checkpoint_2d, tmp_path):
    """Filter sizes tuned for a model (checkpoint extra 'anomaly_postprocess') are its
    defaults in the CLI and the library; options given on the command line still win."""
    import shutil

    from medidiff.anomaly.detector import AnomalyDetector
    from medidiff.anomaly.postprocess import tuned_postprocess
    from medidiff.errors import ConfigError
    from medidiff.models.checkpoint import load_inference, replace_extra

    ckpt = tmp_path / "tuned.safetensors"
    shutil.copy(tiny_checkpoint_2d, ckpt)
    replace_extra(ckpt, {**load_inference(ckpt).extra, "anomaly_postprocess": {"median_size": 3, "erode": 1}})
    det = AnomalyDetector(ckpt)
    assert (det.postprocess.median_size, det.postprocess.erode) == (3, 1)
    assert AnomalyDetector(tiny_checkpoint_2d).postprocess.median_size == 9

    base = ["anomaly", "--checkpoint", ckpt, "--input", RAS, *FAST, "--no-overlay"]
    res = run_cli([*base, "--out", tmp_path / "a"])
    assert res.rc == 0, res.err
    post = json.loads((tmp_path / "a" / "anomaly_config.json").read_text(encoding="utf-8"))["postprocess"]
    assert (post["median_size"], post["erode"]) == (3, 1)
    res = run_cli([*base, "--out", tmp_path / "b", "--median-size", "5"])
    assert res.rc == 0, res.err
    post = json.loads((tmp_path / "b" / "anomaly_config.json").read_text(encoding="utf-8"))["postprocess"]
    assert (post["median_size"], post["erode"]) == (5, 1)

    for bad in ({"median_size": -1}, {"residual": "l2"}, [3]):
        with pytest.raises(ConfigError):
            tuned_postprocess({"anomaly_postprocess": bad})
    assert tuned_postprocess({}) == {}
