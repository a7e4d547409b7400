"""Anomaly metrics against hand-computed values and independent brute-force references.

The worked example used throughout (10 voxels, 4 lesion voxels), ranked by score:

    score  0.9 0.8 0.7 0.6 0.55 0.5 0.4 0.3 0.2 0.1
    label   1   1   0   1   0    0   1   0   0   0

- AUROC = pairs (lesion > normal) / (4 * 6): 6 + 6 + 5 + 3 = 20 of 24.
- AP = mean precision at each lesion's rank: (1/1 + 2/2 + 3/4 + 4/7) / 4.
- Dice of the top k: 2 TP / (k + 4): k=1 0.4, k=2 0.667, k=4 0.75 (best), k=7 0.727 -> the
  oracle is 0.75 with the top 4 segmented, i.e. any threshold in [0.55, 0.6).
- Split into scan A (first 5 voxels) and scan B (last 5), threshold 0.45:
  A: TP 3, FP 2, FN 0 -> Dice 6/8 = 0.75; B: TP 0, FP 1 (0.5), FN 1 (0.4) -> Dice 0.
  per-scan mean 0.375, std (ddof=0) 0.375; dataset-wise 2*3 / (2*3 + 3 + 1) = 0.6.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from medidiff.errors import DataError, VolumeContentError
from medidiff.anomaly.metrics import (
    Case,
    EvaluationReport,
    OracleDice,
    RankMetrics,
    dice,
    evaluate_cases,
    oracle_dice,
    rank_metrics,
)

SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.4, 0.3, 0.2, 0.1], dtype=np.float32)
LABELS = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0, 0], dtype=bool)
AUROC = 20 / 24
AP = (1 + 1 + 3 / 4 + 4 / 7) / 4


def _two_scans(**extra_a) -> list[Case]:
    a = Case("A", SCORES[:5].reshape(5, 1, 1), LABELS[:5].reshape(5, 1, 1), **extra_a)
    b = Case("B", SCORES[5:].reshape(5, 1, 1), LABELS[5:].reshape(5, 1, 1))
    return [a, b]


# --------------------------------------------------------------------------- rank_metrics


def test_rank_metrics_hand_example():
    m = rank_metrics(SCORES, LABELS)
    assert isinstance(m, RankMetrics)
    assert m.auroc == pytest.approx(AUROC)
    assert m.auprc == pytest.approx(AP)
    assert (m.n_pos, m.n_neg, m.note) == (4, 6, None)


def test_rank_metrics_any_shape_and_label_dtype():
    m = rank_metrics(SCORES.reshape(2, 5, 1), LABELS.astype(np.uint8).reshape(2, 5, 1) * 3)
    assert m.auroc == pytest.approx(AUROC) and m.auprc == pytest.approx(AP)


def test_rank_metrics_ties_hand_example():
    # lesion 0.5 vs normals 0.5 (tie: half a pair) and 0.2 -> AUROC (0.5 + 1) / 2 = 0.75;
    # the only threshold reaching the lesion segments both 0.5 voxels: AP = precision 1/2.
    m = rank_metrics(np.array([0.5, 0.5, 0.2]), np.array([1, 0, 0]))
    assert m.auroc == pytest.approx(0.75)
    assert m.auprc == pytest.approx(0.5)


def _brute_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney: P(lesion score > normal score) + 0.5 P(tie), over all pairs."""
    pos, neg = scores[labels], scores[~labels]
    diff = pos[:, None] - neg[None, :]
    return float((np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size)


def _brute_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """Step-wise AP: sum over distinct thresholds of (recall gain) * precision."""
    ap, prev_recall = 0.0, 0.0
    for s in np.unique(scores)[::-1]:
        pred = scores >= s
        tp = np.sum(pred & labels)
        recall = tp / labels.sum()
        ap += (recall - prev_recall) * tp / pred.sum()
        prev_recall = recall
    return float(ap)


def _brute_oracle(scores: np.ndarray, labels: np.ndarray) -> float:
    return max(dice(scores >= s, labels) for s in np.unique(scores))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_and_oracle_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.2
    # few distinct values -> many ties; lesions score higher on average
    scores = np.round(rng.random(300) + labels * 0.6, 1).astype(np.float32)
    m = rank_metrics(scores, labels)
    assert m.auroc == pytest.approx(_brute_auroc(scores, labels), abs=1e-12)
    assert m.auprc == pytest.approx(_brute_ap(scores, labels), abs=1e-12)
    best = oracle_dice(scores, labels)
    assert best.dice == pytest.approx(_brute_oracle(scores, labels), abs=1e-12)
    assert dice(scores > best.threshold, labels) == pytest.approx(best.dice, abs=1e-12)


def test_rank_metrics_one_class_is_nan_with_note():
    none = rank_metrics(SCORES, np.zeros(10, bool))
    assert math.isnan(none.auroc) and math.isnan(none.auprc)
    assert (none.n_pos, none.n_neg) == (0, 10) and "no positive" in none.note
    allpos = rank_metrics(SCORES, np.ones(10, bool))
    assert math.isnan(allpos.auroc) and allpos.auprc == pytest.approx(1.0)
    assert "no negative" in allpos.note
    empty = rank_metrics(np.zeros(0, np.float32), np.zeros(0, bool))
    assert math.isnan(empty.auroc) and "no samples" in empty.note


def test_rank_metrics_bad_input():
    with pytest.raises(ValueError, match="shape"):
        rank_metrics(SCORES, LABELS[:5])
    bad = SCORES.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rank_metrics(bad, LABELS)


# --------------------------------------------------------------------------- dice


def test_dice_hand_values():
    pred = np.array([1, 1, 1, 0, 0], bool)
    truth = np.array([1, 1, 0, 1, 0], bool)
    assert dice(pred, truth) == pytest.approx(2 * 2 / (3 + 3))
    assert dice(pred.astype(np.uint8), truth.astype(np.float32)) == pytest.approx(2 / 3)
    assert dice(np.zeros(5, bool), truth) == 0.0  # empty prediction of a lesion
    assert dice(pred, np.zeros(5, bool)) == 0.0  # false positives on a healthy scan
    assert math.isnan(dice(np.zeros(5, bool), np.zeros(5, bool)))  # 0/0: undefined
    with pytest.raises(ValueError, match="shape"):
        dice(pred, truth[:4])


# --------------------------------------------------------------------------- oracle


def test_oracle_dice_hand_example():
    best = oracle_dice(SCORES, LABELS)
    assert isinstance(best, OracleDice)
    assert best.dice == pytest.approx(0.75)
    assert 0.55 <= best.threshold < 0.6
    np.testing.assert_array_equal(SCORES > best.threshold, np.arange(10) < 4)


def test_oracle_dice_threshold_exact_for_integer_and_lowest_scores():
    # every voxel is a lesion except none: the best is "segment all" -> threshold below the min
    scores = np.array([3, 1, 2], dtype=np.int64)
    best = oracle_dice(scores, np.array([1, 1, 1]))
    assert best.dice == pytest.approx(1.0)
    assert np.all(scores > best.threshold) and best.threshold < 1
    none = oracle_dice(SCORES, np.zeros(10, bool))
    assert math.isnan(none.dice) and math.isnan(none.threshold) and none.note


# --------------------------------------------------------------------------- evaluate_cases


def test_dataset_wise_vs_per_scan_dice_hand_example():
    report = evaluate_cases(_two_scans(), voxel_threshold=0.45)
    o = report.overall
    assert o.voxel.auroc == pytest.approx(AUROC) and o.voxel.auprc == pytest.approx(AP)
    assert o.dice_dataset_wise == pytest.approx(0.6)
    assert o.dice_per_scan_mean == pytest.approx(0.375)
    assert o.dice_per_scan_std == pytest.approx(0.375)
    assert o.voxel_precision == pytest.approx(3 / 6)
    assert o.voxel_recall == pytest.approx(3 / 4)
    assert o.voxel_fpr == pytest.approx(3 / 6)
    assert o.oracle.dice == pytest.approx(0.75) and 0.55 <= o.oracle.threshold < 0.6
    assert [c.dice for c in report.cases] == pytest.approx([0.75, 0.0])
    assert [c.true_positives for c in report.cases] == [3, 0]
    assert report.threshold_source == "voxel_threshold"
    assert (o.n_scans, o.n_lesion_scans, o.n_healthy_scans) == (2, 2, 0)


def test_segmentation_takes_precedence_over_threshold():
    # scan A's own segmentation marks only its first voxel: TP 1, FN 2 -> Dice 2/4;
    # scan B uses the threshold (Dice 0, TP 0, FP 1, FN 1)
    seg = np.array([1, 0, 0, 0, 0], np.uint8).reshape(5, 1, 1)
    report = evaluate_cases(_two_scans(segmentation=seg), voxel_threshold=0.45)
    assert report.threshold_source == "segmentation+voxel_threshold"
    assert [c.dice for c in report.cases] == pytest.approx([0.5, 0.0])
    # dataset-wise: TP 1, FP 1, FN 3 -> 2 / (2 + 1 + 3)
    assert report.overall.dice_dataset_wise == pytest.approx(2 / 6)


def test_no_threshold_means_no_calibrated_dice():
    seg = np.ones((5, 1, 1), bool)
    report = evaluate_cases(_two_scans(segmentation=seg))  # B has neither seg nor threshold
    assert report.threshold_source == "none"
    assert math.isnan(report.overall.dice_dataset_wise)
    assert all(c.dice is None for c in report.cases)
    assert any("calibrated Dice is not reported" in n for n in report.notes)
    assert report.overall.oracle.dice == pytest.approx(0.75)  # needs no threshold


def test_healthy_scans_scan_auroc_and_false_positives():
    a, b = _two_scans()
    a = Case("A", a.anomaly_map, a.truth, score=0.8)
    b = Case("B", b.anomaly_map, b.truth, score=0.3)
    # healthy scans: one with two voxels above 0.45 (FP 2), one clean
    h1 = Case("H1", np.array([0.95, 0.5, 0.1]), np.zeros(3, bool), score=0.5)
    h2 = Case("H2", np.array([0.1, 0.1, 0.1]), np.zeros(3, bool), score=0.1)
    report = evaluate_cases([a, b, h1, h2], voxel_threshold=0.45)
    o = report.overall
    # scan AUROC: lesion scores {0.8, 0.3} vs healthy {0.5, 0.1}: 0.8>0.5, 0.8>0.1, 0.3>0.1 -> 3/4
    assert o.scan.auroc == pytest.approx(0.75)
    assert (o.n_lesion_scans, o.n_healthy_scans) == (2, 2)
    # dataset-wise: TP 3, FP 3 + 2, FN 1 -> 6 / 12; per-scan unchanged (healthy excluded)
    assert o.dice_dataset_wise == pytest.approx(0.5)
    assert o.dice_per_scan_mean == pytest.approx(0.375)
    by_name = {c.name: c for c in report.cases}
    assert by_name["H1"].dice == 0.0 and math.isnan(by_name["H2"].dice)
    # voxel AUROC: the 0.95 healthy voxel beats all 4 lesions, the 0.5 one beats 1 (0.4),

    assert o.voxel.auroc == pytest.approx((20 + 0 + 3 + 16) / 48)
    assert o.voxel_fpr == pytest.approx(5 / 12)


def test_scan_auroc_needs_both_kinds_of_scan():
    a, b = _two_scans()
    report = evaluate_cases([Case("A", a.anomaly_map, a.truth, score=1.0),
                             Case("B", b.anomaly_map, b.truth, score=2.0)])
    assert math.isnan(report.overall.scan.auroc)
    assert any("scan-level AUROC" in n for n in report.notes)
    no_scores = evaluate_cases(_two_scans())
    assert math.isnan(no_scores.overall.scan.auroc) and no_scores.overall.scan.note


def test_masks_restrict_voxels_and_compact_is_equivalent():
    a, b = _two_scans()
    # add a huge-scoring normal voxel and a lesion voxel, both outside scan A's brain mask
    amap = np.concatenate([a.anomaly_map.ravel(), [5.0, 0.0]]).reshape(7, 1, 1)
    truth = np.concatenate([a.truth.ravel(), [False, True]]).reshape(7, 1, 1)
    mask = np.array([1, 1, 1, 1, 1, 0, 0], np.uint8).reshape(7, 1, 1)
    masked = Case("A", amap, truth, mask=mask, score=1.0, group="g")
    report = evaluate_cases([masked, b], voxel_threshold=0.45)
    assert report.overall.voxel.auroc == pytest.approx(AUROC)
    assert report.overall.dice_dataset_wise == pytest.approx(0.6)
    assert report.masked_cases == 1
    assert any("1 lesion voxels lie outside" in n for n in report.notes)
    compact = evaluate_cases([masked.compact(), b.compact()], voxel_threshold=0.45)
    assert compact.to_dict() == report.to_dict()
    assert masked.compact().anomaly_map.dtype == np.float32
    assert masked.compact().anomaly_map.shape == (5,)


def test_groups_hand_values():
    a, b = _two_scans()
    cases = [Case("A", a.anomaly_map, a.truth, group="tumor"),
             Case("B", b.anomaly_map, b.truth, group="ms"),
             Case("C", np.array([0.0, 1.0]), np.array([0, 1]))]  # no group
    report = evaluate_cases(cases, voxel_threshold=0.45)
    assert list(report.groups) == ["ms", "tumor", "ungrouped"]
    tumor = report.groups["tumor"]
    # scan A alone: lesions {0.9, 0.8, 0.6} vs normals {0.7, 0.55}: 2 + 2 + 1 of 6
    assert tumor.voxel.auroc == pytest.approx(5 / 6)
    assert tumor.dice_dataset_wise == pytest.approx(0.75)
    assert report.groups["ms"].dice_dataset_wise == pytest.approx(0.0)
    assert report.groups["ungrouped"].voxel.auroc == pytest.approx(1.0)
    assert report.overall.n_scans == 3
    assert evaluate_cases(_two_scans()).groups == {}


def test_edge_cases_no_positives_and_empty_predictions():
    healthy = [Case("H", np.array([0.2, 0.4]), np.zeros(2, bool))]
    report = evaluate_cases(healthy, voxel_threshold=0.3)
    o = report.overall
    assert math.isnan(o.voxel.auroc) and math.isnan(o.dice_dataset_wise)
    assert math.isnan(o.dice_per_scan_mean) and math.isnan(o.oracle.dice)
    assert o.voxel_fpr == pytest.approx(0.5)
    assert any("no scan has a lesion" in n for n in report.notes)
    json.dumps(report.to_dict(), allow_nan=False)  # NaN became null
    # a threshold above every score: empty predictions -> Dice 0, precision undefined
    empty = evaluate_cases(_two_scans(), voxel_threshold=10.0)
    assert empty.overall.dice_dataset_wise == 0.0
    assert empty.overall.dice_per_scan_mean == 0.0
    assert math.isnan(empty.overall.voxel_precision) and empty.overall.voxel_recall == 0.0


def test_bad_cases_are_refused():
    with pytest.raises(VolumeContentError, match="case X: truth shape"):
        Case("X", np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(VolumeContentError, match="NaN"):
        Case("X", np.array([np.nan, 1.0]), np.zeros(2))
    with pytest.raises(VolumeContentError, match="score"):
        Case("X", np.zeros(2), np.zeros(2), score=float("inf"))
    with pytest.raises(DataError, match="no cases"):
        evaluate_cases([])
    a, _ = _two_scans()
    with pytest.raises(DataError, match="repeated: A"):
        evaluate_cases([a, a])


def test_report_dict_and_table():
    a, b = _two_scans()
    cases = [Case("A", a.anomaly_map, a.truth, group="tumor", score=1.0),
             Case("B", b.anomaly_map, b.truth, group="ms", score=0.5)]
    report = evaluate_cases(cases, voxel_threshold=0.45)
    assert isinstance(report, EvaluationReport)
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    for key in ("voxel_auroc", "voxel_auprc", "dice_dataset_wise", "dice_per_scan_mean",
                "dice_per_scan_std", "oracle_dice_dataset_wise", "oracle_threshold", "scan_auroc"):
        assert key in d["overall"]
    assert d["overall"]["dice_dataset_wise"] == pytest.approx(0.6)
    assert d["overall"]["scan_auroc"] is None  # no healthy scans
    assert set(d["groups"]) == {"ms", "tumor"}
    assert [c["name"] for c in d["cases"]] == ["A", "B"]
    assert d["masks"] == "none (background voxels counted: optimistic)"
    assert d["warnings"] and "background voxels are counted" in d["warnings"][0]
    assert "oracle" in d["oracle_note"]
    table = report.table()
    rows = [ln for ln in table.splitlines() if ln.startswith("|")]
    assert len(rows) == 2 + 3  # header, rule, ms, tumor, all
    assert len({len(r) for r in rows}) == 1  # aligned
    assert "Dice dataset-wise" in rows[0] and "oracle" in rows[0] and "per-scan" in rows[0]
    all_row = rows[-1]
    assert all_row.startswith("| all") and "0.600" in all_row and "0.375 ± 0.375" in all_row
    assert "anomaly map > 0.45" in table and "background voxels counted: optimistic" in table
    assert table.splitlines()[0].startswith("WARNING: no scan has a brain mask")


def test_rank_metrics_equal_sklearn_scores_on_many_voxels():
    """Reference check against scikit-learn's own AUROC and AP functions (float32, ties)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(7)
    labels = rng.random((40, 50, 30)) < 0.03
    scores = (rng.random(labels.shape) + labels * 0.5).astype(np.float32)
    scores[::3] = np.round(scores[::3], 2)  # some ties
    m = rank_metrics(scores, labels)
    assert m.auroc == pytest.approx(roc_auc_score(labels.ravel(), scores.ravel()), abs=1e-12)
    ap = average_precision_score(labels.ravel(), scores.ravel())
    assert m.auprc == pytest.approx(ap, abs=1e-12)
