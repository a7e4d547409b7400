"""Benchmark the anomaly-detection methods side by side on sample_data's labelled splits.

For every method (``anoddpm``, ``ddim``, ``x0``, ``patched``, ``ensemble``, ``multi``,
``thor``, and a trivial ``baseline``) in one run:

1. thresholds are calibrated on healthy scans only (``sample_data/val``, with their brain
   masks), exactly as ``medidiff calibrate`` does, at two targets: the default one
   (``--target``, ``--max-fp-ml``, ``--min-component-ml``; by default the false-positive
   volume target chosen on the validation split) and the classic 5 % voxel FPR
   (``--fpr``), both from the same healthy maps;
2. the scans of each ``--splits`` split (default ``validation_lesions``, where settings are
   tuned, then ``test``, read only to report) are scored as ``medidiff anomaly`` does, and
   evaluated **on the native grid** (what users get) **inside the brain masks** with
   :mod:`medidiff.anomaly.metrics`: pooled voxel AUROC and AUPRC (overall and per lesion
   kind), dataset-wise Dice at each calibrated threshold (pooled TP/FP/FN, Baur et al.
   2021), the **oracle** dataset-wise Dice (threshold chosen on the labels: an optimistic
   bound), and the voxel FPR actually reached;
3. cost: network evaluations per volume (network inputs, i.e. slices for a 2D model,
   counted) and seconds per volume (preprocessing to native outputs, this machine).

``anoddpm`` (251 network evaluations per slice) is the slow reference: it runs on a
stratified subset of the last split (``--anoddpm-limit``, one scan per kind in turn) and
calibrates on fewer healthy scans (``--anoddpm-calib-limit``); a second table compares
every method on exactly that subset.

The **baseline** (:class:`medidiff.anomaly.baseline.IntensityBaseline`) uses no network: its
"reconstruction" is one number, the median intensity of the healthy calibration scans'
brain voxels after the checkpoint's own preprocessing; it then goes through the identical
post-processing and calibration. Whatever a diffusion method gains over it is what the
model learnt about healthy anatomy.

Usage:
    python pipelines/benchmark_anomaly.py --methods ddim multi thor baseline
    python pipelines/benchmark_anomaly.py --methods ddim x0 --splits test --limit 8
    python pipelines/benchmark_anomaly.py --methods ddim --seeds 0 1 2   # seed spread
    python pipelines/benchmark_anomaly.py --from-json a.json b.json      # one table of runs

Slow methods can run as separate processes (one ``--out`` each, side by side on several
cores); ``--from-json`` then prints their rows as one table, refusing files that used
different weights, data or calibration settings.

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
sys.path.insert(0, str(ROOT))
from medidiff.constants import CALIBRATION_DEFAULTS  # noqa: E402
ALL_METHODS = ("anoddpm", "ddim", "x0", "patched", "ensemble", "multi", "thor", "baseline")
KINDS = ("tumor", "ms", "stroke")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="model trained on healthy scans, a path or a shipped model's name (default: the "
        "shipped default 2D model, brain_mri_2d_2mm)",
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
        "--splits", nargs="+", default=["validation_lesions", "test"],
        help="labelled splits to score (default validation_lesions test)",
    )
    p.add_argument(
        "--fpr", type=float, default=0.05,
        help="the classic voxel FPR target reported beside the default target (default 0.05)",
    )
    p.add_argument("--target", default=CALIBRATION_DEFAULTS["target"], choices=["voxel-fpr", "fp-volume"])
    p.add_argument("--max-fp-ml", type=float, default=CALIBRATION_DEFAULTS["max_fp_ml"])
    p.add_argument("--min-component-ml", type=float, default=CALIBRATION_DEFAULTS["min_component_ml"])
    p.add_argument("--median-size", type=int, default=None,
                   help="median filter edge in model voxels for every method (default: the size "
                   "stored in the model file, e.g. 11 for brain_mri_2d_2mm, else 9)")
    p.add_argument("--erode", type=int, default=None, help="mask erosion in model voxels (default 2)")
    p.add_argument("--residual", default=None,
                   help="residual for every method (default: each method's own, see DEFAULT_RESIDUALS)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="repeat every method with these noise seeds (mean and spread reported)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: the CPU is shared)"
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default=str(ROOT / "runs" / "benchmark_anomaly.json"), help="JSON results"
    )
    p.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                   help="run nothing: print one table from the JSON files of earlier runs "
                   "(same checkpoint, data and calibration settings)")
    return p.parse_args(argv)


def make_detector(method: str, args: argparse.Namespace, calib: list[Any], loaded: Any) -> Any:
    """The detector of ``method`` on the already loaded model (one set of weights for all);
    ``baseline`` is :class:`medidiff.anomaly.baseline.IntensityBaseline` (no network), its level
    the median brain intensity of the calibration scans."""
    from medidiff.anomaly.detector import AnomalyDetector, MethodConfig
    from medidiff.anomaly.baseline import IntensityBaseline

    from medidiff.anomaly.postprocess import postprocess_for

    sizes = {"median_size": getattr(args, "median_size", None), "erode": getattr(args, "erode", None)}
    if method == "baseline":  # no reconstructions: --residual does not apply
        return IntensityBaseline.from_healthy(loaded.checkpoint, calib,
                                              postprocess_for(loaded.checkpoint.extra, method, **sizes))
    t_start = args.anoddpm_t if method == "anoddpm" else None
    post = postprocess_for(loaded.checkpoint.extra, method, residual=getattr(args, "residual", None), **sizes)
    return AnomalyDetector(
        loaded,
        MethodConfig(method, t_start=t_start),
        post,
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
    classic_threshold: float
    calib_scans: int
    calib_seconds: float
    cases: dict[str, list[Any]] = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=dict)
    evaluations: dict[str, list[int]] = field(default_factory=dict)
    nfe_per_input: int = 0


def run_method(
    method: str, args: argparse.Namespace, val: list[Any], splits: dict[str, list[Any]],
    loaded: Any,
) -> MethodRun:
    from medidiff.anomaly.calibration import component_voxels, voxel_ml
    from medidiff.anomaly.runner import calibrate_scans, entry_case, score_scans
    from medidiff.anomaly.thresholds import Thresholds

    calib = val[: args.anoddpm_calib_limit] if method == "anoddpm" else val[: args.calib_limit]
    det = make_detector(method, args, calib, loaded)
    min_component = component_voxels(args.min_component_ml, voxel_ml(det))
    start = time.perf_counter()
    done = calibrate_scans(
        det, calib, fpr=args.fpr, target=args.target,
        max_fp_ml=args.max_fp_ml if args.target == "fp-volume" else None,
        min_component=min_component, allow_few=True,
    )
    thresholds = done.thresholds
    classic = Thresholds.from_healthy(det, done.maps, thresholds.scan_scores, args.fpr)
    run = MethodRun(
        name=method,
        config=det.method.to_dict()
        if method != "baseline"
        else {"method": "baseline", "healthy_median": det.level},
        thresholds={**thresholds.to_dict(), "scan_scores": None},
        classic_threshold=classic.voxel_threshold,
        calib_scans=len(calib),
        calib_seconds=time.perf_counter() - start,
        nfe_per_input=det.nfe_per_input,
    )
    print(
        f"[{method}] calibrated on {len(calib)} healthy scans in {run.calib_seconds:.0f} s: "
        f"voxel threshold {thresholds.voxel_threshold:.4g} ({thresholds.target}), "
        f"{classic.voxel_threshold:.4g} at {args.fpr:g} voxel FPR",
        flush=True,
    )
    for split, entries in splits.items():
        run.cases[split], run.seconds[split], run.evaluations[split] = [], [], []

        def record(outcome: Any, split: str = split) -> None:
            row = outcome.row
            run.cases[split].append(outcome.extra)
            run.seconds[split].append(row["seconds"])
            run.evaluations[split].append(row["network_evaluations"])
            print(
                f"[{method}/{split}] {row['name']}: score {row['score']:.4g}, "
                f"{row['network_evaluations']} network evaluations, {row['seconds']:.1f} s",
                flush=True,
            )

        score_scans(det, entries, thresholds=thresholds, on_result=entry_case, errors="raise",
                    on_each=record)
    return run


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def summarise(run: MethodRun, split: str, names: set[str] | None = None) -> dict[str, Any]:
    """Metrics of one method on one split: the default target's segmentations (component
    rule included) and the classic voxel-FPR threshold (no components) side by side."""
    from dataclasses import replace as _replace

    from medidiff.anomaly.metrics import evaluate_cases

    keep = [i for i, c in enumerate(run.cases[split]) if names is None or c.name in names]
    cases = [run.cases[split][i] for i in keep]
    report = evaluate_cases(cases)  # each case's segmentation: the default target
    classic = evaluate_cases([_replace(c, segmentation=None) for c in cases],
                             voxel_threshold=run.classic_threshold)
    o = report.overall
    groups = {k: {"voxel_auprc": g.voxel.auprc, "voxel_auroc": g.voxel.auroc,
                  "dice_dataset_wise": g.dice_dataset_wise, "oracle_dice": g.oracle.dice}
              for k, g in report.groups.items()}
    return {
        "scans": len(keep),
        "network_evaluations_per_volume": float(np.mean([run.evaluations[split][i] for i in keep])),
        "nfe_per_slice": run.nfe_per_input,
        "seconds_per_volume": float(np.mean([run.seconds[split][i] for i in keep])),
        "voxel_auroc": o.voxel.auroc,
        "voxel_auprc": o.voxel.auprc,
        "dice_dataset_wise": o.dice_dataset_wise,
        "voxel_fpr": o.voxel_fpr,
        "dice_classic": classic.overall.dice_dataset_wise,
        "voxel_fpr_classic": classic.overall.voxel_fpr,
        "oracle_dice": o.oracle.dice,
        "oracle_threshold": o.oracle.threshold,
        "scan_auroc": o.scan.auroc,
        "report": report.to_dict(),
        "groups": groups,
    }


def table(rows: list[tuple[str, str, dict[str, Any]]], args: argparse.Namespace) -> str:
    target = (f"Dice @{args.max_fp_ml:g} ml FP, >= {args.min_component_ml:g} ml components"
              if args.target == "fp-volume" else f"Dice @{args.fpr:g} FPR")
    header = ["method", "split", "scans", "nfe/slice", "evals/volume", "s/volume", "AUROC",
              "AUPRC", *[f"AUPRC {k}" for k in KINDS], target, "voxel FPR",
              f"Dice @{args.fpr:g} FPR", "oracle Dice", "Dice / oracle"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, split, s in rows:
        g = s["groups"]
        ratio = (s["dice_dataset_wise"] / s["oracle_dice"]
                 if s["oracle_dice"] and math.isfinite(s["oracle_dice"]) else float("nan"))
        cells = [
            name, split, str(s["scans"]), str(s["nfe_per_slice"]),
            f"{s['network_evaluations_per_volume']:.0f}", f"{s['seconds_per_volume']:.1f}",
            _f(s["voxel_auroc"]), _f(s["voxel_auprc"]),
            *[_f(g[k]["voxel_auprc"]) if k in g else "n/a" for k in KINDS],
            _f(s["dice_dataset_wise"]), _f(s["voxel_fpr"], 4), _f(s["dice_classic"]),
            _f(s["oracle_dice"]), _f(ratio, 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def anoddpm_comparison(runs: dict[str, MethodRun], results: dict[str, Any], split: str,
                       args: argparse.Namespace) -> dict[str, Any] | None:
    """Every method on the scans anoddpm scored (printed, and kept in ``results``), and the
    target: the fast default within 0.02 AUPRC of anoddpm at >= 20x fewer evaluations."""
    anoddpm = next(r for r in runs.values() if r.name == "anoddpm")
    subset = {c.name for c in anoddpm.cases[split]}
    sub_rows = []
    for label, run in runs.items():
        if subset <= {c.name for c in run.cases.get(split, [])}:
            s = summarise(run, split, subset)
            sub_rows.append((label, split, s))
            results[label]["anoddpm_subset"] = s
    print(f"\n## Same {len(subset)} {split} scans as anoddpm ({', '.join(sorted(subset))})\n")
    print(table(sub_rows, args))
    return gap_to_anoddpm(sub_rows)


def method_of(label: str) -> str:
    """The method of a row label such as ``ddim (seed 1) (subset, calibrated on 2)``."""
    return label.split(" ")[0]


def gap_to_anoddpm(rows: list[tuple[str, str, dict[str, Any]]]) -> dict[str, Any] | None:
    """The target on rows over one set of scans: the fast default (``ddim`` rows, one per
    seed) within 0.02 voxel AUPRC of ``anoddpm`` (mean over its seed rows) at >= 20x fewer
    network evaluations. Printed; ``None`` without rows of both methods."""
    fast = [s for label, _, s in rows if method_of(label) == "ddim"]
    slow = [s for label, _, s in rows if method_of(label) == "anoddpm"]
    if not fast or not slow:
        return None
    a_auprc = float(np.mean([s["voxel_auprc"] for s in slow]))
    d_auprc = float(np.mean([s["voxel_auprc"] for s in fast]))
    a_evals = float(np.mean([s["network_evaluations_per_volume"] for s in slow]))
    d_evals = float(np.mean([s["network_evaluations_per_volume"] for s in fast]))
    ratio = a_evals / max(d_evals, 1)
    ok = ratio >= 20 and d_auprc >= a_auprc - 0.02

    def spread(group: list[dict[str, Any]]) -> str:
        vals = [s["voxel_auprc"] for s in group]
        return f"{np.mean(vals):.3f}" + (f" +- {np.std(vals):.3f}" if len(vals) > 1 else "")

    print(
        f"\nddim ({len(fast)} seed(s)) uses {ratio:.1f}x fewer network evaluations than anoddpm "
        f"({len(slow)} seed(s)); voxel AUPRC {spread(fast)} (ddim) vs {spread(slow)} "
        f"(anoddpm): target (>= 20x fewer, within 0.02 AUPRC) {'MET' if ok else 'NOT met'}"
    )
    return {"nfe_ratio_anoddpm_over_ddim": ratio, "auprc_anoddpm_mean": a_auprc,
            "auprc_anoddpm": [s["voxel_auprc"] for s in slow],
            "auprc_ddim_mean": d_auprc, "auprc_ddim": [s["voxel_auprc"] for s in fast],
            "seeds": len(fast), "seeds_anoddpm": len(slow), "target_met": bool(ok)}


def merged_gap_to_anoddpm(rows: list[tuple[str, str, dict[str, Any]]]) -> None:
    """``gap_to_anoddpm`` for merged runs: per split, the anoddpm rows and the ddim rows
    that scored exactly anoddpm's scans (e.g. a ``--limit 4 --seeds 0 1 2`` ddim run)."""
    for split in dict.fromkeys(sp for _, sp, _ in rows):
        slow = [r for r in rows if r[1] == split and method_of(r[0]) == "anoddpm"]
        if not slow:
            continue
        names = set(slow[0][2]["_names"] or [])
        same = [r for r in rows if r[1] == split and set(r[2]["_names"] or []) == names]
        print(f"\n## ddim against anoddpm on the same {len(names)} {split} scans "
              f"({', '.join(sorted(names))})")
        if gap_to_anoddpm(same) is None:
            print("no ddim run scored exactly these scans (run ddim with the same --limit)")


