"""Anomaly thresholds from healthy scans: a voxel threshold at a target, a scan threshold.

Scores healthy scans exactly as 'medidiff anomaly' would (same checkpoint, method and
post-processing options) and writes a thresholds JSON with

  voxel_threshold  --target voxel-fpr: the (1 - fpr) quantile of the post-processed healthy
                   voxel scores inside the (eroded) brain masks, pooled over all scans, on
                   the model grid, so about fpr of every healthy brain is flagged (at 5 %
                   tens of ml: mostly false positives next to a typical lesion);
                   --target fp-volume: the lowest threshold at which a healthy scan's
                   segmentation holds at most --max-fp-ml ml on average, after dropping
                   components under --min-component-ml (both rules also apply to the
                   segmentations 'medidiff anomaly' writes with these thresholds)
  scan_threshold   the (1 - fpr) quantile of the healthy per-scan scores (inverted
                   empirical CDF: the ceil((1 - fpr) n)-th smallest of n scores; with fewer
                   than 1/fpr scans, i.e. 20 at 5 %, that is the largest healthy score)

together with the checkpoint's sha256, the full method and post-processing config, fpr,
the numbers of scans and voxels, the medidiff version, and what a new healthy scan should
expect: each calibration scan left out in turn (voxel FPR and false-positive ml it meets
with a threshold from the others) and the scan-level FPR interval for this many scans.
Fewer than 5 healthy scans are refused unless --allow-few. 'medidiff anomaly --thresholds'
refuses the file with another checkpoint or other method options. Only healthy scans
belong here: thresholds chosen on labelled anomalies give optimistic results. A healthy
file that cannot be read or scored is reported on one line and left out; the thresholds
are still written from the others, and the exit status is 4 (1, with nothing written, when
no file could be scored). --workers scores scans in parallel processes (same numbers).

Example:
    medidiff calibrate --checkpoint runs/brain_mri_2d/model.safetensors \\
        --healthy sample_data/dataset.json --split validation --out thresholds.json --fpr 0.05
    medidiff calibrate --healthy sample_data/dataset.json --split validation \
        --out thresholds.json --target fp-volume --max-fp-ml 2 --min-component-ml 0.5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from medidiff.cli.commands.anomaly import add_model_arguments
from medidiff.constants import CALIBRATION_DEFAULTS

#: The split of a datalist ``calibrate`` reads when --split is not given: the healthy
#: validation scans (never the training scans, which the model reconstructs best).
CALIBRATION_SPLIT = "validation"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--healthy", nargs="+", required=True, help="healthy scans: files, folder, glob or datalist"
    )
    p.add_argument("--out", required=True, help="thresholds JSON to write")
    d = CALIBRATION_DEFAULTS
    p.add_argument(
        "--fpr", type=float, default=None,
        help="target false-positive rate (default 0.05): of voxels under --target voxel-fpr, "
        "always of scans for the scan threshold; giving --fpr alone selects --target voxel-fpr",
    )
    p.add_argument(
        "--target",
        choices=["voxel-fpr", "fp-volume"],
        default=None,
        help=f"what the voxel threshold holds fixed on healthy scans: the false-positive volume "
        f"--max-fp-ml per scan (fp-volume, the default: {d['max_fp_ml']:g} ml, components "
        f"under {d['min_component_ml']:g} ml dropped; chosen on the validation split) or the "
        "voxel false-positive rate --fpr (voxel-fpr, the classic 5 %%)",
    )
    p.add_argument(
        "--max-fp-ml",
        type=float,
        default=None,
        help=f"fp-volume: ml of segmentation allowed per healthy scan on average "
        f"(default {d['max_fp_ml']:g})",
    )
    p.add_argument(
        "--min-component-ml",
        type=float,
        default=None,
        help="segmentations drop connected components smaller than this, in ml (default "
        f"{d['min_component_ml']:g} with fp-volume, 0 with voxel-fpr)",
    )
    p.add_argument(
        "--allow-few",
        action="store_true",
        help="accept fewer than 5 healthy scans (the thresholds are then unreliable)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_model_arguments(p)


def run(args: argparse.Namespace) -> int:
    from medidiff.anomaly.runner import calibrate_scans, load_entries
    from medidiff.cli.commands.anomaly import (
        EXIT_SOME_FAILED,
        build_detector,
        configs_from_args,
        datalist_split,
        require_checkpoint,
    )
    from medidiff.runtime.distributed import cleanup, init_distributed

    checkpoint = require_checkpoint(args)
    out = _check_out(args)
    method, post = configs_from_args(args)
    split, datalists = datalist_split(args.healthy, args.split, CALIBRATION_SPLIT)
    entries = load_entries(args.healthy, split, args.masks)
    info = init_distributed(args.device)
    try:
        if info.is_main and datalists:
            how = "" if args.split else f" (the default; --split picks another of {datalists[1]})"
            print(f"calibrating on split {split!r} of {datalists[0]}: {len(entries)} scan(s){how}")
        detector = build_detector(args, checkpoint, method, post, info)
        done = calibrate_scans(
            detector, entries, fpr=args.fpr, target=args.target, max_fp_ml=args.max_fp_ml,
            min_component=_component_voxels(detector, args.min_component_ml),
            allow_few=args.allow_few, workers=args.workers, info=info, errors="skip",
            progress=info.is_main,
        )
        if not info.is_main:
            return EXIT_SOME_FAILED if done.failures else 0
        if done.thresholds is None:  # each failure has had its one error line above
            print(
                f"no healthy scan could be scored ({len(done.failures)} of {len(entries)} "
                "input(s) failed); no thresholds written",
                file=sys.stderr,
            )
            return 1
        done.thresholds.save(out, overwrite=args.overwrite)
        _summary(detector, done, len(entries), out)
        return EXIT_SOME_FAILED if done.failures else 0
    finally:
        cleanup(info)


def _check_out(args: argparse.Namespace) -> Path:
    """--fpr and --out, checked before anything is scored."""
    from medidiff.cli.commands._common import check_json_out
    from medidiff.errors import ConfigError

    _resolve_target(args)
    if not 0 < args.fpr < 1:
        raise ConfigError(f"--fpr must lie in (0, 1), e.g. 0.05; got {args.fpr}")
    if args.target == "fp-volume" and not args.max_fp_ml >= 0:
        raise ConfigError(f"--max-fp-ml must be a volume >= 0 in ml (e.g. 2); got {args.max_fp_ml}")
    if args.target != "fp-volume" and args.max_fp_ml is not None:
        raise ConfigError("--max-fp-ml applies to --target fp-volume")
    if not args.min_component_ml >= 0:
        raise ConfigError(f"--min-component-ml must be >= 0; got {args.min_component_ml}")
    return check_json_out(args.out, args.overwrite)


def _resolve_target(args: argparse.Namespace) -> None:
    """Fill in --target, --fpr, --max-fp-ml and --min-component-ml: --fpr alone means the
    voxel-fpr target, otherwise medidiff's default (CALIBRATION_DEFAULTS)."""
    d = CALIBRATION_DEFAULTS
    if args.target is None:
        classic = args.fpr is not None and args.max_fp_ml is None
        args.target = "voxel-fpr" if classic else d["target"]
    if args.fpr is None:
        args.fpr = 0.05
    if args.target == "fp-volume" and args.max_fp_ml is None:
        args.max_fp_ml = d["max_fp_ml"]
    if args.min_component_ml is None:
        args.min_component_ml = d["min_component_ml"] if args.target == "fp-volume" else 0.0


