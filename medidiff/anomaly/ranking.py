"""Ranking metrics and Dice: voxel AUROC/AUPRC, Dice from counts, the oracle Dice.

The building blocks of :mod:`medidiff.anomaly.metrics` (which says what each number means):
one sort of the scores (:func:`confusion_curve`) serves AUROC, AUPRC and the oracle Dice.
Thresholds follow one rule: a voxel is anomalous when its score is strictly greater.

Example:
    >>> import numpy as np
    >>> scores = np.array([0.9, 0.8, 0.3, 0.1], dtype=np.float32)
    >>> labels = np.array([1, 0, 1, 0], dtype=bool)
    >>> round(rank_metrics(scores, labels).auroc, 4), dice(scores > 0.5, labels)
    (0.75, 0.5)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "NAN",
    "Curve",
    "OracleDice",
    "RankMetrics",
    "confusion_curve",
    "dice",
    "dice_from_counts",
    "nan_to_none",
    "oracle_dice",
    "oracle_from_curve",
    "rank_from_curve",
    "rank_metrics",
]

NAN = float("nan")


def nan_to_none(value: float | None) -> float | None:
    """JSON-safe number: NaN/Inf become ``None`` (strict JSON has no NaN)."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


# --------------------------------------------------------------------------- ranking


@dataclass(frozen=True)
class RankMetrics:
    """Threshold-free ranking quality of scores against binary labels.

    Attributes:
        auroc: area under the ROC curve (NaN when only one class is present).
        auprc: average precision, the step-wise area under the precision-recall curve
            (NaN when there are no positives).
        n_pos: number of positive samples (lesion voxels or lesion scans).
        n_neg: number of negative samples.
        note: why a value is NaN, else ``None``.
    """

    auroc: float
    auprc: float
    n_pos: int
    n_neg: int
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (NaN as ``None``)."""
        return {
            "auroc": nan_to_none(self.auroc),
            "auprc": nan_to_none(self.auprc),
            "n_pos": self.n_pos,
            "n_neg": self.n_neg,
            "note": self.note,
        }


def _flat_pair(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-D views (no copy when contiguous) of scores and boolean labels; checked."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.shape != labels.shape:
        raise ValueError(f"scores shape {scores.shape} differs from labels shape {labels.shape}")
    if scores.dtype.kind not in "fiu":
        raise ValueError(f"scores must be numeric; got dtype {scores.dtype}")
    scores = scores.reshape(-1)
    labels = labels.reshape(-1)
    if labels.dtype != np.bool_:
        labels = labels != 0
    if scores.dtype.kind == "f" and not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or Inf; fix the anomaly map first")
    return scores, labels


@dataclass(frozen=True)
class Curve:
    """Confusion counts at every distinct score, highest first (one sort of the scores).

    ``tps[k]``/``fps[k]`` count the lesion/normal samples with ``score >= thresholds[k]``.
    """

    tps: np.ndarray
    fps: np.ndarray
    thresholds: np.ndarray
    n_pos: int
    n_neg: int
    dtype: np.dtype


def confusion_curve(scores: np.ndarray, labels: np.ndarray) -> Curve:
    from sklearn.metrics import roc_curve

    scores, labels = _flat_pair(scores, labels)
    n_pos = int(np.count_nonzero(labels))
    n_neg = int(labels.size - n_pos)
    dtype = scores.dtype if scores.dtype.kind == "f" else np.dtype(np.float64)
    if n_pos and n_neg:
        # scikit-learn's ROC curve without dropping collinear points: one point per distinct
        # score (after its leading (0, 0) point at threshold +inf); rates back to counts.
        fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
        tps, fps, thresholds = np.rint(tpr[1:] * n_pos), np.rint(fpr[1:] * n_neg), thresholds[1:]
    elif n_pos:  # only lesions: the one useful threshold keeps everything
        tps, fps = np.array([float(n_pos)]), np.array([0.0])
        thresholds = np.array([scores.min()], dtype=np.float64)
    else:
        tps = fps = thresholds = np.zeros(0)
    return Curve(tps, fps, thresholds, n_pos, n_neg, dtype)


def rank_from_curve(curve: Curve) -> RankMetrics:
    from sklearn.metrics import auc

    n_pos, n_neg = curve.n_pos, curve.n_neg
    if n_pos == 0:
        note = "no positive (lesion) samples: AUROC and AUPRC are undefined"
        if n_neg == 0:
            note = "no samples: AUROC and AUPRC are undefined"
        return RankMetrics(NAN, NAN, n_pos, n_neg, note)
    # AP = sum_k (R_k - R_{k-1}) P_k over the thresholds k, R_0 = 0 (scikit-learn's
    # average_precision_score: the step-wise area, no interpolation).
    precision = curve.tps / (curve.tps + curve.fps)
    recall = curve.tps / n_pos
    auprc = float(np.sum(np.diff(recall, prepend=0.0) * precision))
    if n_neg == 0:
        return RankMetrics(NAN, auprc, n_pos, n_neg, "no negative samples: AUROC is undefined")
    auroc = float(auc(np.r_[0.0, curve.fps / n_neg], np.r_[0.0, recall]))  # trapezoids
    return RankMetrics(auroc, auprc, n_pos, n_neg)


def rank_metrics(scores: np.ndarray, labels: np.ndarray) -> RankMetrics:
    """Voxel (or scan) AUROC and AUPRC of ``scores`` against binary ``labels``.

    Both come from one scikit-learn ROC curve (one sort of the scores), and equal
    ``roc_auc_score`` and ``average_precision_score`` (ties handled the same way: a tied
    group of scores is one threshold; a tied lesion/normal pair counts half in AUROC).

    Args:
        scores: anomaly scores, any shape; higher means more anomalous. Pass float32 for
            millions of voxels: the arrays are flattened without copying.
        labels: same shape; nonzero/True = positive (lesion).

    Returns:
        :class:`RankMetrics`. With no positives, AUROC and AUPRC are NaN; with no
        negatives, AUROC is NaN (AUPRC is then 1); ``note`` says which.

    Raises:
        ValueError: the shapes differ, or the scores hold NaN/Inf.
    """
    return rank_from_curve(confusion_curve(scores, labels))


# --------------------------------------------------------------------------- Dice


def dice_from_counts(tp: int, fp: int, fn: int) -> float:
    """``2 TP / (2 TP + FP + FN)``; NaN when the denominator is 0 (both sets empty)."""
    denominator = 2 * tp + fp + fn
    return 2.0 * tp / denominator if denominator else NAN


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap ``2 |P and T| / (|P| + |T|)`` of two binary masks.

    When both masks are empty the Dice is 0/0 and this returns **NaN**, by design: a
    healthy scan with no false positives is not a "perfect segmentation" (returning 1.0
    would inflate any mean by the number of healthy scans; per-scan Dice of healthy scans
    is undefined, Baur et al. 2021). NaN drops out of the per-scan means of
    :func:`evaluate_cases`, which average over scans with lesions only. An empty
    prediction of a non-empty truth (or the reverse) is 0.

    Args:
        pred: predicted mask, any shape; nonzero/True = anomalous.
        truth: ground-truth mask, same shape.

    Returns:
        Dice in [0, 1], or NaN when both are empty.

    Raises:
        ValueError: the shapes differ.
    """
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"pred shape {pred.shape} differs from truth shape {truth.shape}")
    p = pred if pred.dtype == np.bool_ else pred != 0
    t = truth if truth.dtype == np.bool_ else truth != 0
    tp = int(np.count_nonzero(p & t))
    n_p = int(np.count_nonzero(p))
    n_t = int(np.count_nonzero(t))
    return dice_from_counts(tp, n_p - tp, n_t - tp)


