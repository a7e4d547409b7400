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
no file could be scored).

Example:
    medidiff calibrate --checkpoint runs/brain_mri_2d/model.safetensors \\
        --healthy sample_data/dataset.json --split validation --out thresholds.json --fpr 0.05
"""

from __future__ import annotations

import argparse
from pathlib import Path

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
    import os
    import sys

    import numpy as np
    from tqdm.auto import tqdm

    from medidiff.anomaly.detector import Thresholds
    from medidiff.cli.commands.anomaly import (
        EXIT_SOME_FAILED,
        build_detector,
        configs_from_args,
        gather,
        load_inputs,
        report_failure,
        require_checkpoint,
    )
    from medidiff.runtime.distributed import cleanup, init_distributed, shard
    from medidiff.errors import ConfigError, MedidiffError, OutputError
    from medidiff.io import check_writable_folder

    checkpoint = require_checkpoint(args)
    if not 0 < args.fpr < 1:
        raise ConfigError(f"--fpr must lie in (0, 1), e.g. 0.05; got {args.fpr}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise OutputError(f"{out}: already exists; pass --overwrite to replace it")
    if out.is_dir():
        raise OutputError(f"--out {out}: is a folder; give a .json file name")
    check_writable_folder(out.parent)  # before scoring, not after
    method, post = configs_from_args(args)
    entries = load_inputs(args.healthy, args.split, args.masks)
    info = init_distributed(args.device)
    try:
        detector = build_detector(args, checkpoint, method, post, info)
        voxels: dict[str, np.ndarray] = {}
        scores: dict[str, float] = {}
        failures: list[str] = []
        for entry in tqdm(
            shard(entries, info),
            desc="healthy scans",
            unit="scan",
            disable=None if info.is_main else True,
        ):
            try:
                result = detector.score_file(entry.image, mask=entry.mask, name=entry.name)
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as exc:
                if os.environ.get("MEDIDIFF_DEBUG") and not isinstance(exc, MedidiffError):
                    raise
                report_failure(entry.image, exc)
                failures.append(str(entry.image))
                continue
            voxels[entry.name] = result.grid.anomaly_map[result.grid.mask].astype(np.float32)
            scores[entry.name] = result.score
        all_voxels = {k: v for part in gather(voxels, info) for k, v in part.items()}
        all_scores = {k: v for part in gather(scores, info) for k, v in part.items()}
        all_failures = [f for part in gather(failures, info) for f in part]
        if not info.is_main:
            return EXIT_SOME_FAILED if all_failures else 0
        if not all_scores:  # each failure has had its one error line above
            print(
                f"no healthy scan could be scored ({len(all_failures)} of {len(entries)} input(s) "
                "failed); no thresholds written",
                file=sys.stderr,
            )
            return 1
        names = [e.name for e in entries if e.name in all_scores]
        thresholds = Thresholds.from_healthy(
            detector, [all_voxels[n] for n in names], {n: all_scores[n] for n in names}, args.fpr
        )
        thresholds.save(out, overwrite=args.overwrite)
        print(
            f"method {detector.method.method}: {thresholds.num_scans} healthy scan(s), "
            f"{thresholds.num_voxels} voxels, fpr {thresholds.fpr:g}"
        )
        print(
            f"voxel threshold {thresholds.voxel_threshold:.6g}; "
            f"scan threshold {thresholds.scan_threshold:.6g} "
            f"({thresholds.scan_threshold_rule})"
        )
        if all_failures:
            print(
                f"{len(all_failures)} of {len(entries)} input(s) failed and were left out:",
                file=sys.stderr,
            )
            for image in all_failures:
                print(f"  {image}", file=sys.stderr)
        print(f"wrote thresholds to {out}")
        return EXIT_SOME_FAILED if all_failures else 0
    finally:
        cleanup(info)
