"""The shipped 2D default model against the no-network baseline on the validation split.

A slow check on real numbers: on the labelled ``validation_lesions`` scans of sample_data
(one per lesion kind, never used to report results), the default anomaly method of the
shipped 2D model must rank lesion voxels better (voxel AUPRC and AUROC, pooled inside the
brain masks) than the intensity baseline calibrated on the same healthy scans. If a
retrained model or a code change made the network no better than thresholding intensity,
this fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "sample_data" / "dataset.json"


@pytest.mark.slow
def test_shipped_2d_model_beats_the_intensity_baseline_on_validation_lesions():
    import torch

    from medidiff.anomaly.baseline import IntensityBaseline
    from medidiff.anomaly.detector import AnomalyDetector
    from medidiff.anomaly.metrics import evaluate_cases
    from medidiff.anomaly.runner import entry_case, score_scans
    from medidiff.data.datalist import load_datalist, stratified_by_kind
    from medidiff.models.pretrained import DEFAULT_2D, resolve_checkpoint

    torch.set_num_threads(2)
    checkpoint = resolve_checkpoint(DEFAULT_2D)
    lesions = stratified_by_kind(load_datalist(DATASET, split="validation_lesions"), 3)
    healthy = load_datalist(DATASET, split="validation")
    assert {e.extra["kind"] for e in lesions} == {"tumor", "ms", "stroke"}

    def pooled(detector):
        outcomes, failures = score_scans(detector, lesions, on_result=entry_case,
                                         errors="raise")
        assert not failures
        return evaluate_cases([o.extra for o in outcomes]).overall.voxel

    default = pooled(AnomalyDetector(checkpoint, device="cpu", seed=0))
    baseline = pooled(IntensityBaseline.from_healthy(checkpoint, healthy))
    assert default.auprc > baseline.auprc, (default.auprc, baseline.auprc)
    assert default.auroc > baseline.auroc, (default.auroc, baseline.auroc)