@dataclass(frozen=True)
class OracleDice:
    """The best dataset-wise Dice over all thresholds: an **oracle** (it uses the labels).

    Attributes:
        dice: the maximum Dice (= maximum F1 of the precision-recall curve); NaN when
            there are no positives.
        threshold: the threshold that reaches it, with the rule ``scores > threshold``
            (for any threshold in ``[next lower score, best score)`` the result is the
            same; this is the largest such value, in the scores' own dtype). NaN when
            ``dice`` is.
        note: why the values are NaN, else ``None``.
    """

    dice: float
    threshold: float
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (NaN as ``None``)."""
        return {
            "dice": nan_to_none(self.dice),
            "threshold": nan_to_none(self.threshold),
            "note": self.note,
        }


def oracle_dice(scores: np.ndarray, labels: np.ndarray) -> OracleDice:
    """The best dataset-wise Dice over all thresholds of ``scores`` (an **oracle**).

    At threshold s the segmentation is ``scores >= s``; its Dice with the labels equals
    its F1 score, ``2 P R / (P + R)`` with P = precision and R = recall, so the best Dice
    over all thresholds is the maximum F1 along the precision-recall curve (computed from
    the same scikit-learn curve as :func:`rank_metrics`).
    Because it picks the threshold with the labels, report it as an upper bound only.

    Args:
        scores: anomaly scores, any shape (pool all scans' voxels inside the masks for
            the dataset-wise oracle).
        labels: same shape; nonzero/True = lesion.

    Returns:
        :class:`OracleDice` with the best Dice and its threshold for ``scores > threshold``.

    Raises:
        ValueError: the shapes differ, or the scores hold NaN/Inf.
    """
    return oracle_from_curve(confusion_curve(scores, labels))


def oracle_from_curve(curve: Curve) -> OracleDice:
    if curve.n_pos == 0:
        return OracleDice(NAN, NAN, "no positive (lesion) voxels: Dice is undefined")
    # Dice of "scores >= thresholds[k]" = 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + n_pos);
    # argmax takes the first maximum, i.e. the highest such threshold.
    f1 = 2.0 * curve.tps / (curve.tps + curve.fps + curve.n_pos)
    best = int(np.argmax(f1))
    s_best = curve.dtype.type(curve.thresholds[best])
    # "scores >= s_best" == "scores > nextafter(s_best, -inf)" exactly, in the scores' dtype.
    below = np.nextafter(s_best, curve.dtype.type(-np.inf))
    return OracleDice(float(f1[best]), float(below))