def _component_voxels(detector: Any, ml: float) -> int:
    """--min-component-ml as model-grid voxels (rounded up)."""
    from medidiff.anomaly.calibration import component_voxels, voxel_ml

    return component_voxels(ml, voxel_ml(detector))


def _summary(detector: Any, done: Any, inputs: int, out: Path) -> None:
    thresholds = done.thresholds
    print(
        f"method {detector.method.method}: {thresholds.num_scans} healthy scan(s), "
        f"{thresholds.num_voxels} voxels, fpr {thresholds.fpr:g}"
    )
    print(
        f"voxel threshold {thresholds.voxel_threshold:.6g} ({thresholds.voxel_rule}); "
        f"scan threshold {thresholds.scan_threshold:.6g} "
        f"({thresholds.scan_threshold_rule})"
    )
    held, scan = thresholds.held_out, thresholds.scan_fpr
    if held:
        print(
            f"expected on a new healthy scan (each of the {held['scans']} left out in turn): "
            f"voxel FPR {held['voxel_fpr_mean']:.4f} (worst {held['voxel_fpr_max']:.4f}), "
            f"false-positive volume {held['fp_ml_mean']:.2f} ml (worst {held['fp_ml_max']:.2f} ml)"
        )
    if scan:
        print(
            f"scan-level FPR expected {scan['expected']:.3f} for target {thresholds.fpr:g} with "
            f"{thresholds.num_scans} scans ({scan['level']:.0%} interval {scan['low']:.3f}-"
            f"{scan['high']:.3f}); more healthy scans narrow it"
        )
    if done.failures:
        print(f"{len(done.failures)} of {inputs} input(s) failed and were left out:",
              file=sys.stderr)
        for image, _ in done.failures:
            print(f"  {image}", file=sys.stderr)
    print(f"wrote thresholds to {out}")
