"""The one scoring runner: many scans, one detector, workers or ranks, resumable folders.

Everything that scores more than one scan goes through here: ``medidiff anomaly``
(:func:`score_folder`), ``medidiff calibrate`` and :func:`calibrate` (:func:`calibrate_scans`),
the demo, and the benchmarks. The runner

- shares the scans out over ``torchrun`` ranks (:func:`medidiff.runtime.distributed.shard`)
  and, within a rank, over worker processes (:func:`medidiff.runtime.parallel.map_scans`);
  results come back in input order and do not depend on either (noise is seeded per scan);
- reports a scan that cannot be read or scored on one line and goes on with the others
  (``errors="skip"``), leaving no outputs of its own; or stops at the first one
  (``errors="raise"``);
- owns the progress bars (one over scans, one over the network evaluations of a scan);
- writes ``scores.csv`` (:class:`~medidiff.anomaly.outputs.ScoresTable`), resumes a folder
  whose scans already have outputs, and deletes the temporaries a killed run left
  (:mod:`medidiff.anomaly.outputs`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.anomaly.outputs import (
    ScoresTable,
    check_resumable,
    remove_stale_temporaries,
    resumable_rows,
    run_record,
)
from medidiff.anomaly.results import AnomalyResult, scan_output_paths
from medidiff.anomaly.thresholds import Thresholds
from medidiff.errors import ConfigError, MedidiffError

__all__ = [
    "CalibrationRun",
    "FolderRun",
    "ScanOutcome",
    "ScoresTable",
    "calibrate",
    "calibrate_scans",
    "check_calibration_size",
    "entry_case",
    "entry_kind",
    "load_entries",
    "one_line",
    "score_folder",
    "score_scans",
    "warn_input",
]

#: ``on_result(result, entry, out)``: extra outputs of a scored scan (e.g. an overlay); it
#: runs where the scan was scored (a worker process: a module-level function) and what it
#: returns is the outcome's ``extra``
ResultHook = Callable[[AnomalyResult, Any, "Path | None"], Any]


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def load_entries(sources: Sequence[str], split: str | None, masks: str | None) -> list[Any]:
    """Datalist entries of the inputs, each with its brain mask (from --masks if given).

    Raises:
        DataError: no inputs, two inputs with the same name, or a --masks source without
            a mask for some input.
    """
    from dataclasses import replace

    from medidiff.data.datasets import load_datalist
    from medidiff.errors import DataError
    from medidiff.io.volume import is_volume_path, strip_volume_suffix

    entries = load_datalist(list(sources) if len(sources) > 1 else sources[0], split=split)
    seen: dict[str, Path] = {}
    for e in entries:
        if e.name in seen:
            raise DataError(
                f"two inputs are both named {e.name!r} ({seen[e.name]} and {e.image}); their "
                "outputs would overwrite each other: rename one or score them into different "
                "--out folders"
            )
        seen[e.name] = e.image
    if masks is None:
        return entries
    source = Path(masks).expanduser()
    lookup: dict[str, Path] = {}
    if source.is_dir():
        for p in sorted(source.iterdir()):
            if p.is_file() and is_volume_path(p):
                lookup[strip_volume_suffix(p.name)] = p
    else:
        for e in load_datalist(masks, split=split):
            lookup[e.name] = e.mask if e.mask is not None else e.image
    missing = [e.name for e in entries if e.name not in lookup]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(
            f"--masks {masks}: no mask for {', '.join(missing[:3])}{more} (matched by file name)"
        )
    return [replace(e, mask=lookup[e.name]) for e in entries]


# --------------------------------------------------------------------------------------------
# the loop: workers, ranks, per-file errors
# --------------------------------------------------------------------------------------------


def one_line(exc: BaseException) -> str:
    """An exception as one line (``unexpected TYPE: ...`` unless it is medidiff's own)."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, MedidiffError) else f"unexpected {type(exc).__name__}: {text}"


def warn_input(image: Any, check: Any) -> None:
    """One line on stderr for a scan whose input check (an
    :class:`~medidiff.data.profile.InputCheck` or its ``scores.csv`` cell) found something;
    nothing for ``ok``, ``unchecked`` or ``None``."""
    if check is not None and not isinstance(check, str):
        check = check.summary()
    if not check or check in ("ok", "unchecked"):
        return
    label, _, findings = check.partition(": ")
    what = ("does not look like the model's training scans" if label == "out of profile"
            else "could not be compared with the training scans (no input profile)")
    print(f"medidiff: warning: {image} {what}: {findings}; its scores are not meaningful "
          "(--strict refuses such scans)", file=sys.stderr, flush=True)


def _failure_message(image: Any, exc: BaseException) -> str:
    message = one_line(exc)
    return message if str(image) in message else f"{image}: {message}"


class _ScanBar:
    """``progress(done, total)`` for the detector: a bar over one scan's network inputs,
    shown when the scan needs more than one."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bar: Any = None
        self.done = 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if total <= 1:
                return
            from medidiff.runtime.progress import Progress

            # a bar on a terminal; in a log a line every 30 s (long 3D scans), none at the end
            self.bar = Progress(total, f"denoising {self.name}", unit="network input", leave=False)
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass(frozen=True)
class _Task:
    """One scan for a worker: ``fn(detector, item, bar)`` with its failure policy."""

    fn: Callable[..., Any]
    index: int
    item: Any
    image: Any
    skip_errors: bool
    bars: bool


def _guarded(detector: Any, task: _Task) -> tuple[int, Any, str | None]:
    """Run a task; with ``skip_errors`` an exception becomes its one-line message."""
    bar = _ScanBar(_scan_name(task.image)) if task.bars else None
    try:
        return task.index, task.fn(detector, task.item, bar), None
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        if not task.skip_errors or (
            os.environ.get("MEDIDIFF_DEBUG") and not isinstance(exc, MedidiffError)
        ):
            raise
        return task.index, None, _failure_message(task.image, exc)
    finally:
        if bar is not None:
            bar.close()


def _scan_name(image: Any) -> str:
    """A file's name without its volume suffix (for progress bars)."""
    from medidiff.io.volume import scan_name

    return scan_name(image) if isinstance(image, (str, os.PathLike)) else str(image)


def _gather(obj: Any, info: Any) -> list[Any]:
    """``[obj]`` in a world of one; every rank's ``obj`` under torchrun."""
    if info is None or not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _run(
    fn: Callable[..., Any],
    detector: Any,
    items: Sequence[Any],
    *,
    workers: int,
    info: Any,
    errors: str,
    progress: bool,
    desc: str,
    images: Sequence[Any] | None = None,
    on_each: Callable[[int, Any], None] | None = None,
    unit: str = "scan",
) -> tuple[dict[int, Any], list[tuple[int, str]]]:
    """``fn(detector, item, bar)`` for this rank's share of ``items``.

    Returns:
        Every rank's results by input index, and the failures (index, message), in input
        order. A failure is printed on one line when it happens.
    """
    from medidiff.runtime.distributed import shard
    from medidiff.runtime.parallel import map_scans

    if errors not in ("skip", "raise"):
        raise ConfigError(f"errors must be 'skip' or 'raise'; got {errors!r}")
    main = info is None or info.is_main
    images = list(images) if images is not None else [getattr(i, "image", i) for i in items]
    indices = list(range(len(items)))
    mine = shard(indices, info) if info is not None else indices
    in_process = max(1, min(int(workers), len(mine))) == 1
    tasks = [_Task(fn, i, items[i], images[i], errors == "skip", progress and main and in_process)
             for i in mine]
    results: dict[int, Any] = {}
    failures: list[tuple[int, str]] = []
    for index, value, message in map_scans(_guarded, detector, tasks, workers=workers, desc=desc,
                                           progress=progress and main, unit=unit):
        if message is not None:
            print(f"medidiff: error: skipped {message}", file=sys.stderr, flush=True)
            failures.append((index, message))
            continue
        results[index] = value
        if on_each is not None:
            on_each(index, value)
    all_results = {k: v for part in _gather(results, info) for k, v in part.items()}
    all_failures = sorted(f for part in _gather(failures, info) for f in part)
    return all_results, all_failures


def _entry_parts(item: Any) -> tuple[Any, Any, str | None]:
    """A datalist entry's (image, mask, name), a path's (path, None, None)."""
    if hasattr(item, "image"):
        return item.image, getattr(item, "mask", None), getattr(item, "name", None)
    return item, None, None


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ScanOutcome:
    """A scored scan.

    Attributes:
        entry: the datalist entry.
        row: its ``scores.csv`` row.
        files: the files written, by kind (``anomaly``, ``recon``, ``seg`` and what
            ``on_result`` added when it returned a mapping of paths under ``"files"``).
        extra: what ``on_result`` returned.
        result: the full :class:`~medidiff.anomaly.results.AnomalyResult` (only when kept).
        resumed: the scan had outputs already and was not scored again.
    """

    entry: Any
    row: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)
    extra: Any = None
    result: AnomalyResult | None = None
    resumed: bool = False


