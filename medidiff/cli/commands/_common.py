"""Argument helpers shared by the sub-commands (argparse only: keep imports light)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to run (default: auto = cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def check_json_out(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a JSON ``--out`` that is a folder, exists (without ``--overwrite``) or cannot
    be written, before any work.

    Raises:
        OutputError: with the fix in the message.
    """
    from medidiff.errors import OutputError
    from medidiff.io.atomic import check_writable_folder

    out = Path(out).expanduser()
    if out.is_dir():
        raise OutputError(f"--out {out}: is a folder; give a .json file name")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists; pass --overwrite to replace it")
    check_writable_folder(out.parent)
    return out
