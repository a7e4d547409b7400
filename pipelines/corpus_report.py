"""How medidiff's reader copes with the odd files nibabel and pydicom ship for their own tests.

The corpus is every file in ``nibabel/tests/data`` (NIfTI-1/2, MGH, Analyze, MINC,
PAR/REC, CIFTI, streamlines, a few DICOMs...) and every DICOM in
``pydicom/data/test_files`` (``.dcm`` files, plus suffix-less files that
``pydicom.dcmread`` accepts), walked recursively, plus each pydicom folder holding files,
read as a DICOM series. Each entry is either loaded or rejected
with a :class:`~medidiff.errors.MedidiffError`; anything else is a bug and shows as
``CRASH``. ``tests/test_corpus.py`` checks the loaded ones against reference readers.

With ``--command anomaly --checkpoint CKPT`` the corpus goes through one
``medidiff anomaly`` batch instead (a CSV datalist of uniquely named links to the files, so
that files sharing a name stay apart): each entry must come out scored (a scores.csv row)
or rejected (one ``medidiff: error: skipped ...`` line); an entry with neither, a message
about an ``unexpected`` exception, or a batch that stops (exit status other than 0 or 4) is
a ``CRASH``. ``tests/test_corpus_anomaly.py`` runs this with a tiny model.

Usage:
    python pipelines/corpus_report.py            # table + counts per reason
    python pipelines/corpus_report.py --summary  # counts only
    python pipelines/corpus_report.py --command anomaly --checkpoint model.safetensors
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import io
import os
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: Options of the anomaly run: the cheapest method (2 network calls per slice), no PNGs.
DEFAULT_ANOMALY_ARGS = "--method ddim --t-start 6 --steps 2 --no-overlay --device cpu"


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
    from medidiff.io.volume import load_volume

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


@dataclass(frozen=True)
class AnomalyOutcome:
    """What one ``medidiff anomaly`` batch did with one corpus entry."""

    file: CorpusFile
    outcome: str  # "scored", "reject" or "CRASH"
    detail: str  # "score 0.0123 (shape ...)", or the one-line error


@dataclass(frozen=True)
class AnomalyRun:
    """A ``medidiff anomaly`` batch over the corpus.

    Attributes:
        exit_code: the command's exit status (0: all scored, 4: some rejected).
        outcomes: one per corpus entry, in corpus order.
        stderr: everything the command wrote to stderr.
        seconds: wall time of the batch.
        out_dir: the command's ``--out`` folder.
    """

    exit_code: int
    outcomes: list[AnomalyOutcome]
    stderr: str
    seconds: float
    out_dir: Path


def run_anomaly(
    files: list[CorpusFile],
    checkpoint: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    extra_args: str = DEFAULT_ANOMALY_ARGS,
) -> AnomalyRun:
    """Run one ``medidiff anomaly`` batch (in this process, through ``medidiff.cli.main.main``)
    over ``files`` and classify each entry.

    Each entry is linked as ``WORK/inputs/cNNN__<name>`` (keeping its suffix, so the format
    is recognised the same way) and listed in ``WORK/corpus.csv``; outputs go to
    ``WORK/out``.
    """
    from medidiff.cli.main import main

    work = Path(work_dir)
    links = work / "inputs"
    links.mkdir(parents=True, exist_ok=True)
    linked: dict[str, CorpusFile] = {}
    for i, item in enumerate(files):
        key = f"c{i:04d}"
        link = links / (f"{key}__{item.path.name}" if item.path.is_file() else f"{key}__series")
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(item.path.resolve(), target_is_directory=item.path.is_dir())
        linked[key] = item
    datalist = work / "corpus.csv"
    with open(datalist, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image"])
        writer.writerows([[str(p)] for p in sorted(links.iterdir())])
    out = work / "out"
    argv = ["anomaly", "--checkpoint", str(checkpoint), "--input", str(datalist), "--out",
            str(out), "--overwrite", *shlex.split(extra_args)]
    stdout, stderr = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        exit_code = main(argv)
    seconds = time.perf_counter() - start

    key_of = re.compile(r"/inputs/(c\d{4})__")
    scored: dict[str, dict[str, str]] = {}
    if (out / "scores.csv").exists():
        with open(out / "scores.csv", newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                match = key_of.search(row.get("file", ""))
                if match:
                    scored[match.group(1)] = row
    errors: dict[str, str] = {}
    for line in stderr.getvalue().splitlines():
        match = key_of.search(line)
        if line.startswith("medidiff: error:") and match:
            errors[match.group(1)] = line
    batch_failed = exit_code not in (0, 4)
    outcomes = []
    for key, item in linked.items():
        if key in scored and key not in errors:
            row = scored[key]
            outcomes.append(AnomalyOutcome(item, "scored", f"score {float(row['score']):.4g}"))
        elif key in errors and key not in scored and not batch_failed:
            line = errors[key].replace(str(links) + "/", "")
            outcomes.append(AnomalyOutcome(item, "CRASH" if "unexpected" in line else "reject",
                                           line.removeprefix("medidiff: error: skipped ")))
        else:
            why = "the batch stopped" if batch_failed else "neither scored nor reported"
            outcomes.append(AnomalyOutcome(item, "CRASH", f"{why}: {stderr.getvalue()[-300:]}"))
    return AnomalyRun(exit_code, outcomes, stderr.getvalue(), seconds, out)


def _anomaly_report(args: argparse.Namespace) -> int:
    if not args.checkpoint:
        print("corpus_report: --command anomaly needs --checkpoint MODEL.safetensors",
              file=sys.stderr)
        return 2
    files = corpus_files()
    with contextlib.ExitStack() as stack:
        work = args.work_dir or stack.enter_context(tempfile.TemporaryDirectory())
        run = run_anomaly(files, args.checkpoint, work, extra_args=args.anomaly_args)
        if not args.summary:
            name_w = max(len(o.file.name) for o in run.outcomes)
            print(f"{'file'.ljust(name_w)}  {'outcome':7}  detail")
            for o in run.outcomes:
                detail = o.detail
                if len(detail) > args.width:
                    detail = detail[: args.width - 3] + "..."
                print(f"{o.file.name.ljust(name_w)}  {o.outcome:7}  {detail}")
            print()
    counts = collections.Counter((o.file.source, o.outcome) for o in run.outcomes)
    print(f"medidiff anomaly over {len(files)} corpus entries: exit status {run.exit_code}, "
          f"{run.seconds:.1f} s")
    for source in ("nibabel", "pydicom", "pydicom-dir"):
        n_scored, n_rej, n_crash = (counts[(source, k)] for k in ("scored", "reject", "CRASH"))
        print(f"  {source:11} scored {n_scored:3}   reject {n_rej:3}   crash {n_crash:3}")
    crashes = [o for o in run.outcomes if o.outcome == "CRASH"]
    for o in crashes:
        print(f"CRASH {o.file.name}: {o.detail}", file=sys.stderr)
    return 1 if crashes or run.exit_code not in (0, 4) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", action="store_true", help="print only the counts")
    parser.add_argument(
        "--width", type=int, default=110, help="cut the detail column at this width"
    )
    parser.add_argument("--command", choices=["info", "anomaly"], default="info",
                        help="info: load every entry (default); anomaly: one 'medidiff anomaly' "
                             "batch over the corpus")
    parser.add_argument("--checkpoint", help="model for --command anomaly")
    parser.add_argument("--anomaly-args", default=DEFAULT_ANOMALY_ARGS,
                        help=f"options of the anomaly run (default: {DEFAULT_ANOMALY_ARGS!r})")
    parser.add_argument("--work-dir", help="keep the anomaly run's links and outputs here "
                                           "(default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.command == "anomaly":
        return _anomaly_report(args)

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
