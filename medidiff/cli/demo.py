"""The main job: anomaly detection and synthesis on sample_data with the default models.

:func:`run_demo` (``medidiff demo``, ``make demo``) runs every part of medidiff once, end
to end, on the repository's ``sample_data/`` and writes one folder with an HTML report:

1. reads ``sample_data/dataset.json`` (Decathlon layout): the ``validation`` split
   (healthy scans with brain masks) and the ``test`` split (``kind`` tumor / ms / stroke /
   healthy; ``label`` the lesion mask, ``mask`` the brain mask);
2. builds an :class:`~medidiff.anomaly.detector.AnomalyDetector` with the default method
   (``MethodConfig()``: DDIM, t = 50, 3 steps) on the default 2D model and calibrates it
   on the healthy validation scans at the default target (1 ml of false positives per
   healthy scan, components under 0.5 ml dropped) -> ``DIR/thresholds.json``;
3. scores every test scan -> ``DIR/anomaly/NAME_anomaly.nii.gz``, ``NAME_recon.nii.gz``,
   ``NAME_seg.nii.gz`` (on the scan's own grid), ``NAME_overlay.png`` and ``scores.csv``,
   the same files ``medidiff anomaly`` writes;
4. evaluates the maps against the lesion masks inside the brain masks
   (:func:`medidiff.anomaly.metrics.evaluate_cases`, grouped by kind), for the default method and
   for the no-network intensity baseline (:mod:`medidiff.anomaly.baseline`, calibrated the same
   way) side by side;
5. when the 3D model is a latent model (the shipped ``brain_mri_3d``): 3D latent anomaly
   scoring, the ``latent`` method (:class:`~medidiff.anomaly.reconstructor.LatentReconstructor`)
   calibrated on the same healthy scans at the same FPR -> ``DIR/thresholds_3d.json``, the
   test scans scored -> ``DIR/anomaly_3d/`` (the files of ``DIR/anomaly/``) and evaluated the
   same way, next to the 2D default (per-kind voxel AUROC/AUPRC, Dice at the calibrated
   threshold, network evaluations and seconds per volume); skipped, with the reason in the
   report, for a pixel-space 3D model;
6. synthesises a few axial slices with the 2D model and a few volumes with the 3D model
   (DPM-Solver++(2M), 20 steps; a rectified-flow model its own Euler, 30 steps) ->
   ``DIR/synthesis_2d``, ``DIR/synthesis_3d``;
7. draws the "how it works" strips (:func:`medidiff.viz.figures.save_how_it_works_figures`)
   -> ``DIR/figures``;
8. writes ``DIR/metrics.json`` (method, thresholds, both evaluations, the per-kind table,
   quality bars, the 3D latent scoring, stage timings, model facts, versions) and
   ``DIR/report.html`` (:mod:`medidiff.viz.report`).

The quality bars the report states plainly (pass or fail): the default method's voxel
AUROC over all test scans against the baseline's, and, for every lesion kind, the default
method's voxel AUPRC against the baseline's (the 2D default's; the 3D latent scoring is
shown beside it, not barred).

Example:
    >>> from medidiff.cli.demo import run_demo  # doctest: +SKIP
    >>> result = run_demo("demo_out")        # doctest: +SKIP
    >>> result.report                        # doctest: +SKIP
    PosixPath('demo_out/report.html')
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import medidiff
from medidiff.cli.demo_metrics import (
    FPR,
    LESION_KINDS,
    QualityCheck,
    anomaly_3d_per_kind,
    checkpoint_facts,
    cost_per_volume,
    jsonable,
    machine_facts,
    per_kind_table,
    quality_checks,
    rel_path,
    reproduce_commands,
    scan_rows,
    shipped_name,
    synthesis_settings,
)
from medidiff.errors import DataError, OutputError

__all__ = [
    "DEMO_FORMAT",
    "format_timings",
    "DEMO_MARKER",
    "LESION_KINDS",
    "DemoResult",
    "QualityCheck",
    "default_sample_data",
    "run_demo",
]

DEMO_FORMAT = "medidiff-demo-1"
#: a file written first into every demo folder: a folder holding it may be replaced
DEMO_MARKER = ".medidiff-demo"
#: the test scan the anomaly strip shows (as in docs/how_it_works.md)
FIGURE_CASE = "tumor-000"
#: what the demo writes into its folder (removed by ``overwrite`` before a new run)
OUTPUT_NAMES = (
    "anomaly", "baseline", "anomaly_3d", "synthesis_2d", "synthesis_3d", "figures",
    "thresholds.json", "thresholds_baseline.json", "thresholds_3d.json", "metrics.json",
    "report.html",
)
#: the wall-time budget the demo aims at on 2 CPU cores (seconds)
TIME_BUDGET_S = 300.0


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` produced.

    Attributes:
        out_dir: the output folder.
        report: ``out_dir/report.html``.
        metrics: ``out_dir/metrics.json``.
        thresholds: ``out_dir/thresholds.json`` (the default method's).
        voxel_auroc: the default method's voxel AUROC over all test scans.
        per_kind: the per-kind table (kind -> {"default": {...}, "baseline": {...}}).
        quality: the quality bars.
        timings: seconds per stage, in run order.
        seconds: total wall time.
        notes: anything the report flags (missing figures, ...).
    """

    out_dir: Path
    report: Path
    metrics: Path
    thresholds: Path
    voxel_auroc: float | None
    per_kind: dict[str, dict[str, Any]]
    quality: tuple[QualityCheck, ...]
    timings: dict[str, float]
    seconds: float
    notes: tuple[str, ...] = ()


