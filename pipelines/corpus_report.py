"""How medidiff's reader copes with the odd files nibabel and pydicom ship for their own tests.

The corpus is every file in ``nibabel/tests/data`` (NIfTI-1/2, MGH, Analyze, MINC,
PAR/REC, CIFTI, streamlines, a few DICOMs...) and every DICOM in
``pydicom/data/test_files`` (``.dcm`` files, plus suffix-less files that
``pydicom.dcmread`` accepts), walked recursively, plus each pydicom folder holding files,
read as a DICOM series. Each entry is either loaded or rejected
with a :class:`~medidiff.errors.MedidiffError`; anything else is a bug and shows as
``CRASH``. ``tests/test_corpus.py`` checks the loaded ones against reference readers.

Usage:
    python pipelines/corpus_report.py            # table + counts per reason
    python pipelines/corpus_report.py --summary  # counts only
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CorpusFile:
    """One file of the corpus."""

    source: str  # "nibabel", "pydicom" (files) or "pydicom-dir" (folders read as a DICOM series)
    path: Path
    name: str  # "source:relative/path", unique, used as the test id


@dataclass(frozen=True)
class Outcome:
    """What ``load_volume`` did with one file."""

    file: CorpusFile
    outcome: str  # "load", "reject" or "CRASH"
    reason: str  # the error's reason code, or a short description of what loaded
    detail: str
    seconds: float


def nibabel_data_dir() -> Path:
    import nibabel

    return Path(nibabel.__file__).parent / "tests" / "data"


def pydicom_data_dir() -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files"


def _is_dicom(path: Path) -> bool:
    import pydicom

    try:
        pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - "not DICOM" in any form
        return False
    return True


def corpus_files(*, folders: bool = True) -> list[CorpusFile]:
    """Every corpus file, sorted, each with a unique name.

    Args:
        folders: also list every pydicom folder that holds files, as a DICOM series
            candidate (source ``"pydicom-dir"``).
    """
    files: list[CorpusFile] = []
    nib_dir = nibabel_data_dir()
    for root, dirs, names in os.walk(nib_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(names):
            path = Path(root) / name
            files.append(
                CorpusFile("nibabel", path, f"nibabel:{path.relative_to(nib_dir).as_posix()}")
            )
    dcm_dir = pydicom_data_dir()
    for root, dirs, names in os.walk(dcm_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(names):
            path = Path(root) / name
            if name.lower().endswith(".dcm") or ("." not in name and _is_dicom(path)):
                files.append(
                    CorpusFile("pydicom", path, f"pydicom:{path.relative_to(dcm_dir).as_posix()}")
                )
    if folders:
        for root, dirs, names in os.walk(dcm_dir):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            if names:
                rel = Path(root).relative_to(dcm_dir).as_posix()
                files.append(CorpusFile("pydicom-dir", Path(root), f"pydicom-dir:{rel}/"))
    return files


def check(file: CorpusFile) -> Outcome:
    """Load one file with medidiff and classify the result."""
    from medidiff.errors import MedidiffError
    from medidiff.io import load_volume

    start = time.perf_counter()
    try:
        vol = load_volume(file.path)
    except MedidiffError as exc:
        reason = getattr(exc, "reason", type(exc).__name__)
        detail = str(exc).replace(str(file.path), file.path.name)
        return Outcome(file, "reject", reason, detail, time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - this is what the report looks for
        return Outcome(file, "CRASH", type(exc).__name__, str(exc), time.perf_counter() - start)
    shape = "x".join(str(s) for s in vol.shape)
    what = f"{vol.meta['format']} {shape} {vol.orientation} {vol.array.dtype}"
    notes = "; ".join(vol.meta.get("warnings", []))
    return Outcome(file, "load", what, notes, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", action="store_true", help="print only the counts")
    parser.add_argument(
        "--width", type=int, default=110, help="cut the detail column at this width"
    )
    args = parser.parse_args(argv)

    outcomes = [check(f) for f in corpus_files()]
    if not args.summary:
        name_w = max(len(o.file.name) for o in outcomes)
        reason_w = max(len(o.reason) for o in outcomes if o.outcome != "load") if outcomes else 10
        print(
            f"{'file'.ljust(name_w)}  {'outcome':7}  "
            f"{'reason group / loaded as'.ljust(reason_w)}  detail"
        )
        for o in outcomes:
            detail = o.detail if len(o.detail) <= args.width else o.detail[: args.width - 3] + "..."
            print(
                f"{o.file.name.ljust(name_w)}  {o.outcome:7}  {o.reason.ljust(reason_w)}  {detail}"
            )
        print()
    by_source = collections.Counter((o.file.source, o.outcome) for o in outcomes)
    reasons = collections.Counter(o.reason for o in outcomes if o.outcome == "reject")
    total_s = sum(o.seconds for o in outcomes)
    print(f"{len(outcomes)} files in {total_s:.1f} s")
    for source in ("nibabel", "pydicom", "pydicom-dir"):
        n_load, n_rej, n_crash = (by_source[(source, k)] for k in ("load", "reject", "CRASH"))
        print(f"  {source:11} load {n_load:3}   reject {n_rej:3}   crash {n_crash:3}")
    print("rejections by reason:")
    for reason, n in reasons.most_common():
        print(f"  {reason:20} {n:3}")
    crashes = [o for o in outcomes if o.outcome == "CRASH"]
    for o in crashes:
        print(f"CRASH {o.file.name}: {o.reason}: {o.detail}", file=sys.stderr)
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
