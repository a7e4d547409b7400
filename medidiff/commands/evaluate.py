"""Voxel- and scan-level metrics of anomaly maps against ground-truth masks.

NOT IMPLEMENTED YET: this command is part of the anomaly pipeline and currently exits
with status 3 without writing anything.
"""

from __future__ import annotations

import argparse

from medidiff.commands._common import not_implemented


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True, help="folder of medidiff anomaly outputs")
    p.add_argument("--truth", required=True, help="folder of ground-truth masks")
    p.add_argument("--out", help="metrics JSON to write")


def run(args: argparse.Namespace) -> int:
    return not_implemented("evaluate", "anomaly pipeline")
