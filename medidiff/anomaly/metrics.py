"""Anomaly-detection metrics: voxel AUROC/AUPRC, Dice, oracle Dice and scan-level AUROC.

What each number means (name it when you report it; see ``shared/DOMAIN.md``):

- **Voxel AUROC / AUPRC** rank every voxel inside the brain masks, pooled over all scans,
  by its anomaly score against the lesion label (scikit-learn's ``roc_auc_score`` and
  ``average_precision_score``; AUPRC is average precision, the step-wise area). They need
  no threshold. AUPRC depends on the lesion prevalence; AUROC does not.
- **Dice at the calibrated threshold**, in two forms that differ and must not be mixed up:

  - *dataset-wise* Dice (Baur et al., "Autoencoders for unsupervised anomaly segmentation
    in brain MR images: a comparative study", MedIA 2021): true/false positives and false
    negatives summed over all scans, then ``2 TP / (2 TP + FP + FN)``. Healthy scans
    count through their false positives.
  - *per-scan* Dice: one Dice per scan with a lesion, then mean and standard deviation
    over those scans (population std, ``ddof=0``). Healthy scans are excluded: their Dice
    is 0/0, undefined (Baur et al. 2021 discuss this), see :func:`dice`.

  The threshold comes from each case's ``segmentation`` (e.g. ``medidiff anomaly`` with
  thresholds calibrated on *healthy* scans at a target false-positive rate), else from
  ``anomaly_map > voxel_threshold``.
- **Oracle Dice**: the best dataset-wise Dice over all thresholds (the maximum F1 on the
  precision-recall curve). It chooses the threshold *by looking at the labels*, so it is an
  optimistic upper bound, not a result a user could deploy; it is labelled "oracle"
  everywhere. Thresholds in this module follow one rule: a voxel is anomalous when
  ``anomaly_map > threshold`` (strictly).
- **Scan-level AUROC**: per-scan scores of scans with a lesion against those of healthy
  scans (empty ground truth). Needs both kinds of scan and a score for each.

Example:
    >>> import numpy as np
    >>> scores = np.array([0.9, 0.8, 0.3, 0.1], dtype=np.float32)
    >>> labels = np.array([1, 0, 1, 0], dtype=bool)
    >>> m = rank_metrics(scores, labels)
    >>> round(m.auroc, 4), round(m.auprc, 4), m.n_pos, m.n_neg
    (0.75, 0.8333, 2, 2)
    >>> dice(scores > 0.5, labels)
    0.5
    >>> best = oracle_dice(scores, labels)
    >>> round(best.dice, 4), int((scores > best.threshold).sum())
    (0.8, 3)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from medidiff.errors import DataError, VolumeContentError

from medidiff.anomaly.ranking import (
    NAN,
    OracleDice,
    RankMetrics,
    confusion_curve,
    dice,
    dice_from_counts,
    nan_to_none,
    oracle_dice,
    oracle_from_curve,
    rank_from_curve,
    rank_metrics,
)

__all__ = [
    "Case",
    "CaseMetrics",
    "EvaluationReport",
    "GroupMetrics",
    "OracleDice",
    "RankMetrics",
    "dice",
    "evaluate_cases",
    "oracle_dice",
    "rank_metrics",
]


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True, eq=False)
class Case:
    """One evaluated scan: its anomaly map and ground truth on the same grid.

    Attributes:
        name: the case name (e.g. the scan's file name without suffix).
        anomaly_map: voxel anomaly scores ``(X, Y, Z)`` (any shape; higher = more anomalous).
        truth: ground-truth lesion mask, same shape; nonzero = lesion. All zero for a
            healthy scan.
        mask: brain mask, same shape; voxel metrics count only voxels where it is nonzero.
            ``None``: every voxel counts.
        segmentation: the binary segmentation at the calibrated threshold (e.g.
            ``NAME_seg.nii.gz``), same shape; ``None``: use ``anomaly_map > voxel_threshold``.
        score: the scan-level anomaly score, if any (for scan-level AUROC).
        group: a kind for the per-group breakdown (e.g. ``"tumor"``, ``"ms"``), if any.
        lesion_voxels_outside_mask: lesion voxels already dropped by :meth:`compact`
            (reported by :func:`evaluate_cases`); leave 0.

    Raises:
        VolumeContentError: arrays of different shapes, a non-numeric map, NaN/Inf in the
            map, or a non-finite score; the message names the case and the field.
    """

    name: str
    anomaly_map: np.ndarray
    truth: np.ndarray
    mask: np.ndarray | None = None
    segmentation: np.ndarray | None = None
    score: float | None = None
    group: str | None = None
    lesion_voxels_outside_mask: int = 0

    def __post_init__(self) -> None:
        for key in ("anomaly_map", "truth", "mask", "segmentation"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, np.asarray(value))
        amap = self.anomaly_map
        if amap.dtype.kind not in "fiu":
            raise VolumeContentError(
                f"case {self.name}: anomaly_map must be numeric; got {amap.dtype}"
            )
        for key in ("truth", "mask", "segmentation"):
            value = getattr(self, key)
            if value is not None and value.shape != amap.shape:
                raise VolumeContentError(
                    f"case {self.name}: {key} shape {value.shape} differs from the anomaly map's "
                    f"{amap.shape}; put both on the same grid"
                )
        if amap.dtype.kind == "f":
            bad = amap.size - int(np.count_nonzero(np.isfinite(amap)))
            if bad:
                raise VolumeContentError(f"case {self.name}: anomaly_map has {bad} NaN/Inf voxels")
        if self.score is not None:
            score = float(self.score)
            if not math.isfinite(score):
                raise VolumeContentError(f"case {self.name}: score {self.score!r} is not finite")
            object.__setattr__(self, "score", score)

    def compact(self) -> Case:
        """The same case as 1-D arrays of the voxels inside the mask.

        :func:`evaluate_cases` gives identical results for the compact case and keeps only
        the brain voxels in memory (anomaly map as float32, masks as bool), so the CLI
        compacts each scan right after loading it. Lesion voxels outside the mask are
        counted in ``lesion_voxels_outside_mask``. A masked case keeps an all-True mask
        (a zero-copy broadcast view), so reports still say that masks were used.

        Returns:
            A new :class:`Case`.
        """
        truth = self.truth if self.truth.dtype == np.bool_ else self.truth != 0
        if self.mask is None:
            keep = None
            outside = 0
        else:
            keep = self.mask if self.mask.dtype == np.bool_ else self.mask != 0
            outside = int(np.count_nonzero(truth & ~keep))

        def pick(array: np.ndarray) -> np.ndarray:
            return array[keep] if keep is not None else array.reshape(-1)

        seg = None
        if self.segmentation is not None:
            seg = self.segmentation
            seg = pick(seg if seg.dtype == np.bool_ else seg != 0)
        kept = None if keep is None else np.broadcast_to(np.True_, (int(np.count_nonzero(keep)),))
        return replace(
            self,
            anomaly_map=pick(self.anomaly_map).astype(np.float32, copy=False),
            truth=pick(truth),
            mask=kept,
            segmentation=seg,
            lesion_voxels_outside_mask=self.lesion_voxels_outside_mask + outside,
        )


@dataclass(frozen=True)
class CaseMetrics:
    """Per-scan numbers (voxels counted inside the scan's mask).

    Attributes:
        name: the case name.
        group: its group, if any.
        voxels: voxels evaluated (inside the mask).
        lesion_voxels: ground-truth lesion voxels inside the mask (0: a healthy scan).
        predicted_voxels: voxels segmented at the calibrated threshold (``None`` without one).
        true_positives: lesion voxels segmented (``None`` without a threshold).
        dice: per-scan Dice at the calibrated threshold; NaN for a healthy scan with no
            false positives (0/0), ``None`` without a threshold.
        score: the scan-level score, if any.
    """

    name: str
    group: str | None
    voxels: int
    lesion_voxels: int
    predicted_voxels: int | None
    true_positives: int | None
    dice: float | None
    score: float | None

    @property
    def has_lesion(self) -> bool:
        return self.lesion_voxels > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (NaN as ``None``)."""
        return {
            "name": self.name,
            "group": self.group,
            "voxels": self.voxels,
            "lesion_voxels": self.lesion_voxels,
            "has_lesion": self.has_lesion,
            "predicted_voxels": self.predicted_voxels,
            "true_positives": self.true_positives,
            "dice": nan_to_none(self.dice),
            "score": self.score,
        }


@dataclass(frozen=True)
class GroupMetrics:
    """The metrics of a set of scans (all of them, or one group).

    Attributes:
        n_scans: scans in the set.
        n_lesion_scans: scans with lesion voxels inside their mask.
        n_healthy_scans: scans whose ground truth is empty inside their mask.
        voxel: voxel AUROC/AUPRC pooled over the scans' voxels inside the masks.
        dice_dataset_wise: dataset-wise Dice at the calibrated threshold (TP, FP, FN summed
            over all scans, healthy ones included; Baur et al. 2021); NaN without a
            threshold or without lesions.
        dice_per_scan_mean: mean per-scan Dice over scans with lesions (NaN if none).
        dice_per_scan_std: its standard deviation over those scans (``ddof=0``).
        voxel_precision: pooled precision at the calibrated threshold, TP / (TP + FP).
        voxel_recall: pooled sensitivity at the calibrated threshold, TP / (TP + FN).
        voxel_fpr: pooled false-positive rate at the calibrated threshold, FP / negatives
            (compare with the calibration's target FPR).
        oracle: the **oracle** dataset-wise Dice and its threshold (chosen on the labels).
        scan: scan-level AUROC/AUPRC of scan scores, lesion scans against healthy scans
            (NaN when one kind is missing or no scan has a score).
    """

    n_scans: int
    n_lesion_scans: int
    n_healthy_scans: int
    voxel: RankMetrics
    dice_dataset_wise: float
    dice_per_scan_mean: float
    dice_per_scan_std: float
    voxel_precision: float
    voxel_recall: float
    voxel_fpr: float
    oracle: OracleDice
    scan: RankMetrics

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form with explicit names (NaN as ``None``)."""
        return {
            "n_scans": self.n_scans,
            "n_lesion_scans": self.n_lesion_scans,
            "n_healthy_scans": self.n_healthy_scans,
            "voxel_auroc": nan_to_none(self.voxel.auroc),
            "voxel_auprc": nan_to_none(self.voxel.auprc),
            "n_lesion_voxels": self.voxel.n_pos,
            "n_normal_voxels": self.voxel.n_neg,
            "dice_dataset_wise": nan_to_none(self.dice_dataset_wise),
            "dice_per_scan_mean": nan_to_none(self.dice_per_scan_mean),
            "dice_per_scan_std": nan_to_none(self.dice_per_scan_std),
            "voxel_precision": nan_to_none(self.voxel_precision),
            "voxel_recall": nan_to_none(self.voxel_recall),
            "voxel_fpr": nan_to_none(self.voxel_fpr),
            "oracle_dice_dataset_wise": nan_to_none(self.oracle.dice),
            "oracle_threshold": nan_to_none(self.oracle.threshold),
            "scan_auroc": nan_to_none(self.scan.auroc),
            "scan_auprc": nan_to_none(self.scan.auprc),
            "n_scans_with_score": self.scan.n_pos + self.scan.n_neg,
        }


@dataclass(frozen=True)
class EvaluationReport:
    """Everything :func:`evaluate_cases` measured.

    Attributes:
        overall: metrics over all scans.
        groups: per-group metrics, sorted by group name (empty when no case has a group;
            cases without one are grouped as ``"ungrouped"`` otherwise).
        cases: per-scan numbers, in input order.
        voxel_threshold: the threshold used for cases without a segmentation, if any.
        threshold_source: ``"segmentation"`` (every case's own), ``"voxel_threshold"``,
            ``"segmentation+voxel_threshold"`` (mixed) or ``"none"`` (no calibrated Dice).
        masked_cases: how many cases had a brain mask (0: all voxels counted).
        notes: plain-language caveats (undefined values, voxels outside masks, ...).
    """

    overall: GroupMetrics
    groups: dict[str, GroupMetrics] = field(default_factory=dict)
    cases: tuple[CaseMetrics, ...] = ()
    voxel_threshold: float | None = None
    threshold_source: str = "none"
    masked_cases: int = 0
    notes: tuple[str, ...] = ()

    @property
    def mask_description(self) -> str:
        """How voxels were selected, in words."""
        n = len(self.cases)
        if self.masked_cases == 0:
            return "none (background voxels counted: optimistic)"
        if self.masked_cases == n:
            return "voxels inside the brain masks"
        return (f"brain masks for {self.masked_cases} of {n} scans (background voxels of the "
                "others counted: optimistic)")

    @property
    def mask_warning(self) -> str | None:
        """What counting voxels without brain masks does to the numbers (``None`` when
        every scan had a mask)."""
        n = len(self.cases)
        if self.masked_cases >= n:
            return None
        which = "no scan has" if self.masked_cases == 0 else f"{n - self.masked_cases} of {n} scans have"
        return (f"{which} a brain mask: background voxels are counted, which makes voxel "
                "AUROC/AUPRC optimistic (easy true negatives) and the voxel FPR low; give brain "
                "masks (--masks DIR, or a 'mask' per datalist entry)")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (NaN written as ``null``) with explicitly named metrics."""
        return {
            "warnings": [self.mask_warning] if self.mask_warning else [],
            "overall": self.overall.to_dict(),
            "groups": {name: g.to_dict() for name, g in self.groups.items()},
            "cases": [c.to_dict() for c in self.cases],
            "voxel_threshold": nan_to_none(self.voxel_threshold),
            "threshold_source": self.threshold_source,
            "masks": self.mask_description,
            "masked_cases": self.masked_cases,
            "oracle_note": "oracle_* values pick the threshold on the labels: an optimistic "
            "upper bound, not a deployable result",
            "notes": list(self.notes),
        }

    def table(self) -> str:
        """An aligned, Markdown-compatible text table (one row per group, then 'all')."""
        header = ["group", "scans (lesion/healthy)", "voxel AUROC", "voxel AUPRC",
                  "Dice dataset-wise", "Dice per-scan (mean ± std)", "voxel FPR",
                  "oracle Dice dataset-wise",
                  "oracle threshold", "scan AUROC"]
        rows = [_table_row(name, g) for name, g in self.groups.items()]
        rows.append(_table_row("all", self.overall))
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                      enumerate(zip(cells, widths))]
            return "| " + " | ".join(padded) + " |"

        rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in
                              enumerate(widths)) + "|"
        lines = [f"WARNING: {self.mask_warning}"] if self.mask_warning else []
        lines += [line(header), rule, *(line(r) for r in rows), ""]
        thr = {
            "segmentation": "each scan's segmentation file",
            "voxel_threshold": f"anomaly map > {_fmt_threshold(self.voxel_threshold)}",
            "segmentation+voxel_threshold": "segmentation files where present, else anomaly map > "
            f"{_fmt_threshold(self.voxel_threshold)}",
            "none": "none given: no calibrated Dice",
        }[self.threshold_source]
        lines.append(f"voxels: {self.mask_description}")
        lines.append(f"calibrated threshold: {thr} (Dice and voxel FPR use it)")
        lines.append(
            "oracle: threshold chosen on the labels (optimistic upper bound, not deployable)"
        )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _fmt_threshold(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.6g}"


def _table_row(name: str, g: GroupMetrics) -> list[str]:
    if math.isfinite(g.dice_per_scan_mean):
        per_scan = f"{g.dice_per_scan_mean:.3f} ± {g.dice_per_scan_std:.3f}"
    else:
        per_scan = "n/a"
    return [
        name,
        f"{g.n_scans} ({g.n_lesion_scans}/{g.n_healthy_scans})",
        _fmt(g.voxel.auroc),
        _fmt(g.voxel.auprc),
        _fmt(g.dice_dataset_wise),
        per_scan,
        _fmt(g.voxel_fpr, 4),  # calibrated FPRs are small (e.g. 0.05)
        _fmt(g.oracle.dice),
        _fmt_threshold(g.oracle.threshold),
        _fmt(g.scan.auroc),
    ]


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class _Counts:
    """Confusion counts of one case at the calibrated threshold (all None without one)."""

    tp: int | None
    fp: int | None
    fn: int | None


def _case_pass(
    c: Case, voxel_threshold: float | None, *, use_segmentation: bool
) -> tuple[np.ndarray, np.ndarray, CaseMetrics, _Counts]:
    """A compact case's scores (float32) and labels (bool), its metrics and counts."""
    scores, labels = c.anomaly_map, c.truth
    n_lesion = int(np.count_nonzero(labels))
    if use_segmentation and c.segmentation is not None:
        pred = c.segmentation
    elif voxel_threshold is not None:
        pred = scores > voxel_threshold
    else:
        pred = None
    if pred is None:
        counts = _Counts(None, None, None)
        metrics = CaseMetrics(c.name, c.group, int(scores.size), n_lesion, None, None, None,
                              c.score)
    else:
        tp = int(np.count_nonzero(pred & labels))
        n_pred = int(np.count_nonzero(pred))
        counts = _Counts(tp, n_pred - tp, n_lesion - tp)
        metrics = CaseMetrics(c.name, c.group, int(scores.size), n_lesion, n_pred, tp,
                              dice_from_counts(tp, n_pred - tp, n_lesion - tp), c.score)
    return scores, labels, metrics, counts


def _group_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    metrics: Sequence[CaseMetrics],
    counts: Sequence[_Counts],
    have_threshold: bool,
) -> GroupMetrics:
    curve = confusion_curve(scores, labels)  # one sort serves AUROC, AUPRC and the oracle
    voxel = rank_from_curve(curve)
    oracle = oracle_from_curve(curve)
    del curve
    lesion = [m for m in metrics if m.has_lesion]
    healthy = [m for m in metrics if not m.has_lesion]
    if have_threshold:
        tp = sum(c.tp for c in counts)  # type: ignore[misc]
        fp = sum(c.fp for c in counts)  # type: ignore[misc]
        fn = sum(c.fn for c in counts)  # type: ignore[misc]
        negatives = voxel.n_neg
        dataset_wise = dice_from_counts(tp, fp, fn) if tp + fn > 0 else NAN
        precision = tp / (tp + fp) if tp + fp else NAN
        recall = tp / (tp + fn) if tp + fn else NAN
        fpr = fp / negatives if negatives else NAN
        per_scan = np.array([m.dice for m in lesion], dtype=np.float64)
        mean = float(per_scan.mean()) if per_scan.size else NAN
        std = float(per_scan.std(ddof=0)) if per_scan.size else NAN
    else:
        dataset_wise = mean = std = precision = recall = fpr = NAN
    scored = [m for m in metrics if m.score is not None]
    if not scored:
        scan = RankMetrics(NAN, NAN, 0, 0, "no scan scores: scan-level AUROC not computed")
    else:
        scan = rank_metrics(np.array([m.score for m in scored], dtype=np.float64),
                            np.array([m.has_lesion for m in scored], dtype=bool))
    return GroupMetrics(
        n_scans=len(metrics),
        n_lesion_scans=len(lesion),
        n_healthy_scans=len(healthy),
        voxel=voxel,
        dice_dataset_wise=dataset_wise,
        dice_per_scan_mean=mean,
        dice_per_scan_std=std,
        voxel_precision=precision,
        voxel_recall=recall,
        voxel_fpr=fpr,
        oracle=oracle,
        scan=scan,
    )