@dataclass(frozen=True)
class _Scoring:
    """What every scan of one run is scored with (pickled to the workers with the task)."""

    thresholds: Thresholds | None
    out: Path | None
    on_result: ResultHook | None
    keep: frozenset[str]


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _score_one(detector: Any, task: tuple[Any, _Scoring], bar: Any) -> ScanOutcome:
    """Score one entry; write its maps (and ``on_result``'s outputs) when the run has a
    folder, leaving none of them if anything fails."""
    entry, how = task
    try:
        result = detector.score_file(entry.image, mask=entry.mask, name=entry.name,
                                     thresholds=how.thresholds, progress=bar, on_check=warn_input)
        files = result.save(how.out) if how.out is not None else {}
        extra = how.on_result(result, entry, how.out) if how.on_result is not None else None
    except BaseException:
        if how.out is not None:  # no partial set of outputs for a failed scan
            with_seg = how.thresholds is not None
            for path in (*scan_output_paths(how.out, entry.name, with_seg).values(),
                         how.out / f"{entry.name}_overlay.png"):
                _discard(path)
        raise
    if isinstance(extra, Mapping) and isinstance(extra.get("files"), Mapping):
        files = {**files, **extra["files"]}
    return ScanOutcome(entry, {"file": str(entry.image), **result.row()}, files, extra,
                       result if entry.name in how.keep else None)


