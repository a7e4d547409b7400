"""Score scans for anomalies: voxel maps, reconstructions, segmentations and per-scan scores.

NOT IMPLEMENTED YET: this command is part of the anomaly pipeline and currently exits
with status 3 without writing anything.
"""

from __future__ import annotations

import argparse

from medidiff.commands._common import add_device_args, not_implemented


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="model.safetensors (default: the bundled model)")
    p.add_argument("--input", nargs="+", required=True, help="files, folder, glob or datalist")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--method", default="ddim", help="anoddpm | ddim | x0 | patched | ensemble")
    p.add_argument("--thresholds", help="thresholds JSON from 'medidiff calibrate'")
    p.add_argument("--batch-size", type=int, default=16)
    add_device_args(p)


def run(args: argparse.Namespace) -> int:
    return not_implemented("anomaly", "anomaly pipeline")
