"""Generate new scans from a checkpoint.

NOT IMPLEMENTED YET: this command is part of the synthesis pipeline and currently exits
with status 3 without writing anything.
"""

from __future__ import annotations

import argparse

from medidiff.commands._common import add_device_args, not_implemented


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="model.safetensors (default: the bundled model)")
    p.add_argument("--num", type=int, required=True, help="number of samples")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sampler", default="ddim", help="ddpm | ddim | dpm++2m")
    p.add_argument("--steps", type=int, help="sampling steps")
    p.add_argument("--batch-size", type=int, default=4)
    add_device_args(p)


def run(args: argparse.Namespace) -> int:
    return not_implemented("synthesize", "synthesis pipeline")