def score_scans(
    detector: Any,
    entries: Sequence[Any],
    *,
    thresholds: Thresholds | None = None,
    out: str | os.PathLike | None = None,
    on_result: ResultHook | None = None,
    keep: Sequence[str] = (),
    workers: int = 1,
    info: Any = None,
    errors: str = "skip",
    progress: bool = False,
    desc: str = "scoring",
    on_each: Callable[[ScanOutcome], None] | None = None,
) -> tuple[list[ScanOutcome], list[tuple[Any, str]]]:
    """Score datalist entries (no resume, no ``scores.csv``: see :func:`score_folder`).

    Args:
        detector: the detector.
        entries: :class:`~medidiff.data.datasets.DatalistEntry` items (``mask`` = brain mask).
        thresholds: calibrated thresholds of ``detector`` (checked once, up front).
        out: write every scan's maps into this folder (exists).
        on_result: extra outputs per scored scan, see :data:`ResultHook`.
        keep: names of scans whose full result stays in memory (``ScanOutcome.result``).
        workers: processes per rank (:func:`medidiff.runtime.parallel.map_scans`).
        info: the :class:`~medidiff.runtime.distributed.DistInfo` under torchrun.
        errors: ``"skip"`` (one line per failed scan, go on) or ``"raise"``.
        progress: progress reports (on rank 0): a bar on a terminal, a plain line every
            30 s in a log (:class:`~medidiff.runtime.progress.Progress`).
        desc: the progress label.
        on_each: called with every outcome as it arrives (this rank's scans).

    Returns:
        The outcomes and the failures ``(image, message)``, both in input order (every
        rank's).
    """
    if thresholds is not None:
        thresholds.check(detector)
    how = _Scoring(thresholds, Path(out) if out is not None else None, on_result,
                   frozenset(keep))
    results, failures = _run(
        _score_one, detector, [(e, how) for e in entries], workers=workers, info=info,
        errors=errors, progress=progress, desc=desc, images=[e.image for e in entries],
        on_each=(lambda _, o: on_each(o)) if on_each is not None else None,
    )
    return ([results[i] for i in sorted(results)],
            [(entries[i].image, message) for i, message in failures])


