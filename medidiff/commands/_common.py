"""Argument helpers shared by the sub-commands (argparse only: keep imports light)."""

from __future__ import annotations

import argparse


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to run (default: auto = cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def not_implemented(command: str, issue: str) -> int:
    from medidiff.errors import NotImplementedYet

    raise NotImplementedYet(
        f"'medidiff {command}' is not implemented yet in this version ({issue}); "
        "no output was written"
    )
