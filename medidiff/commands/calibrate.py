"""Anomaly thresholds from healthy scans at a target false-positive rate.

NOT IMPLEMENTED YET: this command is part of the anomaly pipeline and currently exits
with status 3 without writing anything.
"""

from __future__ import annotations

import argparse

from medidiff.commands._common import add_device_args, not_implemented


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="model.safetensors (default: the bundled model)")
    p.add_argument("--healthy", nargs="+", required=True, help="healthy scans: files, folder, glob or datalist")
    p.add_argument("--out", required=True, help="thresholds JSON to write")
    p.add_argument("--fpr", type=float, default=0.05, help="target voxel false-positive rate (default 0.05)")
    add_device_args(p)


def run(args: argparse.Namespace) -> int:
    return not_implemented("calibrate", "anomaly pipeline")