def entry_kind(entry: Any) -> str:
    """A datalist entry's group: its ``kind`` (``"unknown"`` without one)."""
    return str(entry.extra.get("kind") or "unknown")


def entry_case(result: AnomalyResult, entry: Any, out: Path | None = None, *,
               compact: bool = True) -> Any:
    """``on_result`` for evaluation: the scan's :class:`~medidiff.anomaly.metrics.Case`
    against the entry's lesion mask (``segmentation``) inside its brain mask (``mask``),
    grouped by :func:`entry_kind`; compact (brain voxels only) unless ``compact=False``."""
    from medidiff.anomaly.metrics import Case
    from medidiff.io.volume import load_volume

    truth = np.asarray(load_volume(entry.segmentation).array) > 0
    brain = np.asarray(load_volume(entry.mask).array) > 0
    case = Case(entry.name, result.anomaly_map, truth, mask=brain,
                segmentation=result.segmentation, score=result.score, group=entry_kind(entry))
    return case.compact() if compact else case


# ---- a resumable output folder ---------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FolderRun:
    """What :func:`score_folder` did.

    Attributes:
        out: the folder.
        outcomes: every scan with outputs (scored now or resumed), in input order.
        failures: ``(image, message)`` of the scans that could not be scored.
        resumed: scans that already had outputs.
        wrote: whether the folder holds outputs (``False``: nothing was scored in a new
            folder, and it was left as it was).
    """

    out: Path
    outcomes: list[ScanOutcome]
    failures: list[tuple[Any, str]]
    resumed: int
    wrote: bool


def _open_folder(out: Path, record: Mapping[str, Any], overwrite: bool, info: Any) -> None:
    """Check that ``out`` can take this run, delete a killed run's temporaries, and write
    ``anomaly_config.json`` (rank 0)."""
    from medidiff.io.atomic import check_writable_folder, write_json_atomic
    from medidiff.runtime.distributed import barrier

    main = info is None or info.is_main
    check_writable_folder(out)  # created by the first write; nothing is left on failure
    check_resumable(out, record, overwrite)
    if main:
        remove_stale_temporaries(out)
    if info is not None:
        barrier(info)
    if main:
        write_json_atomic(out / "anomaly_config.json", record)


