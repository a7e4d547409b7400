"""The demo end to end (tiny models), its HTML writer, and the no-network intensity baseline."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


# ---- the intensity baseline on hand-made cases ----------------------------------------------


def _write(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def test_baseline_map_is_the_absolute_residual_to_its_level(tiny_checkpoint_2d):
    """No filter, no erosion: the map is |x - level| inside the mask, 0 outside; the score is
    the mean of the top 1 %; no network runs."""
    from medidiff.anomaly.baseline import IntensityBaseline
    from medidiff.anomaly.postprocess import PostprocessConfig

    base = IntensityBaseline(tiny_checkpoint_2d, 0.5, PostprocessConfig(erode=0, median_size=0))
    assert base.model is None and base.nfe_per_input == 0
    image = np.full((32, 40, 32), 0.5, np.float32)
    mask = np.zeros(image.shape, bool)
    mask[10:20, 10:20, 10:20] = True  # 1000 voxels
    image[10:12, 10:15, 10:20] = 0.9  # 100 lesion voxels: |0.9 - 0.5| = 0.4
    image[0:3, 0:3, 0:3] = 1.0  # outside the mask: must not count
    grid = base.score_grid(image, mask, "hand-made")
    expected = np.zeros(image.shape, np.float32)
    expected[10:12, 10:15, 10:20] = 0.4
    np.testing.assert_allclose(grid.anomaly_map, expected, atol=1e-6)
    np.testing.assert_array_equal(grid.reconstruction, np.full(image.shape, 0.5, np.float32))
    assert grid.network_evaluations == 0
    # top 1 % of 1000 voxels = the 10 largest, all 0.4
    assert grid.score == pytest.approx(0.4, abs=1e-6)


def test_baseline_level_is_the_median_normalised_brain_intensity(tiny_checkpoint_2d, tmp_path):
    """The level is the median of the brain voxels (the mask, not the whole foreground) after
    the checkpoint's percentile scaling, computed here by hand."""
    from medidiff.anomaly.detector import AnomalyDetector
    from medidiff.anomaly.runner import calibrate
    from medidiff.anomaly.baseline import BASELINE_NAME, IntensityBaseline
    from medidiff.data.datalist import DatalistEntry
    from medidiff.errors import ConfigError

    rng = np.random.default_rng(0)
    arr = np.zeros((30, 36, 28), np.float32)
    brain = np.zeros(arr.shape, bool)
    brain[5:25, 6:30, 4:24] = True
    arr[brain] = rng.permutation(np.linspace(100, 200, int(brain.sum())))
    skull = np.zeros(arr.shape, bool)
    skull[2:28, 3:33, 1:27] = True
    skull &= ~brain
    arr[skull] = 400.0  # foreground but not brain: sets the scaling, not the median
    # the tiny model's grid: 6 mm, RAS; the scan is on such a grid, so no interpolation
    affine = np.diag([6.0, 6.0, 6.0, 1.0])
    affine[:3, 3] = [-90, -100, -80]
    image = _write(tmp_path / "h.nii.gz", arr, affine)
    mask = _write(tmp_path / "h_mask.nii.gz", brain.astype(np.uint8), affine)
    entry = DatalistEntry(image, mask=mask)

    # by hand: the 1st/99th foreground percentiles map to 0/1; median brain value is 150
    lo, hi = np.percentile(arr[brain | skull], [1, 99])
    expected = (150.0 - lo) / (hi - lo)
    base = IntensityBaseline.from_healthy(tiny_checkpoint_2d, [entry, entry])
    assert base.level == pytest.approx(expected, rel=1e-5)
    assert 0.1 < base.level < 0.25  # not 0.5: the skull did not enter the median

    thresholds = calibrate(base, [entry], fpr=0.05, allow_few=True)
    assert thresholds.method["method"] == BASELINE_NAME
    assert thresholds.method["level"] == pytest.approx(base.level)
    thresholds.check(base)  # its own thresholds are accepted
    detector = AnomalyDetector(tiny_checkpoint_2d)
    with pytest.raises(ConfigError, match="method"):
        thresholds.check(detector)  # a diffusion method refuses the baseline's


# ---- the demo's pieces ------------------------------------------------------------------


