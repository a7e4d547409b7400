"""Argument helpers shared by the sub-commands (argparse only: keep imports light)."""

from __future__ import annotations

import argparse


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to run (default: auto = cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