def score_folder(
    detector: Any,
    entries: Sequence[Any],
    out: str | os.PathLike,
    *,
    thresholds: Thresholds | None = None,
    thresholds_path: Any = None,
    overwrite: bool = False,
    on_result: ResultHook | None = None,
    keep: Sequence[str] = (),
    workers: int = 1,
    info: Any = None,
    errors: str = "skip",
    progress: bool = False,
) -> FolderRun:
    """Score entries into a folder as ``medidiff anomaly`` does.

    Writes ``out/anomaly_config.json`` (:func:`run_record`), every scan's maps, and
    ``out/scores.csv`` (kept current while scoring in a single process, so an interrupted
    run resumes). Scans whose outputs and row exist are not scored again unless
    ``overwrite``; a folder holding another run's outputs is refused; temporaries of a
    killed run are deleted. When no scan at all could be scored in a new folder, nothing
    is left there. Under torchrun rank 0 writes the shared files.

    Args:
        detector, entries, thresholds, on_result, keep, workers, info, errors, progress:
            see :func:`score_scans`.
        out: the output folder (created).
        thresholds_path: where ``thresholds`` came from (recorded).
        overwrite: recompute scans that have outputs.

    Returns:
        The :class:`FolderRun`.

    Raises:
        OutputError: ``out`` cannot be written or holds another run's outputs.
    """
    if thresholds is not None:
        thresholds.check(detector)  # before anything is written
    out = Path(out)
    main = info is None or info.is_main
    created, had_config = not out.exists(), (out / "anomaly_config.json").exists()
    record = run_record(detector, thresholds, thresholds_path, len(entries))
    _open_folder(out, record, overwrite, info)
    with_seg = thresholds is not None
    before = {} if overwrite else resumable_rows(out, entries, with_seg)
    done = {
        e.name: ScanOutcome(e, before[e.name], scan_output_paths(out, e.name, with_seg),
                            resumed=True)
        for e in entries
        if e.name in before
    }
    order = {e.name: i for i, e in enumerate(entries)}
    table = ScoresTable(out / "scores.csv")
    rows = {name: o.row for name, o in done.items()}

    def keep_current(outcome: ScanOutcome) -> None:
        rows[outcome.entry.name] = outcome.row
        if info is None or not info.enabled:  # keep scores.csv current, so a killed run resumes
            table.write(sorted(rows.values(), key=lambda r: order[r["name"]]))

    todo = [e for e in entries if e.name not in done]
    outcomes, failures = score_scans(
        detector, todo, thresholds=thresholds, out=out, on_result=on_result, keep=keep,
        workers=workers, info=info, errors=errors, progress=progress, on_each=keep_current,
    )
    everything = sorted([*done.values(), *outcomes], key=lambda o: order[o.entry.name])
    wrote = bool(everything) or had_config
    if main:
        if wrote:
            table.write([o.row for o in everything])
        else:  # nothing scored in a new folder: leave no trace of the attempt
            _discard(out / "anomaly_config.json")
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()  # only if empty
    return FolderRun(out, everything, failures, len(done), wrote)


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CalibrationRun:
    """What :func:`calibrate_scans` did.

    Attributes:
        thresholds: the thresholds (``None`` when no scan could be scored).
        failures: ``(image, message)`` of the scans left out.
        maps: the healthy :class:`~medidiff.anomaly.calibration.HealthyMap` of each scan
            scored (to derive thresholds at other targets without scoring again).
    """

    thresholds: Thresholds | None
    failures: list[tuple[Any, str]]
    maps: list[Any] = field(default_factory=list)


def _calibration_scan(detector: Any, item: tuple[int, Any], bar: Any) -> tuple[str, Any, float]:
    """One healthy scan's name, anomaly map (:class:`HealthyMap`) and scan score (a scan
    out of the model's input profile is reported at once, see :func:`warn_input`)."""
    from medidiff.anomaly.calibration import HealthyMap
    from medidiff.io.volume import Volume

    i, scan = item
    if isinstance(scan, Volume):
        check = detector.check_input(scan, f"scan{i}")
        warn_input(scan.meta.get("source") or f"scan{i}", check)
        result = detector.score(scan, name=f"scan{i}", progress=bar, input_check=check)
    else:
        image, mask, name = _entry_parts(scan)
        result = detector.score_file(image, mask=mask, name=name, progress=bar, on_check=warn_input)
    grid = result.grid
    return result.name, HealthyMap(result.name, grid.anomaly_map, grid.mask), result.score


def check_calibration_size(num_scans: int, allow_few: bool) -> None:
    """Refuse fewer than :data:`~medidiff.anomaly.calibration.MIN_CALIBRATION_SCANS` healthy
    scans unless ``allow_few``.

    Raises:
        ConfigError: too few scans.
    """
    from medidiff.anomaly.calibration import MIN_CALIBRATION_SCANS

    if num_scans < MIN_CALIBRATION_SCANS and not allow_few:
        raise ConfigError(
            f"calibration got {num_scans} healthy scan(s); at least {MIN_CALIBRATION_SCANS} are "
            "needed for a threshold a new scan can trust (with 3, a 5 % voxel threshold gave "
            "21 % on a new healthy scan); add scans, or pass --allow-few (allow_few=True) to "
            "accept it"
        )


