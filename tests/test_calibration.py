"""Calibration targets: voxel FPR, false-positive volume, components, held-out estimates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medidiff.anomaly.calibration import (
    HealthyMap,
    fp_volume_threshold,
    held_out_rates,
    scan_fpr_interval,
    segmented_volume,
    voxel_fpr_threshold,
)
from medidiff.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
FAST = ["--method", "x0", "--t-start", "6", "--device", "cpu"]


def _map(name: str, blobs: list[tuple[slice, ...]], value: float = 1.0, noise: float = 0.0) -> HealthyMap:
    rng = np.random.default_rng(len(name))
    values = rng.random((12, 12, 12)).astype(np.float32) * noise
    for blob in blobs:
        values[blob] = value
    return HealthyMap(name, values, np.ones(values.shape, bool))


def test_fp_volume_threshold_holds_the_budget_and_is_the_lowest_such():
    # a: one 8-voxel blob at 1.0; b: one 1-voxel blob at 0.5; background noise < 0.1
    a = _map("a", [(slice(0, 2), slice(0, 2), slice(0, 2))], 1.0, noise=0.1)
    b = _map("bb", [(slice(5, 6), slice(5, 6), slice(5, 6))], 0.5, noise=0.1)
    voxel_ml = 0.001  # 1 mm voxels
    # budget 0.0045 ml per scan = 9 voxels over both: the two blobs fit, noise does not
    thr = fp_volume_threshold([a, b], 0.0045, voxel_ml)
    assert 0.0 < thr < 0.5
    total = segmented_volume(a, thr, 0) + segmented_volume(b, thr, 0)
    assert total <= 9
    below = np.max([v for m in (a, b) for v in m.inside if v < thr] or [0])  # next lower candidate
    assert segmented_volume(a, below, 0) + segmented_volume(b, below, 0) > 9
    # budget 0 flags nothing; a component rule of 2 voxels drops b's single voxel, so the
    # 8-voxel blob alone fits a 4-voxel-per-scan budget... only above the blob's value
    assert segmented_volume(a, fp_volume_threshold([a, b], 0.0, voxel_ml), 0) == 0
    thr_c = fp_volume_threshold([a, b], 0.004, voxel_ml, min_component=2)
    assert segmented_volume(a, thr_c, 2) + segmented_volume(b, thr_c, 2) <= 8
    with pytest.raises(ConfigError, match=">= 0 ml"):
        fp_volume_threshold([a], -1.0, voxel_ml)


def test_voxel_fpr_threshold_pools_the_maps():
    a = HealthyMap("a", np.arange(1, 51, dtype=np.float32).reshape(5, 10, 1), np.ones((5, 10, 1), bool))
    b = HealthyMap("b", np.arange(51, 101, dtype=np.float32).reshape(5, 10, 1), np.ones((5, 10, 1), bool))
    assert voxel_fpr_threshold([a, b], 0.05) == 95.0


def test_held_out_rates_see_what_in_sample_hides():
    # four quiet scans and one with a large blob: in sample the 5 % quantile absorbs it,
    # left out it is flagged far above 5 %
    quiet = [_map(f"q{i}", [], noise=1.0) for i in range(4)]
    loud = _map("loud", [(slice(0, 6), slice(0, 12), slice(0, 12))], 5.0, noise=1.0)
    maps = [*quiet, loud]
    rates = held_out_rates(maps, lambda ms: voxel_fpr_threshold(ms, 0.05), 0.001)
    assert rates["scans"] == 5
    assert rates["voxel_fpr_max"] >= 0.5  # the loud scan, calibrated without it
    assert rates["voxel_fpr_mean"] > 0.05
    assert held_out_rates(maps[:1], lambda ms: 0.0, 0.001) == {}


def test_scan_fpr_interval_is_the_order_statistic():
    six = scan_fpr_interval(6, 0.05)
    assert six["expected"] == pytest.approx(1 / 7)  # threshold = the largest of 6
    assert six["low"] < six["expected"] < six["high"]
    big = scan_fpr_interval(200, 0.05)  # k = 190: (200 + 1 - 190) / 201
    assert big["expected"] == pytest.approx(11 / 201)
    assert big["high"] - big["low"] < six["high"] - six["low"]


def test_cli_refuses_few_scans_and_calibrates_a_volume_target(run_cli, tiny_checkpoint_2d, tmp_path):
    healthy = sorted((SAMPLE / "val" / "images").glob("*.nii.gz"))[:2]
    out = tmp_path / "t.json"
    base = ["calibrate", "--checkpoint", tiny_checkpoint_2d, "--healthy", *healthy, "--out", out, *FAST]
    res = run_cli(base)
    assert res.rc == 1 and "at least 5" in res.err and "--allow-few" in res.err
    assert res.err.count("\n") == 1 and not out.exists()
    res = run_cli([*base, "--target", "voxel-fpr", "--max-fp-ml", "2"])
    assert res.rc == 1 and "--max-fp-ml applies to --target fp-volume" in res.err
    res = run_cli([*base, "--allow-few", "--target", "fp-volume", "--max-fp-ml", "1.5",
                   "--min-component-ml", "0.3"])
    assert res.rc == 0, res.err
    assert "expected on a new healthy scan" in res.out and "scan-level FPR expected" in res.out
    record = json.loads(out.read_text())
    assert record["target"] == "fp-volume" and record["max_fp_ml"] == 1.5
    assert record["voxel_ml"] == pytest.approx(0.216)  # the tiny model's 6 mm grid
    assert record["min_component"] == 2  # ceil(0.3 / 0.216)
    held = record["expected_on_new_healthy_scans"]["held_out"]
    assert held["scans"] == 2 and held["fp_ml_mean"] >= 0
    from medidiff.anomaly.thresholds import Thresholds

    assert Thresholds.load(out).min_component == 2


def test_cli_default_target_is_the_volume_target_and_fpr_alone_the_classic(
    run_cli, tiny_checkpoint_2d, tmp_path
):
    from medidiff.constants import CALIBRATION_DEFAULTS

    healthy = sorted((SAMPLE / "val" / "images").glob("*.nii.gz"))[:2]
    base = ["calibrate", "--checkpoint", tiny_checkpoint_2d, "--healthy", *healthy, *FAST,
            "--allow-few"]
    assert run_cli([*base, "--out", tmp_path / "a.json"]).rc == 0
    default = json.loads((tmp_path / "a.json").read_text())
    assert default["target"] == CALIBRATION_DEFAULTS["target"]
    assert default["max_fp_ml"] == CALIBRATION_DEFAULTS["max_fp_ml"]
    assert run_cli([*base, "--out", tmp_path / "b.json", "--fpr", "0.1"]).rc == 0
    classic = json.loads((tmp_path / "b.json").read_text())
    assert classic["target"] == "voxel-fpr" and classic["fpr"] == 0.1
    assert classic["min_component"] == 0 and classic["max_fp_ml"] is None


def test_thresholds_follow_the_weights_not_the_file_bytes(tiny_checkpoint_2d, tmp_path):
    """Rewriting a checkpoint's metadata (as adding an input profile did to the shipped
    models) keeps its thresholds valid; other weights are still refused."""
    import shutil
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file

    from medidiff.anomaly.thresholds import Thresholds
    from medidiff.errors import CheckpointError
    from medidiff.models.checkpoint import load_inference, replace_extra, tensors_sha256

    original = load_inference(tiny_checkpoint_2d)
    assert original.tensors_sha256 == tensors_sha256(tiny_checkpoint_2d)
    thr = Thresholds(
        voxel_threshold=0.1, scan_threshold=0.2, fpr=0.05, num_scans=6, num_voxels=100,
        checkpoint_sha256=original.sha256, checkpoint_tensors_sha256=original.tensors_sha256,
        checkpoint_path=str(tiny_checkpoint_2d), method={}, postprocess={},
    )
    thr.save(tmp_path / "thr.json")
    thr = Thresholds.load(tmp_path / "thr.json")
    assert thr.checkpoint_tensors_sha256 == original.tensors_sha256

    def detector(path):
        return SimpleNamespace(
            checkpoint=load_inference(path),
            method=SimpleNamespace(to_dict=dict),
            postprocess=SimpleNamespace(to_dict=dict),
        )

    relabelled = tmp_path / "relabelled.safetensors"
    shutil.copy(tiny_checkpoint_2d, relabelled)
    replace_extra(relabelled, {**original.extra, "note": "metadata only"})
    assert load_inference(relabelled).sha256 != original.sha256
    thr.check(detector(relabelled))  # same tensors: accepted

    # the same file with one weight changed: refused
    tensors = load_file(str(tiny_checkpoint_2d))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    from safetensors import safe_open

    with safe_open(str(tiny_checkpoint_2d), "pt") as f:
        metadata = f.metadata()
    changed = tmp_path / "changed.safetensors"
    save_file(tensors, str(changed), metadata=metadata)
    with pytest.raises(CheckpointError, match="calibrated for checkpoint"):
        thr.check(detector(changed))

    # a thresholds file from before tensors were recorded still needs the same file
    old = Thresholds.load(tmp_path / "thr.json")
    object.__setattr__(old, "checkpoint_tensors_sha256", "")
    with pytest.raises(CheckpointError):
        old.check(detector(relabelled))