def evaluate_cases(
    cases: Sequence[Case], *, voxel_threshold: float | None = None
) -> EvaluationReport:
    """Voxel, Dice, oracle and scan-level metrics of anomaly maps against ground truth.

    Voxel AUROC/AUPRC and the oracle Dice pool every scan's voxels inside its mask.
    Dice at the calibrated threshold uses each case's ``segmentation`` when given, else
    ``anomaly_map > voxel_threshold``; it is reported both dataset-wise (pooled counts)
    and per scan (mean ± std over scans with lesions). If some case has neither a
    segmentation nor a threshold, no calibrated Dice is reported (a partial pool would
    mislead). Scan-level AUROC compares the scores of scans with lesions against those
    of healthy scans (empty truth inside the mask). Cases with a ``group`` also get
    per-group metrics.

    Args:
        cases: the scans; each case's arrays share one grid (cases may differ).
        voxel_threshold: the calibrated voxel threshold (e.g. ``voxel_threshold`` of the
            JSON ``medidiff calibrate`` writes), for cases without a segmentation.

    Returns:
        An :class:`EvaluationReport`.

    Raises:
        DataError: no cases, or two cases with the same name.

    Example:
        >>> import numpy as np
        >>> truth = np.zeros((4, 4, 4), bool); truth[1:3, 1:3, 1:3] = True
        >>> sick = Case("a", truth.astype(np.float32), truth, score=2.0)
        >>> well = Case("b", np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), bool), score=1.0)
        >>> report = evaluate_cases([sick, well], voxel_threshold=0.5)
        >>> report.overall.voxel.auroc, report.overall.dice_dataset_wise, report.overall.scan.auroc
        (1.0, 1.0, 1.0)
    """
    cases = list(cases)
    voxel_threshold = _check_cases(cases, voxel_threshold)
    source, notes = _threshold_source(cases, voxel_threshold)
    have_threshold = source != "none"
    pooled = _pool(cases, voxel_threshold if have_threshold else None, have_threshold)
    overall = _group_metrics(pooled.scores, pooled.labels, pooled.metrics, pooled.counts,
                             have_threshold)
    groups: dict[str, GroupMetrics] = {}
    if any(c.group for c in cases):
        for key in sorted({c.group or "ungrouped" for c in cases}):
            idx = [i for i, c in enumerate(cases) if (c.group or "ungrouped") == key]
            groups[key] = _group_metrics(
                np.concatenate([pooled.scores[pooled.part(i)] for i in idx]),
                np.concatenate([pooled.labels[pooled.part(i)] for i in idx]),
                [pooled.metrics[i] for i in idx], [pooled.counts[i] for i in idx],
                have_threshold,
            )
    notes += _notes(overall, pooled, len(cases))
    return EvaluationReport(
        overall=overall,
        groups=groups,
        cases=tuple(pooled.metrics),
        voxel_threshold=voxel_threshold,
        threshold_source=source,
        masked_cases=sum(c.mask is not None for c in cases),
        notes=tuple(notes),
    )


