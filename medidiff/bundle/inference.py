"""What a bundle's ``configs/inference.json`` instantiates.

The config wires MONAI-style ids (``dataset``, ``inferer``, ``evaluator``, ``run``) to
medidiff objects: ``inferer`` is an :class:`~medidiff.anomaly.detector.AnomalyDetector` built
from the bundle's weights with the exported method, post-processing and seed; ``dataset`` is
:func:`load_inputs` of ``dataset_dir``; ``evaluator`` is an :class:`AnomalyEvaluator`, whose
:meth:`~AnomalyEvaluator.run` scores every input through
:func:`medidiff.anomaly.runner.score_folder`, the same loop as ``medidiff anomaly``, so the
output folder holds the same files (``NAME_anomaly.nii.gz``, ``NAME_recon.nii.gz``,
``NAME_seg.nii.gz`` with thresholds, ``NAME_overlay.png``, ``scores.csv``,
``anomaly_config.json``) with the same values.

Example (what ``python -m monai.bundle run`` does with the config):
    >>> from monai.bundle import ConfigParser                           # doctest: +SKIP
    >>> parser = ConfigParser()                                          # doctest: +SKIP
    >>> parser.read_config("bundle/configs/inference.json")             # doctest: +SKIP
    >>> parser.update({"bundle_root": "bundle", "dataset_dir": "scans/",
    ...                "output_dir": "results/"})                       # doctest: +SKIP
    >>> parser.get_parsed_content("evaluator").run().outcomes[0].row["score"]  # doctest: +SKIP
    0.061...
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medidiff.anomaly.runner import FolderRun, load_entries, score_folder
from medidiff.anomaly.thresholds import Thresholds
from medidiff.errors import DataError

__all__ = ["AnomalyEvaluator", "load_inputs"]


def load_inputs(
    dataset_dir: str | os.PathLike | Sequence[str | os.PathLike] | None,
    split: str | None = None,
    masks: str | os.PathLike | None = None,
) -> list[Any]:
    """The datalist entries of a bundle's ``dataset_dir`` (what ``medidiff anomaly --input``
    takes: files, a folder, a glob, or a CSV / Decathlon ``dataset.json`` datalist).

    Args:
        dataset_dir: one source or a list of them.
        split: the datalist's list to read (``--split`` of ``medidiff anomaly``).
        masks: brain masks (``--masks``): a folder of files named like the inputs, or a
            datalist with a ``mask`` per entry.

    Returns:
        :class:`~medidiff.data.datalist.DatalistEntry` items.

    Raises:
        DataError: no ``dataset_dir`` given, or what :func:`~medidiff.anomaly.runner.load_entries`
            refuses (missing paths, empty folders, duplicate names, masks without a match).
    """
    if dataset_dir is None or (isinstance(dataset_dir, str) and not dataset_dir.strip()):
        raise DataError(
            "the bundle has no input: pass --dataset_dir with scan files, a folder, a glob or "
            "a datalist (CSV or dataset.json)"
        )
    if isinstance(dataset_dir, (str, os.PathLike)):
        sources = [str(dataset_dir)]
    else:
        sources = [str(s) for s in dataset_dir]
        if not sources:
            raise DataError("--dataset_dir is an empty list; give at least one scan or folder")
    return load_entries(sources, split, None if masks is None else str(masks))


def _flag(value: Any, name: str) -> bool:
    """A yes/no setting as a bool; ``python -m monai.bundle run --overlays false`` passes the
    string ``"false"``, which plain ``bool()`` would read as true."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise DataError(f"--{name} must be True or False; got {value!r}")


class AnomalyEvaluator:
    """The ``evaluator`` of a bundle: scores ``dataset`` into ``output_dir``.

    Args:
        detector: the :class:`~medidiff.anomaly.detector.AnomalyDetector` (``inferer``).
        dataset: datalist entries (:func:`load_inputs`).
        output_dir: the output folder (created; resumable as with ``medidiff anomaly``).
        thresholds: calibrated :class:`~medidiff.anomaly.thresholds.Thresholds` (segmentations
            and ``flagged``), or ``None``.
        thresholds_path: where they came from (recorded in ``anomaly_config.json``).
        overlays: draw ``NAME_overlay.png`` montages.
        overwrite: recompute scans whose outputs exist (default: resume).
        progress: progress bars (on a terminal).
    """

    def __init__(
        self,
        detector: Any,
        dataset: Sequence[Any],
        output_dir: str | os.PathLike,
        thresholds: Thresholds | None = None,
        thresholds_path: str | os.PathLike | None = None,
        overlays: bool = True,
        overwrite: bool = False,
        progress: bool = True,
    ) -> None:
        if output_dir is None or not str(output_dir).strip():
            raise DataError("the bundle has no output folder: pass --output_dir DIR")
        self.detector = detector
        self.dataset = list(dataset)
        self.output_dir = Path(output_dir)
        self.thresholds = thresholds
        self.thresholds_path = thresholds_path
        self.overlays = _flag(overlays, "overlays")
        self.overwrite = _flag(overwrite, "overwrite")
        self.progress = _flag(progress, "progress")

    def run(self) -> FolderRun:
        """Score every input; returns the :class:`~medidiff.anomaly.runner.FolderRun`.

        Scans that cannot be read or scored are reported on one line each and skipped, as
        with ``medidiff anomaly``; then a :class:`DataError` lists them, so that the
        ``monai.bundle run`` process exits non-zero.
        """
        on_result = None
        if self.overlays:
            from medidiff.viz.overlay import map_scale, write_overlay

            on_result = functools.partial(
                write_overlay,
                scale=map_scale(self.thresholds, self.detector.postprocess.residual),
            )
        done = score_folder(
            self.detector, self.dataset, self.output_dir, thresholds=self.thresholds,
            thresholds_path=self.thresholds_path, overwrite=self.overwrite, on_result=on_result,
            progress=self.progress,
        )
        if done.resumed:
            print(f"resumed: {done.resumed} scan(s) already had outputs (set --overwrite true "
                  "to recompute)")
        if done.wrote:
            print(f"wrote anomaly maps of {len(done.outcomes)} scan(s) to {done.out}/ "
                  "(scores.csv, anomaly_config.json)")
        if done.failures:
            names = ", ".join(str(image) for image, _ in done.failures)
            raise DataError(f"{len(done.failures)} of {len(self.dataset)} input(s) could not be "
                            f"scored and were skipped: {names}")
        return done
