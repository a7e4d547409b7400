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
    from medidiff.anomaly.detector import AnomalyDetector, MethodConfig, calibrate
    from medidiff.models.checkpoint import build_model_from_checkpoint
    from medidiff.data.datalist import load_datalist
    from medidiff.cli.demo import _score_all

    loaded = build_model_from_checkpoint(tiny_checkpoint_2d)
    detector = AnomalyDetector(loaded, MethodConfig("ddim", steps=2), seed=3)
    dataset = ROOT / "sample_data" / "dataset.json"
    healthy = load_datalist(dataset, split="validation")[:2]
    one = calibrate(detector, healthy, workers=1)
    two = calibrate(detector, healthy, workers=2)
    assert two.to_dict() == one.to_dict()

    detector.use_thresholds(one)
    test = [e for e in load_datalist(dataset, split="test") if e.name in ("tumor-000", "ms-001")]
    serial = _score_all(detector, test, tmp_path / "a", desc="", progress=False, workers=1)
    parallel = _score_all(detector, test, tmp_path / "b", desc="", progress=False, workers=2)
    assert [s.name for s in parallel] == [s.name for s in serial] == [e.name for e in test]
    for a, b in zip(serial, parallel):
        assert a.row["score"] == b.row["score"]
        np.testing.assert_array_equal(a.case.anomaly_map, b.case.anomaly_map)
        np.testing.assert_array_equal(a.case.segmentation, b.case.segmentation)
    assert (tmp_path / "b" / "scores.csv").read_text(encoding="utf-8").count("\n") == 3