def calibrate_scans(
    detector: Any,
    healthy: Sequence[Any],
    *,
    fpr: float = 0.05,
    target: str = "voxel-fpr",
    max_fp_ml: float | None = None,
    min_component: int = 0,
    allow_few: bool = False,
    workers: int = 1,
    info: Any = None,
    errors: str = "raise",
    progress: bool = False,
) -> CalibrationRun:
    """Thresholds from healthy scans (see :func:`calibrate`), with the runner's failure
    policy: ``errors="skip"`` leaves out a scan that cannot be scored (one line each) and
    calibrates on the others."""
    if not healthy:
        raise ConfigError("calibration needs at least one healthy scan")
    check_calibration_size(len(healthy), allow_few)
    images = [getattr(h, "image", "<volume>") for h in healthy]
    results, failures = _run(
        _calibration_scan, detector, list(enumerate(healthy)), workers=workers, info=info,
        errors=errors, progress=progress, desc="calibrating", images=images, unit="healthy scan",
    )
    maps, scores = [], {}
    for i in sorted(results):
        name, healthy_map, score = results[i]
        maps.append(healthy_map)
        scores[name if name not in scores else f"{name}#{i}"] = score
    thresholds = None
    if scores:
        check_calibration_size(len(scores), allow_few)
        thresholds = Thresholds.from_healthy(
            detector, maps, scores, fpr, target=target, max_fp_ml=max_fp_ml,
            min_component=min_component,
        )
    return CalibrationRun(thresholds, [(images[i], message) for i, message in failures], maps)


def calibrate(
    detector: Any,
    healthy: Sequence[Any],
    *,
    fpr: float = 0.05,
    target: str = "voxel-fpr",
    max_fp_ml: float | None = None,
    min_component: int = 0,
    allow_few: bool = False,
    workers: int = 1,
    progress: bool = False,
) -> Thresholds:
    """Thresholds from healthy scans: a voxel threshold at a target, a scan threshold at ``fpr``.

    Args:
        detector: the detector (checkpoint, method, post-processing) to calibrate.
        healthy: healthy scans: :class:`~medidiff.data.datasets.DatalistEntry` (its ``mask`` is
            used as brain mask), file paths, or :class:`~medidiff.io.volume.Volume` objects.
        fpr: target false-positive rate in (0, 1), e.g. 0.05 (voxels under ``voxel-fpr``;
            always the scan threshold's).
        target: ``"voxel-fpr"`` or ``"fp-volume"`` (:mod:`medidiff.anomaly.calibration`).
        max_fp_ml: ``fp-volume``: ml of segmentation allowed per healthy scan.
        min_component: drop segmented components under this many model voxels.
        allow_few: accept fewer than
            :data:`~medidiff.anomaly.calibration.MIN_CALIBRATION_SCANS` healthy scans.
        workers: score the scans in this many processes (:func:`medidiff.runtime.parallel.map_scans`;
            the thresholds do not depend on it).
        progress: show progress bars.

    Returns:
        The :class:`~medidiff.anomaly.thresholds.Thresholds`, for
        ``detector.score(..., thresholds=...)``.

    Raises:
        ConfigError: too few scans (without ``allow_few``), a bad target or budget.
    """
    run = calibrate_scans(
        detector, healthy, fpr=fpr, target=target, max_fp_ml=max_fp_ml,
        min_component=min_component, allow_few=allow_few, workers=workers, progress=progress,
    )
    if run.thresholds is None:  # pragma: no cover - errors="raise" scores every scan or raises
        raise ConfigError("no healthy scan could be scored")
    return run.thresholds