def _check_cases(cases: Sequence[Case], voxel_threshold: float | None) -> float | None:
    """Refuse no cases, repeated names and a non-finite threshold; the threshold as float."""
    if not cases:
        raise DataError("no cases to evaluate")
    names = [c.name for c in cases]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise DataError(f"case names must be unique; repeated: {', '.join(duplicated)}")
    if voxel_threshold is not None:
        voxel_threshold = float(voxel_threshold)
        if not math.isfinite(voxel_threshold):
            raise DataError(f"voxel_threshold must be a finite number; got {voxel_threshold}")
    return voxel_threshold


def _threshold_source(cases: Sequence[Case], voxel_threshold: float | None
                      ) -> tuple[str, list[str]]:
    """Where the calibrated segmentation comes from, and a note when it cannot be pooled."""
    n_seg = sum(c.segmentation is not None for c in cases)
    if n_seg == len(cases):
        source = "segmentation"
    elif voxel_threshold is not None:
        source = "voxel_threshold" if n_seg == 0 else "segmentation+voxel_threshold"
    else:
        source = "none"
    notes: list[str] = []
    if source == "none" and n_seg:
        notes.append(f"only {n_seg} of {len(cases)} scans have a segmentation and no voxel "
                     "threshold was given: calibrated Dice is not reported")
    return source, notes