# settings that must agree for rows of different runs to share one table
SHARED_SETTINGS = ("data", "calib_limit", "fpr", "target", "max_fp_ml", "min_component_ml",
                   "median_size", "erode", "residual")


def merged_rows(paths: list[str]) -> tuple[list[tuple[str, str, dict[str, Any]]], dict[str, Any]]:
    """The rows of earlier runs' JSON files, in file order, and their common settings.

    A method may come from several files (e.g. one per split); rows are grouped by method.
    Raises ``ValueError`` when the files used different weights (sha256), data or
    calibration settings, or when two files hold the same method on the same split."""
    import json

    rows: list[tuple[str, str, dict[str, Any]]] = []
    first: dict[str, Any] | None = None
    seen: dict[tuple[str, str], str] = {}
    for path in paths:
        try:
            run = json.loads(Path(path).read_text())
            sha, settings, methods = run["checkpoint"]["sha256"], run["settings"], run["methods"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a benchmark_anomaly JSON ({e})") from None
        if first is None:
            first = {"sha256": sha, "step": run["checkpoint"].get("step"), "settings": settings,
                     "calibration_scans": run.get("calibration_scans", [])}
        elif sha != first["sha256"]:
            raise ValueError(f"{path}: checkpoint sha256 {sha[:12]} differs from "
                             f"{first['sha256'][:12]} of {paths[0]}")
        else:
            for key in SHARED_SETTINGS:
                if settings.get(key) != first["settings"].get(key):
                    raise ValueError(f"{path}: setting {key}={settings.get(key)!r} differs from "
                                     f"{first['settings'].get(key)!r} of {paths[0]}")
        for label, result in methods.items():
            for split, s in result["splits"].items():
                if (label, split) in seen:
                    raise ValueError(f"{path}: method {label!r} on {split} also in {seen[label, split]}")
                seen[label, split] = path
                names = s.get("scans")
                rows.append((label, split, {**s, "scans": len(names) if isinstance(names, list) else names,
                                            "_names": names if isinstance(names, list) else None,
                                            "_calibrated_on": result.get("calibration_scans")}))
    assert first is not None
    order = list(dict.fromkeys(label for label, _, _ in rows))
    rows.sort(key=lambda row: order.index(row[0]))  # grouped by method, stable within
    full = {split: max(s["scans"] for _, sp, s in rows if sp == split) for _, split, _ in rows}
    healthy = len(first["calibration_scans"])
    named = []
    for label, split, s in rows:
        calibrated_on = s.pop("_calibrated_on")
        if s["scans"] < full[split] or (calibrated_on is not None and calibrated_on < healthy):
            label = f"{label} (subset, calibrated on {calibrated_on})"
        named.append((label, split, s))
    return named, first


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        try:
            rows, common = merged_rows(args.from_json)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for key in ("fpr", "target", "max_fp_ml", "min_component_ml"):
            setattr(args, key, common["settings"][key])
        print(f"## Anomaly methods (native grid, inside brain masks; checkpoint step {common['step']}, "
              f"sha256 {common['sha256'][:12]}; thresholds from {len(common['calibration_scans'])} "
              f"healthy validation scans; {len(args.from_json)} runs)\n")
        print(table(rows, args))
        merged_gap_to_anoddpm(rows)
        return 0
    torch.set_num_threads(args.threads)
    from medidiff.models.checkpoint import build_model_from_checkpoint
    from medidiff.data.datalist import load_datalist, stratified_by_kind
    from medidiff.runtime.distributed import resolve_device
    from medidiff.io import write_json_atomic
    from medidiff.models.pretrained import resolve_checkpoint

    args.checkpoint = str(resolve_checkpoint(args.checkpoint))
    # loaded once: every method uses the same weights even if training rewrites the file
    loaded = build_model_from_checkpoint(args.checkpoint, resolve_device(args.device))
    ckpt = loaded.checkpoint
    step = ckpt.extra.get("step")
    val = load_datalist(args.data, split="validation")
    val = val[: args.calib_limit] if args.calib_limit else val
    splits = {name: stratified_by_kind(load_datalist(args.data, split=name), args.limit)
              for name in args.splits}
    last = args.splits[-1]
    anoddpm_splits = {last: stratified_by_kind(splits[last], args.anoddpm_limit)}
    print(
        f"checkpoint {args.checkpoint} (training step {step}, sha256 {ckpt.sha256[:12]}); "
        + ", ".join(f"{len(v)} {k} scans" for k, v in splits.items())
        + f"; {len(val)} healthy calibration scans; {args.threads} thread(s)",
        flush=True,
    )

    runs: dict[str, MethodRun] = {}
    rows: list[tuple[str, str, dict[str, Any]]] = []
    results: dict[str, Any] = {}

    def output(comparison: dict[str, Any] | None, complete: bool) -> dict[str, Any]:
        return {
            "checkpoint": {"path": str(args.checkpoint), "sha256": ckpt.sha256, "step": step},
            "settings": {k: v for k, v in vars(args).items()},
            "splits": {k: [e.name for e in v] for k, v in splits.items()},
            "calibration_scans": [e.name for e in val],
            "methods": results,
            "anoddpm_vs_ddim": comparison,
            "complete": complete,
            "baseline": "x_hat = median healthy brain intensity (model grid, global), "
            "same post-processing",
        }

    seeds = args.seeds or [args.seed]
    for method in args.methods:
        for seed in seeds if method != "baseline" else seeds[:1]:
            args.seed = seed
            # a run with another seed than 0 says so, so its rows merge beside seed 0's
            plain = method == "baseline" or (len(seeds) == 1 and seed == 0)
            label = method if plain else f"{method} (seed {seed})"
            run = runs[label] = run_method(method, args, val,
                                           anoddpm_splits if method == "anoddpm" else splits, loaded)
            results[label] = {
                "config": run.config,
                "thresholds": run.thresholds,
                "classic_voxel_threshold": run.classic_threshold,
                "calibration_scans": run.calib_scans,
                "calibration_seconds": run.calib_seconds,
                "splits": {},
            }
            for split in run.cases:
                s = summarise(run, split)
                name = label
                if run.calib_scans < len(val) or len(run.cases[split]) < len(splits[split]):
                    name = f"{label} (subset, calibrated on {run.calib_scans})"
                rows.append((name, split, s))
                results[label]["splits"][split] = {**s, "scans": [c.name for c in run.cases[split]]}
            # every finished method is on disk at once: a run stopped later keeps it
            write_json_atomic(args.out, _jsonable(output(None, complete=False)))

    print()
    print(
        f"## Anomaly methods (native grid, inside brain masks; checkpoint step {step}; "
        f"thresholds from {len(val)} healthy validation scans)\n"
    )
    print(table(rows, args))
    if len(seeds) > 1:
        print("\n## Mean +- std over seeds " + ", ".join(map(str, seeds)) + "\n")
        for method in args.methods:
            for split in args.splits:
                vals = [s["voxel_auprc"] for name, sp, s in rows
                        if method_of(name) == method and sp == split]
                if len(vals) > 1:
                    print(f"{method} / {split}: AUPRC {np.mean(vals):.3f} +- {np.std(vals):.3f} "
                          f"({len(vals)} seeds)")

    comparison = (anoddpm_comparison(runs, results, last, args)
                  if any(r.name == "anoddpm" for r in runs.values()) else None)
    write_json_atomic(args.out, _jsonable(output(comparison, complete=True)))
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