def test_quality_bars_compare_default_with_baseline():
    from medidiff.cli.demo_metrics import quality_checks as _quality

    def row(d_auprc, b_auprc, d_auroc=0.5, b_auroc=0.5):
        return {"default": {"voxel_auprc": d_auprc, "voxel_auroc": d_auroc},
                "baseline": {"voxel_auprc": b_auprc, "voxel_auroc": b_auroc}}

    bars = {q.name: q for q in _quality({
        "tumor": row(0.4, 0.3), "ms": row(0.1, 0.2), "all": row(0.2, 0.2, 0.9, 0.8)})}
    assert [bars[k].passed for k in ("voxel_auroc", "auprc_tumor", "auprc_ms", "auprc_stroke")] \
        == [True, True, False, None]
    assert "no test scan of this kind" in bars["auprc_stroke"].detail
    assert "FAIL" in bars["auprc_ms"].detail and "0.100" in bars["auprc_ms"].detail
    # the AUROC bar is absolute (>= 0.90), whatever the baseline does
    low = {q.name: q for q in _quality({"all": row(0.2, 0.1, 0.85, 0.6)})}["voxel_auroc"]
    assert low.passed is False and "short by 0.050" in low.detail


def test_out_dir_rules(tmp_path):
    from medidiff.cli.demo import DEMO_MARKER, _prepare_out_dir
    from medidiff.errors import OutputError

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="not a medidiff demo output"):
            _prepare_out_dir(foreign, overwrite)
    assert (foreign / "notes.txt").read_text() == "mine"

    out = tmp_path / "demo"
    _prepare_out_dir(out, False)  # new folder
    (out / "anomaly").mkdir()
    (out / "report.html").write_text("old")
    (out / "keep.txt").write_text("user file")
    with pytest.raises(OutputError, match="--overwrite"):
        _prepare_out_dir(out, False)
    _prepare_out_dir(out, True)
    assert not (out / "anomaly").exists() and not (out / "report.html").exists()
    assert (out / "keep.txt").exists() and (out / DEMO_MARKER).exists()


def test_missing_sample_data_is_one_error_line(run_cli, tmp_path):
    r = run_cli(["demo", "--out", tmp_path / "o", "--sample-data", tmp_path / "nowhere",
                 "--checkpoint-2d", tmp_path / "x.safetensors", "--checkpoint-3d",
                 tmp_path / "y.safetensors"])
    assert r.rc != 0 and r.err.startswith("medidiff: error:") and r.err.count("\n") == 1
    assert "Traceback" not in r.err


# ---- end to end -------------------------------------------------------------------------


