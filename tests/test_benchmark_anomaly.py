"""benchmark_anomaly's merge of separate runs into one table (``--from-json``)."""

from __future__ import annotations

import json
from pathlib import Path



def _summary(auprc: float, scans: list[str]) -> dict:
    groups = {k: {"voxel_auprc": auprc / 2, "voxel_auroc": 0.9, "dice_dataset_wise": 0.3,
                  "oracle_dice": 0.4} for k in ("tumor", "ms", "stroke")}
    return {"scans": scans, "nfe_per_slice": 3, "network_evaluations_per_volume": 180.0,
            "seconds_per_volume": 12.5, "voxel_auroc": 0.91, "voxel_auprc": auprc,
            "dice_dataset_wise": 0.4, "voxel_fpr": 0.001, "dice_classic": 0.1,
            "oracle_dice": 0.5, "groups": groups}


def _run(path: Path, methods: dict, sha: str = "abc123def4567890", median: int | None = None,
         calibration: int = 6) -> str:
    settings = {"data": "d.json", "calib_limit": None, "fpr": 0.05, "target": "fp-volume",
                "max_fp_ml": 1.0, "min_component_ml": 0.5, "median_size": median, "erode": None,
                "residual": None}
    out = {"checkpoint": {"path": "m", "sha256": sha, "step": 1200}, "settings": settings,
           "calibration_scans": [f"h{i}" for i in range(6)],
           "methods": {label: {"calibration_scans": calibration,
                               "splits": {split: _summary(a, names) for split, (a, names) in splits.items()}}
                       for label, splits in methods.items()}}
    path.write_text(json.dumps(out))
    return str(path)


def test_from_json_prints_one_table_of_all_runs(tmp_path: Path, capsys, load_pipeline) -> None:
    b = load_pipeline("benchmark_anomaly")
    full = [f"s{i}" for i in range(4)]
    a = _run(tmp_path / "a.json", {"ddim": {"validation_lesions": (0.61, full)}})
    c = _run(tmp_path / "c.json", {"x0": {"test": (0.12, full)}, "anoddpm": {"test": (0.7, full[:1])}},
             calibration=2)
    d = _run(tmp_path / "d.json", {"ddim": {"test": (0.56, full)}})  # the same method, another split
    assert b.main(["--from-json", a, c, d]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "method" not in line]
    assert [r.split(" | ")[0:2] for r in rows] == [
        ["| ddim", "validation_lesions"], ["| ddim", "test"], ["| x0 (subset, calibrated on 2)", "test"],
        ["| anoddpm (subset, calibrated on 2)", "test"]]
    assert "| 0.560 |" in rows[1] and "| 0.120 |" in rows[2] and "sha256 abc123def456" in out
    assert "Dice @1 ml FP" in out


def test_from_json_refuses_runs_that_do_not_belong_together(tmp_path: Path, capsys, load_pipeline) -> None:
    b = load_pipeline("benchmark_anomaly")
    names = ["s0"]
    a = _run(tmp_path / "a.json", {"ddim": {"test": (0.5, names)}})
    other_weights = _run(tmp_path / "b.json", {"x0": {"test": (0.1, names)}}, sha="ffff00000000")
    other_filter = _run(tmp_path / "c.json", {"x0": {"test": (0.1, names)}}, median=5)
    same_label = _run(tmp_path / "d.json", {"ddim": {"test": (0.1, names)}})  # same method and split
    broken = tmp_path / "e.json"
    broken.write_text("{not json")
    for bad, words in ((other_weights, "sha256"), (other_filter, "median_size"),
                       (same_label, "also in"), (str(broken), "not a benchmark_anomaly JSON")):
        assert b.main(["--from-json", a, bad]) == 2
        assert words in capsys.readouterr().err


def test_from_json_compares_ddim_with_anoddpm_on_the_same_scans(tmp_path: Path, capsys,
                                                                  load_pipeline) -> None:
    b = load_pipeline("benchmark_anomaly")
    full = [f"s{i}" for i in range(8)]
    four = full[:4]

    def evals(path: str, value: float) -> str:  # anoddpm's chain costs 50x ddim's evaluations
        run = json.loads(Path(path).read_text())
        for result in run["methods"].values():
            for s in result["splits"].values():
                s["network_evaluations_per_volume"] = value
        Path(path).write_text(json.dumps(run))
        return path

    slow0 = evals(_run(tmp_path / "a0.json", {"anoddpm": {"test": (0.50, four)}}, calibration=2), 9000.0)
    slow1 = evals(_run(tmp_path / "a1.json", {"anoddpm (seed 1)": {"test": (0.54, four)}},
                       calibration=2), 9000.0)
    fast = _run(tmp_path / "d.json", {"ddim (seed 0)": {"test": (0.47, four)},
                                      "ddim (seed 1)": {"test": (0.49, four)}})
    whole = _run(tmp_path / "w.json", {"ddim": {"test": (0.90, full)}})  # other scans: not compared
    assert b.main(["--from-json", whole, slow0, slow1, fast]) == 0
    out = capsys.readouterr().out
    assert "same 4 test scans (s0, s1, s2, s3)" in out
    assert "ddim (2 seed(s)) uses 50.0x fewer" in out
    assert "0.480 +- 0.010 (ddim) vs 0.520 +- 0.020 (anoddpm)" in out and "NOT met" in out
    # within 0.02 once the fast rows reach 0.50
    fast = _run(tmp_path / "d.json", {"ddim (seed 0)": {"test": (0.50, four)},
                                      "ddim (seed 1)": {"test": (0.51, four)}})
    assert b.main(["--from-json", slow0, slow1, fast]) == 0
    assert "target (>= 20x fewer, within 0.02 AUPRC) MET" in capsys.readouterr().out
    # without a ddim run on anoddpm's scans the reader is told what to run
    assert b.main(["--from-json", whole, slow0]) == 0
    assert "no ddim run scored exactly these scans" in capsys.readouterr().out


def test_a_run_stopped_midway_keeps_the_methods_it_finished(tmp_path: Path, tiny_checkpoint_2d,
                                                            load_pipeline, monkeypatch) -> None:
    import pytest

    b = load_pipeline("benchmark_anomaly")
    data = Path(__file__).resolve().parents[1] / "sample_data" / "dataset.json"
    out = tmp_path / "run.json"
    common = ["--checkpoint", str(tiny_checkpoint_2d), "--data", str(data), "--splits", "test",
              "--limit", "1", "--calib-limit", "1", "--out", str(out)]
    finished = b.run_method

    def stops_after_baseline(method, *a, **k):
        if method != "baseline":
            raise KeyboardInterrupt
        return finished(method, *a, **k)

    monkeypatch.setattr(b, "run_method", stops_after_baseline)
    with pytest.raises(KeyboardInterrupt):
        b.main(["--methods", "baseline", "ddim", *common])
    kept = json.loads(out.read_text())
    assert kept["complete"] is False and list(kept["methods"]) == ["baseline"]
    assert len(kept["methods"]["baseline"]["splits"]["test"]["scans"]) == 1

    monkeypatch.setattr(b, "run_method", finished)
    assert b.main(["--methods", "baseline", *common]) == 0
    assert json.loads(out.read_text())["complete"] is True
