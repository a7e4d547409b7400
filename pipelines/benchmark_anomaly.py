"""Benchmark the anomaly-detection methods side by side on sample_data's test set.

For every method (``anoddpm``, ``ddim``, ``x0``, ``patched``, ``ensemble``, and a trivial
``baseline``) in one run:

1. thresholds are calibrated on healthy scans only (``sample_data/val``, with their brain
   masks) at ``--fpr`` (5 %), exactly as ``medidiff calibrate`` does;
2. the test scans (tumour, MS, stroke and healthy; with lesion masks and brain masks) are
   scored as ``medidiff anomaly`` does, and evaluated **on the native grid** (what users
   get) **inside the brain masks** with :mod:`medidiff.anomaly.metrics`: pooled voxel AUROC and
   AUPRC, Dice at the calibrated threshold (dataset-wise, i.e. pooled TP/FP/FN, Baur et
   al. 2021; and the mean per-scan Dice over scans with lesions), the **oracle**
   dataset-wise Dice (threshold chosen on the labels: an optimistic bound), the voxel
   FPR actually reached, and scan-level AUROC;
3. cost: network evaluations per volume (network inputs, i.e. slices for a 2D model,
   counted) and seconds per volume (preprocessing to native outputs, this machine).

``anoddpm`` (251 network evaluations per slice) is the slow reference: by default it runs
on a stratified subset of the test scans (``--anoddpm-limit``, one scan per kind in turn)
and calibrates on fewer healthy scans (``--anoddpm-calib-limit``); the table says so, and a
second table compares every method on exactly that subset, which is where the target
"``ddim`` needs >= 20x fewer network evaluations than ``anoddpm`` at equal or better
AUPRC" is checked.

The **baseline** (:class:`medidiff.anomaly.baseline.IntensityBaseline`) uses no network: its
"reconstruction" is one number, the median intensity of the healthy calibration scans'
brain voxels after the checkpoint's own preprocessing (model grid, intensities in [0, 1]);
it then goes through the identical post-processing (L1 residual, brain mask, 5^3 median
filter, eroded mask, top-1 % scan score) and calibration. So its map is a global
intensity-outlier score, |x - median healthy|, median filtered; whatever a diffusion
method gains over it is what the model learnt about healthy anatomy.

Usage:
    python pipelines/benchmark_anomaly.py                                  # all methods
    python pipelines/benchmark_anomaly.py --methods ddim x0 baseline --limit 8
    python pipelines/benchmark_anomaly.py --anoddpm-t 50       # anoddpm at ddim's noise level
    python pipelines/benchmark_anomaly.py --limit 4 --calib-limit 2 --anoddpm-limit 1 \\
        --anoddpm-calib-limit 1 --threads 1 --out runs/benchmark_anomaly.json

Prints Markdown tables and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ALL_METHODS = ("anoddpm", "ddim", "x0", "patched", "ensemble", "baseline")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        default=str(ROOT / "medidiff" / "weights" / "brain_mri_2d.safetensors"),
        help="model trained on healthy scans (default: the shipped brain_mri_2d)",
    )
    p.add_argument(
        "--data",
        default=str(ROOT / "sample_data" / "dataset.json"),
        help="Decathlon dataset.json with 'validation' (healthy) and 'test' splits",
    )
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="test scans per method (stratified by kind; default all)",
    )
    p.add_argument(
        "--calib-limit", type=int, default=None, help="healthy scans for calibration (default all)"
    )
    p.add_argument(
        "--anoddpm-limit",
        type=int,
        default=4,
        help="test scans for anoddpm (stratified; default 4, one per kind)",
    )
    p.add_argument(
        "--anoddpm-calib-limit",
        type=int,
        default=2,
        help="healthy calibration scans for anoddpm (default 2)",
    )
    p.add_argument(
        "--anoddpm-t",
        type=int,
        default=None,
        help="anoddpm's start t (default: the method's own, 250; give ddim's t, 50, for a "
        "comparison at the same noise level)",
    )
    p.add_argument(
        "--fpr", type=float, default=0.05, help="calibration false-positive rate (default 0.05)"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: the CPU is shared)"
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default=str(ROOT / "runs" / "benchmark_anomaly.json"), help="JSON results"
    )
    return p.parse_args(argv)


def make_detector(method: str, args: argparse.Namespace, calib: list[Any], loaded: Any) -> Any:
    """The detector of ``method`` on the already loaded model (one set of weights for all);
    ``baseline`` is :class:`medidiff.anomaly.baseline.IntensityBaseline` (no network), its level
    the median brain intensity of the calibration scans."""
    from medidiff.anomaly.detector import AnomalyDetector, MethodConfig
    from medidiff.anomaly.baseline import IntensityBaseline

    if method == "baseline":
        return IntensityBaseline.from_healthy(loaded.checkpoint, calib)
    t_start = args.anoddpm_t if method == "anoddpm" else None
    return AnomalyDetector(
        loaded,
        MethodConfig(method, t_start=t_start),
        device=args.device,
        batch_size=args.batch_size,
        seed=args.seed,
    )


@dataclass
class MethodRun:
    """What one method produced."""

    name: str
    config: dict[str, Any]
    thresholds: dict[str, Any]
    calib_scans: int
    calib_seconds: float
    cases: list[Any] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    evaluations: list[int] = field(default_factory=list)
    nfe_per_input: int = 0


def run_method(
    method: str, args: argparse.Namespace, val: list[Any], test: list[Any], loaded: Any
) -> MethodRun:
    from medidiff.anomaly.runner import calibrate, entry_case, score_scans

    calib = val[: args.anoddpm_calib_limit] if method == "anoddpm" else val[: args.calib_limit]
    det = make_detector(method, args, calib, loaded)
    start = time.perf_counter()
    thresholds = calibrate(det, calib, fpr=args.fpr)
    run = MethodRun(
        name=method,
        config=det.method.to_dict()
        if method != "baseline"
        else {"method": "baseline", "healthy_median": det.level},
        thresholds={
            "voxel": thresholds.voxel_threshold,
            "scan": thresholds.scan_threshold,
            "num_scans": thresholds.num_scans,
            "num_voxels": thresholds.num_voxels,
        },
        calib_scans=len(calib),
        calib_seconds=time.perf_counter() - start,
        nfe_per_input=det.nfe_per_input,
    )
    print(
        f"[{method}] calibrated on {len(calib)} healthy scans in {run.calib_seconds:.0f} s: "
        f"voxel threshold {thresholds.voxel_threshold:.4g}",
        flush=True,
    )

    def record(outcome: Any) -> None:
        row = outcome.row
        run.cases.append(outcome.extra)
        run.seconds.append(row["seconds"])
        run.evaluations.append(row["network_evaluations"])
        print(
            f"[{method}] {row['name']}: score {row['score']:.4g}, "
            f"{row['network_evaluations']} network evaluations, {row['seconds']:.1f} s",
            flush=True,
        )

    score_scans(det, test, thresholds=thresholds, on_result=entry_case, errors="raise",
                on_each=record)
    return run


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def summarise(run: MethodRun, names: set[str] | None = None) -> dict[str, Any]:
    from medidiff.anomaly.metrics import evaluate_cases

    keep = [i for i, c in enumerate(run.cases) if names is None or c.name in names]
    report = evaluate_cases([run.cases[i] for i in keep], voxel_threshold=run.thresholds["voxel"])
    o = report.overall
    return {
        "scans": len(keep),
        "network_evaluations_per_volume": float(np.mean([run.evaluations[i] for i in keep])),
        "nfe_per_slice": run.nfe_per_input,
        "seconds_per_volume": float(np.mean([run.seconds[i] for i in keep])),
        "voxel_auroc": o.voxel.auroc,
        "voxel_auprc": o.voxel.auprc,
        "dice_dataset_wise": o.dice_dataset_wise,
        "dice_per_scan_mean": o.dice_per_scan_mean,
        "dice_per_scan_std": o.dice_per_scan_std,
        "voxel_fpr": o.voxel_fpr,
        "oracle_dice": o.oracle.dice,
        "oracle_threshold": o.oracle.threshold,
        "scan_auroc": o.scan.auroc,
        "report": report.to_dict(),
        "groups": {
            k: {"voxel_auprc": g.voxel.auprc, "voxel_auroc": g.voxel.auroc}
            for k, g in report.groups.items()
        },
    }


def table(rows: list[tuple[str, dict[str, Any]]], fpr: float) -> str:
    header = [
        "method",
        "scans",
        "nfe/slice",
        "network evals/volume",
        "s/volume",
        "voxel AUROC",
        "voxel AUPRC",
        f"Dice @{fpr:g} FPR (dataset-wise)",
        "Dice per scan",
        "voxel FPR",
        "oracle Dice",
        "scan AUROC",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, s in rows:
        cells = [
            name,
            str(s["scans"]),
            str(s["nfe_per_slice"]),
            f"{s['network_evaluations_per_volume']:.0f}",
            f"{s['seconds_per_volume']:.1f}",
            _f(s["voxel_auroc"]),
            _f(s["voxel_auprc"]),
            _f(s["dice_dataset_wise"]),
            _f(s["dice_per_scan_mean"]),
            _f(s["voxel_fpr"]),
            _f(s["oracle_dice"]),
            _f(s["scan_auroc"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def anoddpm_comparison(runs: dict[str, MethodRun], results: dict[str, Any], fpr: float
                       ) -> dict[str, Any] | None:
    """Every method on the scans anoddpm scored (printed, and kept in ``results``), and the
    ddim-vs-anoddpm target: >= 20x fewer network evaluations at equal or better AUPRC."""
    subset = {c.name for c in runs["anoddpm"].cases}
    sub_rows = []
    for method, run in runs.items():
        if subset <= {c.name for c in run.cases}:
            s = summarise(run, subset)
            sub_rows.append((method, s))
            results[method]["anoddpm_subset"] = s
    print(f"\n## Same {len(subset)} scans as anoddpm ({', '.join(sorted(subset))})\n")
    print(table(sub_rows, fpr))
    subs = dict(sub_rows)
    if "ddim" not in subs:
        return None
    a, d = subs["anoddpm"], subs["ddim"]
    ratio = a["network_evaluations_per_volume"] / max(d["network_evaluations_per_volume"], 1)
    ok = ratio >= 20 and d["voxel_auprc"] >= a["voxel_auprc"]
    print(
        f"\nddim uses {ratio:.1f}x fewer network evaluations than anoddpm; voxel AUPRC "
        f"{_f(d['voxel_auprc'])} (ddim) vs {_f(a['voxel_auprc'])} (anoddpm): target "
        f"(>= 20x fewer at equal or better AUPRC) {'MET' if ok else 'NOT met'}"
    )
    return {
        "nfe_ratio_anoddpm_over_ddim": ratio,
        "auprc_anoddpm": a["voxel_auprc"],
        "auprc_ddim": d["voxel_auprc"],
        "target_met": bool(ok),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from medidiff.models.checkpoint import build_model_from_checkpoint
    from medidiff.data.datalist import load_datalist, stratified_by_kind
    from medidiff.runtime.distributed import resolve_device
    from medidiff.io import write_json_atomic

    # loaded once: every method uses the same weights even if training rewrites the file
    loaded = build_model_from_checkpoint(args.checkpoint, resolve_device(args.device))
    ckpt = loaded.checkpoint
    step = ckpt.extra.get("step")
    val = load_datalist(args.data, split="validation")
    test_all = load_datalist(args.data, split="test")
    test = stratified_by_kind(test_all, args.limit)
    anoddpm_test = stratified_by_kind(test, args.anoddpm_limit)  # every kind, in turn
    val = val[: args.calib_limit] if args.calib_limit else val
    print(
        f"checkpoint {args.checkpoint} (training step {step}, sha256 {ckpt.sha256[:12]}); "
        f"{len(test)} test scans, {len(val)} healthy calibration scans; {args.threads} thread(s)",
        flush=True,
    )

    runs: dict[str, MethodRun] = {}
    for method in args.methods:
        runs[method] = run_method(
            method, args, val, anoddpm_test if method == "anoddpm" else test, loaded
        )

    rows, results = [], {}
    for method, run in runs.items():
        s = summarise(run)
        label = method
        if len(run.cases) < len(test) or run.calib_scans < len(val):
            label = f"{method} (subset: {len(run.cases)} scans, calibrated on {run.calib_scans})"
        rows.append((label, s))
        results[method] = {
            "config": run.config,
            "thresholds": run.thresholds,
            "calibration_scans": run.calib_scans,
            "calibration_seconds": run.calib_seconds,
            "all_scans": s,
            "scans": [c.name for c in run.cases],
        }
    print()
    print(
        f"## Anomaly methods on {len(test)} test scans (native grid, inside brain masks; "
        f"checkpoint step {step})\n"
    )
    print(table(rows, args.fpr))

    comparison = anoddpm_comparison(runs, results, args.fpr) if "anoddpm" in runs else None
    out = {
        "checkpoint": {"path": str(args.checkpoint), "sha256": ckpt.sha256, "step": step},
        "settings": {k: v for k, v in vars(args).items()},
        "test_scans": [e.name for e in test],
        "calibration_scans": [e.name for e in val],
        "methods": results,
        "anoddpm_vs_ddim": comparison,
        "baseline": "x_hat = median healthy brain intensity (model grid, global), "
        "same post-processing",
    }
    write_json_atomic(args.out, _jsonable(out))
    print(f"\nwrote {args.out}")
    return 0


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (np.floating, np.integer)):
        return _jsonable(obj.item())
    return obj


if __name__ == "__main__":
    sys.exit(main())