def _strict_json(path: Path):
    def refuse(token):
        raise ValueError(f"non-finite number {token} in {path}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, float):
        yield obj


def test_demo_end_to_end(run_cli, tiny_checkpoint_2d, tiny_checkpoint_3d, tmp_path):
    import csv

    from medidiff.anomaly.thresholds import Thresholds
    from medidiff.io.volume import load_volume

    out = tmp_path / "demo"
    r = run_cli(["demo", "--out", out, "--checkpoint-2d", tiny_checkpoint_2d,
                 "--checkpoint-3d", tiny_checkpoint_3d, "--limit", "5", "--num-synth", "2",
                 "--no-progress"])
    assert r.rc == 0, r.err
    assert r.out.strip().splitlines()[-1] == f"report: {out / 'report.html'}"
    assert "stage times:" in r.out and "calibrate" in r.out

    # the report references only images that exist, among them every overlay and montage
    page = (out / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources and all((out / s).is_file() for s in sources), sources
    for s in ("synthesis_2d/montage.png", "synthesis_3d/montage.png",
              "anomaly/tumor-001_overlay.png"):
        assert s in sources
    m = _strict_json(out / "metrics.json")
    _check_report_states_the_metrics(page, m)
    for key in ("method", "thresholds", "evaluation", "per_kind", "quality", "scans",
                "synthesis", "models", "timings", "versions", "machine", "commands"):
        assert key in m, key
    assert all(math.isfinite(x) for x in _numbers(m))
    assert m["method"]["method"] == "ddim" and m["method"]["t_start"] == 50
    # --limit 5 takes the kinds in turn
    assert [s["kind"] for s in m["data"]["test_scans"]] == \
        ["tumor", "ms", "stroke", "healthy", "tumor"]
    assert set(m["per_kind"]) == {"tumor", "ms", "stroke", "healthy", "all"}
    for kind in ("tumor", "ms", "stroke", "all"):
        for who in ("default", "baseline"):
            assert 0.0 <= m["per_kind"][kind][who]["voxel_auprc"] <= 1.0
            assert 0.0 <= m["per_kind"][kind][who]["voxel_auroc"] <= 1.0
    assert [q["name"] for q in m["quality"]] == \
        ["voxel_auroc", "auprc_tumor", "auprc_ms", "auprc_stroke"]
    assert all(isinstance(q["passed"], bool) for q in m["quality"])
    assert m["baseline"]["method"]["method"] == "intensity-baseline"
    assert {"load", "calibrate", "score", "baseline", "evaluate", "synthesis_2d",
            "synthesis_3d", "figures"} <= set(m["timings"])
    assert m["synthesis"]["2d"]["num"] == 2 and m["synthesis"]["3d"]["num"] == 2
    assert (m["synthesis"]["3d"]["sampler"], m["synthesis"]["3d"]["steps"]) == ("dpm++2m", 20)
    # a pixel-space 3D model: no 3D latent scoring, and the report says why
    assert m["anomaly_3d"]["ran"] is False and "pixel-space model" in m["anomaly_3d"]["reason"]
    assert "anomaly_3d" not in m["timings"] and not (out / "anomaly_3d").exists()
    assert "3D latent anomaly scoring" in page and "not run: the 3D model" in page
    assert "[6/10] 3D latent anomaly scoring: skipped" not in r.out  # --no-progress: quiet

    # thresholds as 'medidiff calibrate' writes them; scores.csv one row per scan
    thresholds = Thresholds.load(out / "thresholds.json")
    assert thresholds.num_scans == 6 and thresholds.fpr == 0.05
    with open(out / "anomaly" / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r_["name"] for r_ in rows] == [s["name"] for s in m["data"]["test_scans"]]
    for row in rows:  # flagged is the score against the calibrated scan threshold
        assert row["flagged"] == ("yes" if float(row["score"]) > thresholds.scan_threshold else "no")
        assert float(row["scan_threshold"]) == thresholds.scan_threshold
        assert row["input_check"] == "ok"  # sample_data's test scans are in the model's profile
    assert list(thresholds.scan_scores) == m["data"]["calibration_scans"]
    config = json.loads((out / "anomaly" / "anomaly_config.json").read_text())
    assert config["thresholds"]["voxel_threshold"] == thresholds.voxel_threshold
    _check_metrics_recomputed_from_the_written_maps(out, m, thresholds)

    # outputs on the input's own grid, also for a non-RAS input (tumor-001 is stored PIR)
    for name in ("tumor-000", "tumor-001"):
        source = load_volume(ROOT / "sample_data" / "test" / "images" / f"{name}.nii.gz")
        for suffix in ("anomaly", "recon", "seg"):
            written = load_volume(out / "anomaly" / f"{name}_{suffix}.nii.gz")
            assert written.shape == source.shape
            np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    assert load_volume(out / "synthesis_3d" / "synth_00001.nii.gz").shape == (16, 16, 16)


def _check_report_states_the_metrics(page: str, m: dict) -> None:
    """Every quality bar's verdict is the comparison of its numbers, and the page shows it."""
    import html

    for q in m["quality"]:
        value, reference = q["value"], q["reference"]
        if q["name"] == "voxel_auroc":
            assert q["passed"] == (value >= reference)
        else:
            kind = q["name"].removeprefix("auprc_")
            assert value == m["per_kind"][kind]["default"]["voxel_auprc"]
            assert reference == m["per_kind"][kind]["baseline"]["voxel_auprc"]
            assert q["passed"] == (value > reference)
        assert f"{value:.3f}" in q["detail"] and q["detail"] in html.unescape(page)
        assert ("PASS" if q["passed"] else "FAIL") in q["detail"]


def _check_metrics_recomputed_from_the_written_maps(out: Path, m: dict, thresholds) -> None:
    """metrics.json holds what medidiff.anomaly.metrics gives on the files the demo wrote
    (maps, segmentations, scores.csv) against the lesion and brain masks."""
    from medidiff.anomaly.metrics import Case, evaluate_cases
    from medidiff.anomaly.outputs import ScoresTable
    from medidiff.data.datasets import load_datalist
    from medidiff.io.volume import load_volume

    entries = {e.name: e for e in load_datalist(ROOT / "sample_data" / "dataset.json",
                                                 split="test")}
    scores = ScoresTable(out / "anomaly" / "scores.csv").scores()
    cases = []
    for scan in m["data"]["test_scans"]:
        e = entries[scan["name"]]
        cases.append(Case(
            e.name, load_volume(out / "anomaly" / f"{e.name}_anomaly.nii.gz").array,
            load_volume(e.segmentation).array > 0, mask=load_volume(e.mask).array > 0,
            segmentation=load_volume(out / "anomaly" / f"{e.name}_seg.nii.gz").array > 0,
            score=scores[e.name], group=scan["kind"]))
    report = evaluate_cases(cases, voxel_threshold=thresholds.voxel_threshold)
    groups = {**report.groups, "all": report.overall}
    for kind, numbers in m["per_kind"].items():
        g = groups[kind]
        mine = {"n_scans": g.n_scans, "voxel_auroc": g.voxel.auroc, "voxel_auprc": g.voxel.auprc,
                "dice_dataset_wise": g.dice_dataset_wise, "oracle_dice": g.oracle.dice}
        for key, value in mine.items():
            stated = numbers["default"][key]
            if stated is None:
                assert math.isnan(value), (kind, key)
            else:
                assert value == pytest.approx(stated, abs=1e-6), (kind, key)
    baseline = ScoresTable(out / "baseline" / "scores.csv").scores()
    assert [s["baseline_score"] for s in m["scans"]] == [baseline[s["name"]] for s in m["scans"]]
    assert [s["score"] for s in m["scans"]] == [scores[s["name"]] for s in m["scans"]]



def test_demo_with_a_latent_3d_model(tiny_checkpoint_2d, tiny_latent_run, tmp_path):
    """A latent 3D model: synthesis with its own sampler (rectified flow: euler 30) and the
    3D latent anomaly scoring next to the 2D default, in its folder, metrics.json and the
    report."""
    import csv

    from medidiff.anomaly.thresholds import Thresholds
    from medidiff.cli.demo import run_demo

    _, latent = tiny_latent_run
    out = tmp_path / "demo"
    result = run_demo(out, checkpoint_2d=tiny_checkpoint_2d,
                      checkpoint_3d=latent / "model.safetensors", limit=2, num_synth=1,
                      progress=False, workers=1)
    m = _strict_json(result.metrics)
    assert (m["synthesis"]["3d"]["sampler"], m["synthesis"]["3d"]["steps"]) == ("euler", 30)
    assert m["synthesis"]["3d"]["shape"] == [32, 40, 32]
    a = m["anomaly_3d"]
    assert a["ran"] is True and a["method"]["method"] == "latent" and "anomaly_3d" in m["timings"]
    thresholds = Thresholds.load(out / "thresholds_3d.json")
    assert thresholds.fpr == 0.05 and thresholds.num_scans == 6
    assert thresholds.method["method"] == "latent" and a["thresholds"]["voxel_threshold"] == \
        thresholds.voxel_threshold
    with open(out / "anomaly_3d" / "scores.csv", newline="") as f:
        names = [row["name"] for row in csv.DictReader(f)]
    assert names == [s["name"] for s in m["data"]["test_scans"]] == [s["name"] for s in a["scans"]]
    for name in names:
        for suffix in ("anomaly.nii.gz", "recon.nii.gz", "seg.nii.gz", "overlay.png"):
            assert (out / "anomaly_3d" / f"{name}_{suffix}").is_file(), (name, suffix)
    # per kind: the 3D numbers beside the 2D default's own
    assert set(a["per_kind"]) == set(m["per_kind"])
    for kind, row in a["per_kind"].items():
        assert row["default_2d"] == m["per_kind"][kind]["default"]
        assert kind == "healthy" or 0.0 <= row["latent_3d"]["voxel_auroc"] <= 1.0
    assert a["per_kind"]["all"]["latent_3d"]["n_scans"] == 2
    for who in ("latent_3d", "default_2d"):
        assert a["cost"][who]["nfe_per_volume"] > 0 and a["cost"][who]["seconds_per_volume"] > 0
    assert any("thresholds_3d.json" in c and "--method latent" in c for c in m["commands"])
    assert any("--sampler euler --steps 30" in c for c in m["commands"])
    page = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="anomaly3d"' in page and "AUROC 3D latent" in page and "seconds per volume" in page
    assert "not run:" not in page
