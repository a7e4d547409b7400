"""What a scoring run leaves in its folder: ``scores.csv`` and its column descriptions
``scores.json``, ``anomaly_config.json``, and the rules that let a later run resume it.

:class:`ScoresTable` is the one writer and reader of ``scores.csv`` (``medidiff anomaly``,
the demo, ``medidiff evaluate``); next to it, it writes ``scores.json``, a sidecar in the
BIDS tabular-file style (one object per column with its ``Description``, and ``Units`` or
``Levels`` where they apply: :data:`COLUMN_DESCRIPTIONS`). :func:`run_record` is
``anomaly_config.json``, whose :func:`run_identity` must match for earlier outputs to be
reused (:func:`check_resumable`).

Example:
    >>> ScoresTable.COLUMNS[:3]
    ('file', 'name', 'score')
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medidiff.anomaly.results import scan_output_paths

if TYPE_CHECKING:  # pragma: no cover
    from medidiff.anomaly.thresholds import Thresholds
from medidiff.errors import DataError

__all__ = [
    "COLUMN_DESCRIPTIONS",
    "FINAL_NAMES",
    "ScoresTable",
    "check_resumable",
    "remove_stale_temporaries",
    "resumable_rows",
    "run_identity",
    "run_record",
]


#: ``scores.json``: what each column of ``scores.csv`` holds (BIDS-style sidecar)
COLUMN_DESCRIPTIONS: dict[str, dict[str, Any]] = {
    "file": {"Description": "the input file, as given"},
    "name": {"Description": "the input's file name without its suffix; the scan's outputs are "
             "NAME_anomaly.nii.gz, NAME_recon.nii.gz, NAME_seg.nii.gz and NAME_overlay.png"},
    "score": {"Description": "per-scan anomaly score: the mean of the top fraction "
              "(--top-fraction, default 1 %) of the anomaly map inside the scored region "
              "(eroded brain mask), computed on the model grid; higher is more anomalous",
              "Units": "the anomaly map's: |x - x_hat| on the model's 0-1 intensity scale "
              "(L1 residual; squared for --residual l2)"},
    "flagged": {"Description": "whether the scan counts as anomalous: its score against the "
                "calibrated scan threshold",
                "Levels": {"yes": "score > scan_threshold", "no": "score <= scan_threshold",
                           "not calibrated": "no --thresholds given: unknown"}},
    "scan_threshold": {"Description": "the calibrated scan-score threshold used (from the "
                       "--thresholds file of 'medidiff calibrate'); empty when not calibrated",
                       "Units": "as score"},
    "voxels_over_threshold": {
        "Description": "voxels of the segmentation NAME_seg.nii.gz, counted on the input's own "
        "grid (so the same lesion gives more voxels in a finer scan: compare anomalous_ml "
        "across scans); empty when not calibrated", "Units": "voxels of the input"},
    "anomalous_ml": {"Description": "volume of the segmentation: voxels_over_threshold times "
                     "the input's voxel volume; empty when not calibrated", "Units": "ml"},
    "voxel_threshold": {"Description": "the calibrated voxel threshold used: a voxel is "
                        "anomalous where the anomaly map exceeds it; empty when not calibrated",
                        "Units": "as score"},
    "input_check": {
        "Description": "how the scan compares with the model's training inputs (modality, "
        "foreground intensities, extent, volume, skull-stripping, spacing, model grid)",
        "Levels": {"ok": "within the profile of the training scans",
                   "out of profile: ...": "what differs; the scores of such a scan are not "
                   "meaningful ('--strict' refuses it)",
                   "unchecked": "the checkpoint has no input profile (an older file); only the "
                   "model grid was checked"}},
    "seconds": {"Description": "wall time for this scan, from reading to its native-grid "
                "outputs", "Units": "s"},
    "network_evaluations": {
        "Description": "network evaluations this scan took, counted per network input (a 2D "
        "model's slice, a 3D model's volume, window or patch): number of inputs times "
        "nfe_per_input; a batch of 16 slices counts 16. The scan's compute cost"},
    "nfe_per_input": {
        "Description": "network evaluations per network input: the method's number of "
        "denoising steps per slice or volume (ddim: --steps; anoddpm: t + 1; x0 and patched: "
        "1; ensemble: one per start; 0 for the intensity baseline). The method's cost, the "
        "same for every scan"},
}


class ScoresTable:
    """``scores.csv``: one row per scan, the columns of ``medidiff anomaly``, described in
    ``scores.json`` next to it (:data:`COLUMN_DESCRIPTIONS`).

    Args:
        path: the CSV file.
    """

    COLUMNS = (
        "file",
        "name",
        "score",
        "flagged",
        "scan_threshold",
        "voxels_over_threshold",
        "anomalous_ml",
        "voxel_threshold",
        "input_check",
        "seconds",
        "network_evaluations",
        "nfe_per_input",
    )

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @property
    def sidecar(self) -> Path:
        """``scores.json`` next to ``scores.csv``: the column descriptions."""
        return self.path.with_suffix(".json")

    def write(self, rows: Sequence[Mapping[str, Any]]) -> Path:
        """Write ``rows`` (extra keys ignored, ``None`` as empty cells), atomically, and the
        column descriptions (:attr:`sidecar`)."""
        import csv
        import io

        from medidiff.io.atomic import write_json_atomic, write_text_atomic

        write_json_atomic(self.sidecar, {c: COLUMN_DESCRIPTIONS[c] for c in self.COLUMNS})

        buffer = io.StringIO()
        writer = csv.DictWriter(
            buffer, fieldnames=list(self.COLUMNS), extrasaction="ignore", lineterminator="\n"
        )
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in self.COLUMNS})
        return write_text_atomic(self.path, buffer.getvalue())

    def rows(self) -> dict[str, dict[str, str]]:
        """The rows by scan name, as text; ``{}`` when the file is missing or unreadable
        (a resumed run then recomputes)."""
        import csv

        if not self.path.exists():
            return {}
        try:
            with open(self.path, newline="", encoding="utf-8") as f:
                return {row["name"]: row for row in csv.DictReader(f) if row.get("name")}
        except (OSError, KeyError, csv.Error):
            return {}

    def scores(self) -> dict[str, float]:
        """Scan scores by case name (columns ``name`` or ``file``, and ``score``; any CSV
        with them, not only medidiff's); ``{}`` when the file is missing.

        Raises:
            DataError: unreadable, without those columns, or a score that is not a finite number.
        """
        import csv
        import math

        from medidiff.io.volume import strip_volume_suffix

        if not self.path.is_file():
            return {}
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{self.path}: cannot read ({exc})") from None
        if not rows:
            return {}
        columns = {c.strip().lower(): c for c in rows[0] if c is not None}
        key = columns.get("name") or columns.get("file")
        if key is None or "score" not in columns:
            raise DataError(f"{self.path}: expected columns 'file' (or 'name') and 'score'; "
                            f"found {', '.join(columns) or 'none'}")
        scores: dict[str, float] = {}
        for lineno, row in enumerate(rows, start=2):
            cell = (row.get(columns["score"]) or "").strip()
            if not cell:
                continue
            try:
                value = float(cell)
            except ValueError:
                raise DataError(f"{self.path}:{lineno}: score {cell!r} is not a number") from None
            if not math.isfinite(value):
                raise DataError(f"{self.path}:{lineno}: score {cell!r} is not finite")
            scores[strip_volume_suffix(Path((row.get(key) or "").strip()).name)] = value
        return scores


#: what ``medidiff anomaly`` writes into its folder (the final names, never temporaries)
FINAL_NAMES = ("_anomaly.nii.gz", "_recon.nii.gz", "_seg.nii.gz", "_overlay.png",
                "scores.csv", "scores.json", "anomaly_config.json")


def run_identity(record: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of anomaly_config.json that must match for earlier outputs to be reused."""
    return {
        "method": record.get("method"),
        "postprocess": record.get("postprocess"),
        "checkpoint": (record.get("checkpoint") or {}).get("sha256"),
        "seed": record.get("seed"),
        "thresholds": (record.get("thresholds") or {}).get("voxel_threshold"),
    }


def remove_stale_temporaries(out: Path) -> None:
    """Delete temporaries that a killed run left (``.NAME_anomaly.nii.gz.XXXX.tmp.nii.gz``,
    see :func:`medidiff.io.volume.atomic_path`); finished files are never temporaries."""
    if not out.is_dir():
        return
    for entry in os.scandir(out):
        if not entry.name.startswith(".") or ".tmp" not in entry.name:
            continue
        stem = entry.name[1:].partition(".tmp")[0].rsplit(".", 1)[0]  # drop the random part
        if stem.endswith(FINAL_NAMES) and entry.is_file():
            with contextlib.suppress(OSError):
                Path(entry.path).unlink()


def check_resumable(out: Path, record: Mapping[str, Any], overwrite: bool) -> None:
    import json

    from medidiff.errors import OutputError

    path = out / "anomaly_config.json"
    if overwrite or not path.exists():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise OutputError(f"{path}: unreadable; pass --overwrite to recompute everything") from None
    mine, theirs = run_identity(record), run_identity(old if isinstance(old, dict) else {})
    diff = [k for k in mine if mine[k] != theirs[k]]
    if diff:
        raise OutputError(
            f"{out} holds outputs of another run (anomaly_config.json differs in: "
            f"{', '.join(diff)}); pass --overwrite to replace them or choose another --out"
        )


def run_record(
    detector: Any, thresholds: Thresholds | None, thresholds_path: Any, inputs: int
) -> dict[str, Any]:
    """The content of ``anomaly_config.json``: the detector, its thresholds, the input count."""
    record = detector.describe()
    record["thresholds"] = (
        None
        if thresholds is None
        else {
            "path": str(thresholds_path),
            "voxel_threshold": thresholds.voxel_threshold,
            "scan_threshold": thresholds.scan_threshold,
            "fpr": thresholds.fpr,
        }
    )
    record["inputs"] = inputs
    return record


def resumable_rows(out: Path, entries: Sequence[Any], with_seg: bool) -> dict[str, dict[str, str]]:
    """The ``scores.csv`` rows, by name, of the entries whose outputs exist already."""
    previous = ScoresTable(out / "scores.csv").rows()
    return {
        e.name: previous[e.name]
        for e in entries
        if e.name in previous
        and all(p.exists() for p in scan_output_paths(out, e.name, with_seg).values())
    }
