"""Anomaly thresholds from healthy scans at a target false-positive rate.

Scores healthy scans exactly as 'medidiff anomaly' would (same checkpoint, method and
post-processing options) and writes a thresholds JSON with

  voxel_threshold  the (1 - fpr) quantile of the post-processed healthy voxel scores inside
                   the (eroded) brain masks, pooled over all scans, on the model grid; a
                   voxel is anomalous when its score is above it, so about fpr of healthy
                   voxels are flagged
  scan_threshold   the (1 - fpr) quantile of the healthy per-scan scores (inverted
                   empirical CDF: the ceil((1 - fpr) n)-th smallest of n scores; with fewer
                   than 1/fpr scans, i.e. 20 at 5 %, that is the largest healthy score)

together with the checkpoint's sha256, the full method and post-processing config, fpr,
the numbers of scans and voxels, and the medidiff version. 'medidiff anomaly --thresholds'
refuses the file with another checkpoint or other method options. Only healthy scans
belong here: thresholds chosen on labelled anomalies give optimistic results. A healthy
file that cannot be read or scored is reported on one line and left out; the thresholds
are still written from the others, and the exit status is 4 (1, with nothing written, when
no file could be scored). --workers scores scans in parallel processes (same numbers).

Example:
    medidiff calibrate --checkpoint runs/brain_mri_2d/model.safetensors \\
        --healthy sample_data/dataset.json --split validation --out thresholds.json --fpr 0.05
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from medidiff.cli.commands.anomaly import add_model_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--healthy", nargs="+", required=True, help="healthy scans: files, folder, glob or datalist"
    )
    p.add_argument("--out", required=True, help="thresholds JSON to write")
    p.add_argument(
        "--fpr", type=float, default=0.05, help="target false-positive rate (default 0.05)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_model_arguments(p)


def run(args: argparse.Namespace) -> int:
    from medidiff.anomaly.runner import calibrate_scans, load_entries
    from medidiff.cli.commands.anomaly import (
        EXIT_SOME_FAILED,
        build_detector,
        configs_from_args,
        require_checkpoint,
    )
    from medidiff.runtime.distributed import cleanup, init_distributed

    checkpoint = require_checkpoint(args)
    out = _check_out(args)
    method, post = configs_from_args(args)
    entries = load_entries(args.healthy, args.split, args.masks)
    info = init_distributed(args.device)
    try:
        detector = build_detector(args, checkpoint, method, post, info)
        done = calibrate_scans(detector, entries, fpr=args.fpr, workers=args.workers, info=info,
                               errors="skip", progress=info.is_main)
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

    if not 0 < args.fpr < 1:
        raise ConfigError(f"--fpr must lie in (0, 1), e.g. 0.05; got {args.fpr}")
    return check_json_out(args.out, args.overwrite)


def _summary(detector: Any, done: Any, inputs: int, out: Path) -> None:
    thresholds = done.thresholds
    print(
        f"method {detector.method.method}: {thresholds.num_scans} healthy scan(s), "
        f"{thresholds.num_voxels} voxels, fpr {thresholds.fpr:g}"
    )
    print(
        f"voxel threshold {thresholds.voxel_threshold:.6g}; "
        f"scan threshold {thresholds.scan_threshold:.6g} "
        f"({thresholds.scan_threshold_rule})"
    )
    if done.failures:
        print(f"{len(done.failures)} of {inputs} input(s) failed and were left out:",
              file=sys.stderr)
        for image, _ in done.failures:
            print(f"  {image}", file=sys.stderr)
    print(f"wrote thresholds to {out}")
