"""Scan-level worker processes: same results in the same order as in one process."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from medidiff.errors import ConfigError
from medidiff.runtime.parallel import default_workers, map_scans

ROOT = Path(__file__).resolve().parents[1]


def _offset_and_pid(shared: int, item: int) -> tuple[int, int]:
    if item < 0:
        raise ConfigError(f"item {item} is negative")
    return shared + item, os.getpid()


def test_results_come_back_in_input_order_from_other_processes():
    items = list(range(7))
    results = list(map_scans(_offset_and_pid, 100, items, workers=2))
    assert [r[0] for r in results] == [100 + i for i in items]
    assert os.getpid() not in {r[1] for r in results}  # the work ran in the workers
    serial = list(map_scans(_offset_and_pid, 100, items, workers=1))
    assert [r[0] for r in serial] == [r[0] for r in results]
    assert {r[1] for r in serial} == {os.getpid()}


def test_a_worker_error_reaches_the_caller_with_its_type_and_message():
    with pytest.raises(ConfigError, match="item -1 is negative"):
        list(map_scans(_offset_and_pid, 0, [1, -1, 2], workers=2))


def test_default_workers():
    import torch

    assert default_workers(torch.device("cuda"), 10) == 1
    assert default_workers(torch.device("cpu"), 1) == 1
    assert 1 <= default_workers(torch.device("cpu"), 100) <= 4


def test_calibration_and_scoring_do_not_depend_on_the_number_of_workers(
    tiny_checkpoint_2d, tmp_path
):
    from medidiff.anomaly.detector import AnomalyDetector, MethodConfig
    from medidiff.anomaly.runner import calibrate, entry_case, score_folder
    from medidiff.data.datalist import load_datalist
    from medidiff.models.checkpoint import build_model_from_checkpoint

    loaded = build_model_from_checkpoint(tiny_checkpoint_2d)
    detector = AnomalyDetector(loaded, MethodConfig("ddim", steps=2), seed=3)
    dataset = ROOT / "sample_data" / "dataset.json"
    healthy = load_datalist(dataset, split="validation")[:2]
    one = calibrate(detector, healthy, workers=1, allow_few=True)
    two = calibrate(detector, healthy, workers=2, allow_few=True)
    assert two.to_dict() == one.to_dict()

    test = [e for e in load_datalist(dataset, split="test") if e.name in ("tumor-000", "ms-001")]
    serial, parallel = (
        score_folder(detector, test, tmp_path / d, thresholds=one, on_result=entry_case,
                     workers=w).outcomes
        for d, w in (("a", 1), ("b", 2))
    )
    names = [e.name for e in test]
    assert [s.entry.name for s in parallel] == [s.entry.name for s in serial] == names
    for a, b in zip(serial, parallel):
        assert a.row["score"] == b.row["score"]
        np.testing.assert_array_equal(a.extra.anomaly_map, b.extra.anomaly_map)
        np.testing.assert_array_equal(a.extra.segmentation, b.extra.segmentation)
    assert (tmp_path / "b" / "scores.csv").read_text(encoding="utf-8").count("\n") == 3
    from medidiff.anomaly.runner import ScoresTable

    scores = [ScoresTable(tmp_path / d / "scores.csv").scores() for d in ("a", "b")]
    assert scores[0] == scores[1] and list(scores[0]) == names