@dataclass(frozen=True, eq=False)
class _Pooled:
    """Every case's masked voxels in one array (case ``i`` at ``part(i)``), with its metrics."""

    scores: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    metrics: list[CaseMetrics]
    counts: list[_Counts]
    outside: int

    def part(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))


def _pool(cases: Sequence[Case], threshold: float | None, use_segmentation: bool) -> _Pooled:
    """The pooled arrays (float32 scores, bool labels), allocated once from the mask sizes
    and filled case by case, never concatenated."""

    def selected(case: Case) -> int:
        return case.anomaly_map.size if case.mask is None else int(np.count_nonzero(case.mask))

    offsets = np.concatenate([[0], np.cumsum([selected(c) for c in cases])]).astype(np.int64)
    pooled = _Pooled(np.empty(int(offsets[-1]), dtype=np.float32),
                     np.empty(int(offsets[-1]), dtype=bool), offsets, [], [], 0)
    outside = 0
    for i, case in enumerate(cases):
        compact = case.compact()
        scores, labels, metrics, counts = _case_pass(compact, threshold,
                                                     use_segmentation=use_segmentation)
        pooled.scores[pooled.part(i)] = scores
        pooled.labels[pooled.part(i)] = labels
        pooled.metrics.append(metrics)
        pooled.counts.append(counts)
        outside += compact.lesion_voxels_outside_mask
    return replace(pooled, outside=outside)


def _notes(overall: GroupMetrics, pooled: _Pooled, n_cases: int) -> list[str]:
    """What the report must say about what it could not count or compute."""
    notes = []
    if pooled.outside:
        notes.append(f"{pooled.outside} lesion voxels lie outside the brain masks and are not "
                     "counted")
    if overall.voxel.note:
        notes.append(f"voxel metrics: {overall.voxel.note}")
    if overall.n_lesion_scans == 0:
        notes.append("no scan has a lesion: Dice is undefined")
    scan_note = overall.scan.note
    n_scored = sum(m.score is not None for m in pooled.metrics)
    if scan_note and n_scored:
        notes.append(f"scan-level AUROC: {scan_note} (needs scans with lesions and healthy scans)")
    elif n_scored and n_scored < n_cases:
        notes.append(
            f"scan-level AUROC uses the {n_scored} of {n_cases} scans that have a score"
        )
    return notes