@dataclass
class _Scored:
    """One scored test scan: its row, its compact evaluation case and its files."""

    name: str
    kind: str
    row: dict[str, Any]
    case: Any
    files: dict[str, str] = field(default_factory=dict)
    result: Any = None  # the full AnomalyResult, kept only for the figure's case


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def default_sample_data() -> Path:
    """The repository's ``sample_data/`` (beside the package), else ``./sample_data``."""
    beside = Path(__file__).resolve().parents[2] / "sample_data"
    return beside if (beside / "dataset.json").exists() else Path("sample_data").resolve()


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Create ``out``; refuse a non-empty folder that is not a demo's; clear a demo's own
    outputs when ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / DEMO_MARKER).exists():
            raise OutputError(
                f"--out {out}: exists, is not empty and is not a medidiff demo output; "
                "choose another --out or empty it"
            )
        if not overwrite:
            raise OutputError(
                f"--out {out}: holds an earlier demo output; pass --overwrite to replace it "
                "or choose another --out"
            )
        for name in OUTPUT_NAMES:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot create the folder ({exc.strerror})") from None
    from medidiff.io import write_json_atomic

    write_json_atomic(out / DEMO_MARKER, {"format": DEMO_FORMAT, "version": medidiff.__version__})


class _Stages:
    """Times the stages and prints one header line per stage when ``verbose``."""

    def __init__(self, total: int, verbose: bool) -> None:
        self.total = total
        self.verbose = verbose
        self.seconds: dict[str, float] = {}
        self._index = 0

    @contextmanager
    def stage(self, key: str, title: str) -> Iterator[None]:
        self._index += 1
        if self.verbose:
            print(f"[{self._index}/{self.total}] {title}", flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[key] = time.perf_counter() - start
            if self.verbose:
                print(f"      {key}: {self.seconds[key]:.1f} s", flush=True)

    def skip(self, title: str, reason: str) -> None:
        """A stage that does not run (not timed)."""
        self._index += 1
        if self.verbose:
            print(f"[{self._index}/{self.total}] {title}: skipped ({reason})", flush=True)


def _load_splits(sample_data: Path, limit: int | None) -> tuple[list[Any], list[Any]]:
    """The healthy validation entries and the test entries (``limit``: N test scans taking
    the kinds in turn, so a quick look still shows every kind)."""
    from medidiff.data.datalist import load_datalist

    dataset = sample_data / "dataset.json"
    if not dataset.is_file():
        raise DataError(
            f"--sample-data {sample_data}: no dataset.json there; pass the sample_data folder "
            "of the repository (or build it with 'make sample-data')"
        )
    healthy = load_datalist(dataset, split="validation")
    test = load_datalist(dataset, split="test")
    if not healthy or not test:
        raise DataError(f"{dataset}: needs non-empty 'validation' and 'test' lists")
    for e in test:
        if e.segmentation is None or e.mask is None:
            raise DataError(
                f"{dataset}: test entry {e.name} lacks a 'label' (lesion mask) or a 'mask' "
                "(brain mask); the demo evaluates against both"
            )
    if limit is not None:
        if limit < 1:
            raise DataError(f"--limit must be >= 1; got {limit}")
        from medidiff.data.datalist import stratified_by_kind

        test = stratified_by_kind(test, limit)
    return healthy, test


def _kind(entry: Any) -> str:
    from medidiff.anomaly.runner import entry_kind

    return entry_kind(entry)


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------


def _evaluation_case(result: Any, entry: Any, out: Path | None, *,
                     scale: Any = None) -> dict[str, Any]:
    """``on_result`` of the runner for a test scan: its compact evaluation case
    (:func:`medidiff.anomaly.runner.entry_case`) and, with ``out``, its overlay with the truth."""
    from medidiff.anomaly.runner import entry_case
    from medidiff.data.transforms import to_model
    from medidiff.viz.overlay import save_result_overlay

    case = entry_case(result, entry, compact=False)
    files = {}
    if out is not None:
        truth_grid = to_model(case.truth.astype(np.uint8), result.preprocessed) > 0
        files["overlay"] = save_result_overlay(result, out, truth=truth_grid, scale=scale)
    return {"files": files, "case": case.compact()}


def _scored(outcomes: Sequence[Any]) -> list[_Scored]:
    """The runner's outcomes as the demo's records."""
    return [_Scored(o.entry.name, _kind(o.entry), o.row, o.extra["case"],
                    {k: str(v) for k, v in o.files.items()}, o.result) for o in outcomes]


def _score_test(detector: Any, test: Sequence[Any], thresholds: Any, thresholds_path: Path,
                out: Path, *, workers: int, progress: bool) -> list[_Scored]:
    """The test scans scored into ``out`` exactly as ``medidiff anomaly`` does (maps,
    overlays with the truth, scores.csv, anomaly_config.json)."""
    from medidiff.anomaly.runner import score_folder
    from medidiff.viz.overlay import map_scale

    hook = functools.partial(_evaluation_case,
                             scale=map_scale(thresholds, detector.postprocess.residual))
    run = score_folder(detector, test, out, thresholds=thresholds, thresholds_path=thresholds_path,
                       on_result=hook, keep=(FIGURE_CASE,), workers=workers, errors="raise",
                       progress=progress)
    return _scored(run.outcomes)


def _score_baseline(baseline: Any, test: Sequence[Any], thresholds: Any, out: Path, *,
                    workers: int, progress: bool) -> list[_Scored]:
    """The baseline's scores (no maps written): ``out/scores.csv``."""
    from medidiff.anomaly.runner import ScoresTable, score_scans

    out.mkdir(exist_ok=True)
    outcomes, _ = score_scans(baseline, test, thresholds=thresholds, on_result=_evaluation_case,
                              workers=workers, errors="raise", progress=progress,
                              desc="baseline")
    ScoresTable(out / "scores.csv").write([o.row for o in outcomes])
    return _scored(outcomes)


# --------------------------------------------------------------------------------------------
# the demo
# --------------------------------------------------------------------------------------------


def run_demo(
    out: str | os.PathLike,
    *,
    checkpoint_2d: str | os.PathLike | None = None,
    checkpoint_3d: str | os.PathLike | None = None,
    sample_data: str | os.PathLike | None = None,
    device: str = "auto",
    num_synth: int = 4,
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    seed: int = 0,
    batch_size: int = 32,
    workers: int | None = None,
    argv: Sequence[str] | None = None,
) -> DemoResult:
    """Run the demo and write ``out/report.html`` and ``out/metrics.json``.

    Args:
        out: output folder; created. An existing non-empty folder is refused unless it is
            an earlier demo's output and ``overwrite`` is set (then the demo's own outputs
            are removed first; other files are left alone).
        checkpoint_2d: the 2D model for anomaly detection and slice synthesis (default:
            the shipped ``brain_mri_2d_2mm``, :func:`medidiff.models.pretrained.resolve_checkpoint`).
        checkpoint_3d: the 3D model for volume synthesis and, when it is a latent model,
            3D latent anomaly scoring (default: the shipped ``brain_mri_3d``).
        sample_data: the folder holding ``dataset.json`` (default
            :func:`default_sample_data`).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        num_synth: slices (2D) and volumes (3D) to synthesise, each ``>= 1``.
        limit: score only this many test scans, the kinds taken in turn (default: all).
        overwrite: replace an earlier demo output in ``out``.
        progress: print a line per stage and progress bars.
        seed: the noise seed of anomaly scoring and synthesis.
        batch_size: network inputs per call when scoring.
        workers: processes that score scans side by side (default: one per CPU core, at
            most 4, on the CPU; 1 on CUDA; :mod:`medidiff.runtime.parallel`). The numbers do not
            depend on it, only the time.
        argv: the command line, recorded in the report's "reproduce" section.

    Returns:
        A :class:`DemoResult`.

    Raises:
        DataError: sample data missing or incomplete.
        CheckpointError: a checkpoint cannot be read (or the shipped one is missing).
        OutputError: ``out`` cannot be used.
        ConfigError: bad ``num_synth`` / ``device``.
    """
    from medidiff.models.pretrained import DEFAULT_2D, DEFAULT_3D

    began = time.perf_counter()
    run = _start(out, checkpoint_2d, checkpoint_3d, sample_data, device, num_synth, limit,
                 overwrite, progress, seed, batch_size, workers)
    out, paths = run.out, run.checkpoints
    anomaly = _anomaly_stages(run)
    anomaly_3d = _anomaly_3d_stage(run, anomaly)
    synthesis = _synthesis_stages(
        run, {"2d": anomaly["loaded"].checkpoint, "3d": anomaly["ckpt3d"]}, num_synth)
    figures, notes = _figures_stage(run, anomaly)
    with run.stages.stage("report", f"writing {out / 'metrics.json'} and {out / 'report.html'}"):
        metrics = _metrics(run, anomaly, anomaly_3d, synthesis, figures, notes, limit=limit,
                           num_synth=num_synth, argv=argv,
                           shipped={"2d": shipped_name(checkpoint_2d, paths["2d"], DEFAULT_2D),
                                    "3d": shipped_name(checkpoint_3d, paths["3d"], DEFAULT_3D)})
        # the report's own stage cannot time itself into the file it writes: the total
        # covers everything up to here
        metrics["total_seconds"] = time.perf_counter() - began
        metrics_path, report_path = _write_metrics_and_report(metrics, out)
    per_kind = anomaly["per_kind"]
    return DemoResult(
        out_dir=out, report=report_path, metrics=metrics_path,
        thresholds=anomaly["thresholds_path"],
        voxel_auroc=per_kind["all"]["default"]["voxel_auroc"], per_kind=per_kind,
        quality=anomaly["quality"], timings=dict(run.stages.seconds),
        seconds=time.perf_counter() - began, notes=tuple(notes),
    )


def _start(out: str | os.PathLike, checkpoint_2d: Any, checkpoint_3d: Any, sample_data: Any,
           device: str, num_synth: Any, limit: int | None, overwrite: bool, progress: bool,
           seed: int, batch_size: int, workers: Any) -> _DemoRun:
    """Check the arguments, read the splits and prepare the folder (nothing heavy yet)."""
    from medidiff.errors import ConfigError
    from medidiff.models.pretrained import DEFAULT_2D, DEFAULT_3D, resolve_checkpoint
    from medidiff.runtime.distributed import resolve_device
    from medidiff.runtime.parallel import default_workers

    if isinstance(num_synth, bool) or not isinstance(num_synth, int) or num_synth < 1:
        raise ConfigError(f"--num-synth must be an integer >= 1; got {num_synth!r}")
    out = Path(out)
    sample = Path(sample_data) if sample_data is not None else default_sample_data()
    paths = {"2d": resolve_checkpoint(checkpoint_2d, DEFAULT_2D),
             "3d": resolve_checkpoint(checkpoint_3d, DEFAULT_3D)}
    dev = resolve_device(device)
    healthy, test = _load_splits(sample, limit)
    if workers is None:
        workers = default_workers(dev, max(len(healthy), len(test)))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers must be an integer >= 1; got {workers!r}")
    _prepare_out_dir(out, overwrite)
    return _DemoRun(out, sample, paths, dev, healthy, test, seed, batch_size, workers, progress,
                    _Stages(10, progress))


@dataclass(frozen=True)
class _DemoRun:
    """What every stage of one demo run needs."""

    out: Path
    sample: Path
    checkpoints: dict[str, Path]
    device: Any
    healthy: list[Any]
    test: list[Any]
    seed: int
    batch_size: int
    workers: int
    progress: bool
    stages: _Stages


def _target_text() -> str:
    """The default calibration target in words."""
    from medidiff.constants import CALIBRATION_DEFAULTS as d

    if d["target"] == "fp-volume":
        return (f"at most {d['max_fp_ml']:g} ml of false positives per healthy scan, components "
                f"under {d['min_component_ml']:g} ml dropped")
    return f"{FPR:.0%} voxel FPR"


def _anomaly_stages(run: _DemoRun) -> dict[str, Any]:
    """Load, calibrate, score, the baseline, evaluate: everything anomaly detection does."""
    from medidiff.anomaly.baseline import IntensityBaseline
    from medidiff.anomaly.detector import AnomalyDetector
    from medidiff.anomaly.methods import MethodConfig
    from medidiff.anomaly.metrics import evaluate_cases
    from medidiff.anomaly.calibration import default_calibration
    from medidiff.anomaly.runner import calibrate
    from medidiff.models.checkpoint import build_model_from_checkpoint, load_inference

    out, stages, healthy, test = run.out, run.stages, run.healthy, run.test
    common = {"workers": run.workers, "progress": run.progress}
    with stages.stage("load", f"loading the models and sample_data ({len(healthy)} healthy "
                      f"validation scans, {len(test)} test scans)"):
        loaded = build_model_from_checkpoint(run.checkpoints["2d"], run.device)
        ckpt3d = load_inference(run.checkpoints["3d"])
        detector = AnomalyDetector(loaded, MethodConfig(), device=run.device,
                                   batch_size=run.batch_size, seed=run.seed)
    method = detector.method
    with stages.stage("calibrate", f"calibrating the default method ({method.method}, "
                      f"t={method.t_start}, {method.steps} steps) on the "
                      f"healthy validation scans ({_target_text()})"):
        thresholds = calibrate(detector, healthy, fpr=FPR, **default_calibration(detector),
                               **common)
        thresholds_path = thresholds.save(out / "thresholds.json")
    with stages.stage("score", f"scoring {len(test)} test scans -> {out / 'anomaly'}"):
        scored = _score_test(detector, test, thresholds, thresholds_path, out / "anomaly",
                             **common)
    with stages.stage("baseline", "the no-network intensity baseline: calibrate and score"):
        baseline = IntensityBaseline.from_healthy(loaded.checkpoint, healthy,
                                                  detector.postprocess)
        base_thresholds = calibrate(baseline, healthy, fpr=FPR,
                                    **default_calibration(baseline), workers=run.workers)
        base_thresholds.save(out / "thresholds_baseline.json")
        base_scored = _score_baseline(baseline, test, base_thresholds, out / "baseline", **common)
    with stages.stage("evaluate", "evaluating against the lesion masks (inside brain masks)"):
        evaluation = evaluate_cases([s.case for s in scored],
                                    voxel_threshold=thresholds.voxel_threshold)
        base_evaluation = evaluate_cases([s.case for s in base_scored],
                                         voxel_threshold=base_thresholds.voxel_threshold)
        per_kind = per_kind_table(evaluation, base_evaluation)
    return {"loaded": loaded, "ckpt3d": ckpt3d, "detector": detector, "baseline": baseline,
            "thresholds": thresholds, "thresholds_path": thresholds_path,
            "base_thresholds": base_thresholds, "scored": scored, "evaluation": evaluation,
            "base_evaluation": base_evaluation, "per_kind": per_kind,
            "quality": quality_checks(per_kind)}


def _synthesis_stages(run: _DemoRun, checkpoints: Mapping[str, Any], num_synth: int
                      ) -> dict[str, Any]:
    """A few 2D slices and 3D volumes with the fast sampler (DPM-Solver++(2M), 20 steps), or
    a rectified-flow model's own (Euler, 30 steps): :func:`synthesis_settings`."""
    from medidiff.synthesis.folder import synthesize_to_folder
    from medidiff.synthesis.synthesizer import Synthesizer

    synthesis: dict[str, Any] = {}
    for key, kind in (("2d", "slices"), ("3d", "volumes")):
        ckpt = checkpoints[key]
        sampler, steps = synthesis_settings(_prediction_type(ckpt))
        with run.stages.stage(f"synthesis_{key}", f"synthesising {num_synth} {key.upper()} "
                              f"{kind} ({sampler}, {steps} steps)"):
            synth = Synthesizer(ckpt, device=run.device, sampler=sampler,
                                steps=steps, batch_size=min(num_synth, 8))
            summary = synthesize_to_folder(synth, run.out / f"synthesis_{key}", num_synth,
                                           seed=run.seed, overwrite=True, progress=run.progress)
            synthesis[key] = {
                "folder": rel_path(summary.out_dir, run.out), "montage": rel_path(summary.montage, run.out),
                "kind": summary.kind, "num": summary.num_files, "sampler": synth.sampler,
                "steps": synth.steps, "seconds": summary.seconds,
                "shape": list(synth.output_shape),
                "checkpoint": str(ckpt.path),
            }
    return synthesis


def _prediction_type(ckpt: Any) -> str:
    """What a checkpoint's network predicts (``epsilon`` when its config says nothing)."""
    return str((ckpt.config.get("diffusion") or {}).get("prediction_type", "epsilon"))


def _anomaly_3d_stage(run: _DemoRun, anomaly: Mapping[str, Any]) -> dict[str, Any]:
    """The 3D latent anomaly scoring: the ``latent`` method of a latent 3D model calibrated on
    the healthy validation scans at the same FPR, the test scans scored into
    ``DIR/anomaly_3d`` and evaluated as the 2D default is; skipped (with the reason) for a
    pixel-space 3D model."""
    ckpt3d = anomaly["ckpt3d"]
    title = "3D latent anomaly scoring"
    if ckpt3d.network != "latent_diffusion":
        reason = (f"the 3D model {Path(ckpt3d.path).name} is a pixel-space model; the latent "
                  "method needs a latent model (stage: latent), like the shipped brain_mri_3d")
        run.stages.skip(title, reason)
        return {"ran": False, "reason": reason}
    from medidiff.anomaly.detector import AnomalyDetector
    from medidiff.anomaly.methods import MethodConfig
    from medidiff.anomaly.calibration import default_calibration
    from medidiff.anomaly.metrics import evaluate_cases
    from medidiff.anomaly.runner import calibrate
    from medidiff.models.loaded import load_model

    out, common = run.out, {"workers": run.workers, "progress": run.progress}
    with run.stages.stage("anomaly_3d", f"{title}: the latent method of the 3D model, calibrated "
                          f"on the healthy validation scans ({_target_text()}), on {len(run.test)} "
                          f"test scans -> {out / 'anomaly_3d'}"):
        detector = AnomalyDetector(load_model(ckpt3d, run.device), MethodConfig("latent"),
                                   device=run.device, batch_size=run.batch_size, seed=run.seed)
        thresholds = calibrate(detector, run.healthy, fpr=FPR, **default_calibration(detector),
                               **common)
        thresholds_path = thresholds.save(out / "thresholds_3d.json")
        scored = _score_test(detector, run.test, thresholds, thresholds_path,
                             out / "anomaly_3d", **common)
        evaluation = evaluate_cases([s.case for s in scored],
                                    voxel_threshold=thresholds.voxel_threshold)
    scans = [{"name": s.name, "kind": s.kind, "score": s.row["score"],
              "flagged": s.row["flagged"] == "yes",
              "dice": case.dice if case.has_lesion else None,
              "network_evaluations": s.row["network_evaluations"], "seconds": s.row["seconds"],
              "files": {k: rel_path(v, out) for k, v in s.files.items()}}
             for s, case in zip(scored, evaluation.cases)]
    return {
        "ran": True, "reason": None, "checkpoint": str(ckpt3d.path),
        "method": detector.method.to_dict(), "postprocess": detector.postprocess.to_dict(),
        "nfe_per_input": detector.nfe_per_input,
        "thresholds": thresholds.to_dict(), "thresholds_file": rel_path(thresholds_path, out),
        "folder": rel_path(out / "anomaly_3d", out),
        "evaluation": evaluation.to_dict(),
        "per_kind": anomaly_3d_per_kind(evaluation, anomaly["per_kind"]),
        "cost": {"latent_3d": cost_per_volume(scored),
                 "default_2d": cost_per_volume(anomaly["scored"])},
        "scans": scans,
    }


def _figures_stage(run: _DemoRun, anomaly: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The how-it-works strips; a failure is a note of the report, not the end of the demo."""
    figures: dict[str, str | None] = {}
    notes: list[str] = []
    with run.stages.stage("figures", "drawing the how-it-works strips"):
        try:
            from medidiff.viz.figures import save_how_it_works_figures
        except ImportError as exc:
            notes.append(f"how-it-works strips not drawn: medidiff.viz.figures is unavailable ({exc})")
        else:
            try:
                kept = [x.result for x in anomaly["scored"] if x.result is not None]
                written = save_how_it_works_figures(
                    run.checkpoints["2d"], run.sample, run.out / "figures",
                    detector=anomaly["detector"], thresholds=anomaly["thresholds"],
                    device=run.device, seed=run.seed, anomaly_result=kept[0] if kept else None)
                figures = {k: rel_path(v, run.out) for k, v in written.items()}
            except Exception as exc:  # noqa: BLE001 - the report says so; the rest stands
                if os.environ.get("MEDIDIFF_DEBUG"):
                    raise
                notes.append(f"how-it-works strips failed: {type(exc).__name__}: {exc}")
        for note in notes:
            print(f"medidiff demo: warning: {note}", file=sys.stderr, flush=True)
    return figures, notes


def _metrics(run: _DemoRun, anomaly: Mapping[str, Any], anomaly_3d: Mapping[str, Any],
             synthesis: Mapping[str, Any],
             figures: Mapping[str, Any], notes: Sequence[str], *, limit: int | None,
             num_synth: int, argv: Sequence[str] | None,
             shipped: Mapping[str, str | None]) -> dict[str, Any]:
    """The content of metrics.json (without its total time)."""
    out, detector = run.out, anomaly["detector"]
    evaluation, base_evaluation = anomaly["evaluation"], anomaly["base_evaluation"]
    return {
        "format": DEMO_FORMAT,
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "out_dir": str(out),
        "sample_data": str(run.sample),
        "data": {
            "calibration_scans": [e.name for e in run.healthy],
            "test_scans": [{"name": e.name, "kind": _kind(e)} for e in run.test],
            "limit": limit,
        },
        "method": detector.method.to_dict(),
        "postprocess": detector.postprocess.to_dict(),
        "nfe_per_slice": detector.nfe_per_input,
        "thresholds": {"default": anomaly["thresholds"].to_dict(),
                       "baseline": anomaly["base_thresholds"].to_dict()},
        "baseline": {"method": anomaly["baseline"].method.to_dict(),
                     "description": "x_hat = the median brain intensity of the healthy "
                     "validation scans on the model grid; the same post-processing and "
                     "calibration as the default method; no network"},
        "evaluation": {"default": evaluation.to_dict(), "baseline": base_evaluation.to_dict()},
        "per_kind": anomaly["per_kind"],
        "quality": [q.to_dict() for q in anomaly["quality"]],
        "scans": scan_rows(anomaly["scored"], evaluation, base_evaluation, out),
        "anomaly_3d": dict(anomaly_3d),
        "synthesis": synthesis,
        "figures": figures,
        "models": {
            "2d": checkpoint_facts(anomaly["loaded"].checkpoint, shipped["2d"]),
            "3d": checkpoint_facts(anomaly["ckpt3d"], shipped["3d"]),
        },
        "commands": reproduce_commands(
            out, run.sample, run.checkpoints["2d"], run.checkpoints["3d"], num_synth, limit, argv,
            synthesis={k: (v["sampler"], v["steps"]) for k, v in synthesis.items()},
            anomaly_3d=bool(anomaly_3d.get("ran"))),
        **machine_facts(run.device),
        "workers": run.workers,
        "timings": dict(run.stages.seconds),
        "time_budget_s": TIME_BUDGET_S,
        "notes": list(notes),
    }


def _write_metrics_and_report(metrics: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    from medidiff.io.atomic import write_json_atomic
    from medidiff.viz.report import write_demo_report

    metrics_path = write_json_atomic(out / "metrics.json", jsonable(metrics))
    return metrics_path, write_demo_report(jsonable(metrics), out)


def format_timings(timings: Mapping[str, float], total: float) -> str:
    """A small text table of the stage times."""
    width = max(len(k) for k in timings) if timings else 5
    lines = [f"  {k:<{width}}  {v:7.1f} s" for k, v in timings.items()]
    lines.append(
        f"  {'total':<{width}}  {total:7.1f} s  (budget {TIME_BUDGET_S:.0f} s on 2 CPU cores)"
    )
    return "\n".join(lines)

