"""Generic fixtures shared by the test modules.

- ``tmp_nifti``: a factory writing tiny NIfTI files with nibabel directly (independent of
  ``medidiff.io``'s writer), returning their paths.
- ``run_cli``: runs ``medidiff.cli.main`` in-process and returns ``(rc, out, err)`` as a
  named tuple; output is captured at the file-descriptor level (``capfd``), so text that
  native libraries write straight to stderr is seen too. A test using ``run_cli`` cannot
  also request ``capsys``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest


class CliRun(NamedTuple):
    """What one ``medidiff`` call did."""

    rc: int
    out: str
    err: str


@pytest.fixture
def tmp_nifti(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``tmp_nifti(array=None, affine=None, *, name="vol.nii.gz", ...) -> Path``.

    Args of the factory:
        array: voxel values (default: ``arange`` of ``shape`` as float32).
        affine: 4x4 voxel-to-RAS affine (default: identity).
        name: file name inside the test's ``tmp_path`` (``.nii`` or ``.nii.gz``).
        shape: shape of the default array, ``(X, Y, Z)``.
        qform_code, sform_code: NIfTI codes written into the header.
        nifti2: write NIfTI-2 instead of NIfTI-1.
    """
    import nibabel as nib

    def make(
        array: np.ndarray | None = None,
        affine: np.ndarray | None = None,
        *,
        name: str = "vol.nii.gz",
        shape: Sequence[int] = (4, 5, 6),
        qform_code: int = 1,
        sform_code: int = 1,
        nifti2: bool = False,
    ) -> Path:
        if array is None:
            array = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(tuple(shape))
        affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
        img = cls(np.asarray(array), affine, dtype=np.asarray(array).dtype)
        img.set_qform(affine, code=qform_code)
        img.set_sform(affine, code=sform_code)
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))
        return path

    return make


@pytest.fixture
def run_cli(capfd: pytest.CaptureFixture[str]) -> Callable[[Sequence[Any]], CliRun]:
    """Run ``medidiff ARGS`` in this process; returns ``CliRun(rc, out, err)``."""
    from medidiff.cli import main

    def run(args: Sequence[Any]) -> CliRun:
        capfd.readouterr()  # drop anything printed before this call
        try:
            rc = main([str(a) for a in args])
        except SystemExit as exc:  # argparse errors and --help
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capfd.readouterr()
        return CliRun(int(rc), out, err)

    return run
