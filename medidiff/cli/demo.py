"""The main job: anomaly detection and synthesis on sample_data with the default models.

:func:`run_demo` (``medidiff demo``, ``make demo``) runs every part of medidiff once, end
to end, on the repository's ``sample_data/`` and writes one folder with an HTML report:

1. reads ``sample_data/dataset.json`` (Decathlon layout): the ``validation`` split
   (healthy scans with brain masks) and the ``test`` split (``kind`` tumor / ms / stroke /
   healthy; ``label`` the lesion mask, ``mask`` the brain mask);
2. builds an :class:`~medidiff.anomaly.detector.AnomalyDetector` with the default method
   (``MethodConfig()``: DDIM, t = 50, 3 steps) on the default 2D model and calibrates it
   on the healthy validation scans at a 5 % false-positive rate -> ``DIR/thresholds.json``;
3. scores every test scan -> ``DIR/anomaly/NAME_anomaly.nii.gz``, ``NAME_recon.nii.gz``,
   ``NAME_seg.nii.gz`` (on the scan's own grid), ``NAME_overlay.png`` and ``scores.csv``,
   the same files ``medidiff anomaly`` writes;
4. evaluates the maps against the lesion masks inside the brain masks
   (:func:`medidiff.anomaly.metrics.evaluate_cases`, grouped by kind), for the default method and
   for the no-network intensity baseline (:mod:`medidiff.anomaly.baseline`, calibrated the same
   way) side by side;
5. synthesises a few axial slices with the 2D model and a few volumes with the 3D model
   (DPM-Solver++(2M), 20 steps) -> ``DIR/synthesis_2d``, ``DIR/synthesis_3d``;
6. draws the "how it works" strips (:func:`medidiff.viz.figures.save_how_it_works_figures`)
   -> ``DIR/figures``;
7. writes ``DIR/metrics.json`` (method, thresholds, both evaluations, the per-kind table,
   quality bars, stage timings, model facts, versions) and ``DIR/report.html``
   (:mod:`medidiff.viz.report`).

The quality bars the report states plainly (pass or fail): the default method's voxel
AUROC over all test scans against the baseline's, and, for every lesion kind, the default
method's voxel AUPRC against the baseline's.

Example:
    >>> from medidiff.cli.demo import run_demo  # doctest: +SKIP
    >>> result = run_demo("demo_out")        # doctest: +SKIP
    >>> result.report                        # doctest: +SKIP
    PosixPath('demo_out/report.html')
"""

from __future__ import annotations

import functools
import math
import os
import platform
import shlex
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
#: the lesion kinds of sample_data whose AUPRC is a quality bar
LESION_KINDS = ("tumor", "ms", "stroke")
#: the quality bar on the default method's voxel AUROC over all test scans
AUROC_BAR = 0.90
#: the test scan the anomaly strip shows (as in docs/how_it_works.md)
FIGURE_CASE = "tumor-000"
#: what the demo writes into its folder (removed by ``overwrite`` before a new run)
OUTPUT_NAMES = (
    "anomaly", "baseline", "synthesis_2d", "synthesis_3d", "figures", "thresholds.json",
    "thresholds_baseline.json", "metrics.json", "report.html",
)
#: the calibration false-positive rate (voxels and scans)
FPR = 0.05
#: the fast synthesis sampler (Lu et al. 2022: good samples at 10-20 steps)
SYNTH_SAMPLER, SYNTH_STEPS = "dpm++2m", 20
#: the wall-time budget the demo aims at on 2 CPU cores (seconds)
TIME_BUDGET_S = 300.0


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QualityCheck:
    """One quality bar of the report.

    Attributes:
        name: short name, e.g. ``"auprc_tumor"``.
        description: what is compared, in words.
        value: the default method's number.
        reference: the number it is compared with (the baseline's).
        passed: ``True``/``False``; ``None`` when it could not be evaluated (e.g. no scan
            of that kind with ``limit``).
        detail: the verdict in one sentence.
    """

    name: str
    description: str
    value: float | None
    reference: float | None
    passed: bool | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "value": _finite_or_none(self.value),
            "reference": _finite_or_none(self.reference),
            "passed": self.passed,
            "detail": self.detail,
        }


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


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _jsonable(obj: Any) -> Any:
    """Strict-JSON form: NaN/Inf -> None, numpy scalars -> Python, paths -> str."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


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
    from medidiff.io.volume import write_json_atomic

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


def _load_splits(sample_data: Path, limit: int | None) -> tuple[list[Any], list[Any]]:
    """The healthy validation entries and the test entries (``limit``: N test scans taking
    the kinds in turn, so a quick look still shows every kind)."""
    from medidiff.data.datasets import load_datalist

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
        from medidiff.data.datasets import stratified_by_kind

        test = stratified_by_kind(test, limit)
    return healthy, test


def _kind(entry: Any) -> str:
    from medidiff.anomaly.runner import entry_kind

    return entry_kind(entry)


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------


def _evaluation_case(result: Any, entry: Any, out: Path | None, *,
                     map_max: float | None = None) -> dict[str, Any]:
    """``on_result`` of the runner for a test scan: its compact evaluation case
    (:func:`medidiff.anomaly.runner.entry_case`) and, with ``out``, its overlay with the truth."""
    from medidiff.anomaly.runner import entry_case
    from medidiff.data.transforms import to_model
    from medidiff.viz.overlay import save_result_overlay

    case = entry_case(result, entry, compact=False)
    files = {}
    if out is not None:
        truth_grid = to_model(case.truth.astype(np.uint8), result.preprocessed) > 0
        files["overlay"] = save_result_overlay(result, out, truth=truth_grid, map_max=map_max)
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

    hook = functools.partial(_evaluation_case, map_max=map_scale(thresholds))
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


def _group_numbers(g: Any) -> dict[str, Any]:
    return {
        "n_scans": g.n_scans,
        "voxel_auroc": _finite_or_none(g.voxel.auroc),
        "voxel_auprc": _finite_or_none(g.voxel.auprc),
        "dice_dataset_wise": _finite_or_none(g.dice_dataset_wise),
        "dice_per_scan_mean": _finite_or_none(g.dice_per_scan_mean),
        "voxel_fpr": _finite_or_none(g.voxel_fpr),
        "oracle_dice": _finite_or_none(g.oracle.dice),
        "scan_auroc": _finite_or_none(g.scan.auroc),
    }


def _per_kind(default: Any, baseline: Any) -> dict[str, dict[str, Any]]:
    """kind -> {"default": numbers, "baseline": numbers}, lesion kinds first, then "all"."""
    kinds = [k for k in LESION_KINDS if k in default.groups]
    kinds += sorted(k for k in default.groups if k not in kinds)
    table = {
        k: {"default": _group_numbers(default.groups[k]),
            "baseline": _group_numbers(baseline.groups[k])}
        for k in kinds
    }
    table["all"] = {"default": _group_numbers(default.overall),
                    "baseline": _group_numbers(baseline.overall)}
    return table


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _quality(per_kind: Mapping[str, Mapping[str, Any]]) -> tuple[QualityCheck, ...]:
    """The bars: voxel AUROC (all scans) and AUPRC per lesion kind, default vs baseline."""
    checks = []
    allrow = per_kind["all"]
    value, ref = allrow["default"]["voxel_auroc"], allrow["baseline"]["voxel_auroc"]
    passed = None if value is None else bool(value >= AUROC_BAR)
    checks.append(QualityCheck(
        "voxel_auroc",
        f"voxel AUROC of the default method over all test scans (inside the brain masks) "
        f">= {AUROC_BAR:.2f}",
        value, AUROC_BAR, passed,
        f"voxel AUROC {_fmt(value)} (default method; intensity baseline {_fmt(ref)}), "
        f"bar {AUROC_BAR:.2f}: "
        + {True: "PASS", False: f"FAIL, short by {AUROC_BAR - (value or 0):.3f}",
           None: "not evaluated"}[passed],
    ))
    for kind in LESION_KINDS:
        row = per_kind.get(kind)
        value = row["default"]["voxel_auprc"] if row else None
        ref = row["baseline"]["voxel_auprc"] if row else None
        passed = None if value is None or ref is None else bool(value > ref)
        verdict = {True: "PASS, the default method is better",
                   False: "FAIL, the default method is not better than the baseline",
                   None: "not evaluated (no test scan of this kind)" if row is None
                   else "not evaluated (undefined)"}[passed]
        checks.append(QualityCheck(
            f"auprc_{kind}",
            f"voxel AUPRC on the {kind} scans, default method vs intensity baseline",
            value, ref, passed,
            f"{kind}: voxel AUPRC {_fmt(value)} (default method) vs {_fmt(ref)} "
            f"(intensity baseline): {verdict}",
        ))
    return tuple(checks)


def _scan_rows(scored: Sequence[_Scored], evaluation: Any, base_evaluation: Any,
               out: Path) -> list[dict[str, Any]]:
    """The per-scan table: the default method's row and Dice, the baseline's score and Dice."""
    base_cases = {c.name: c for c in base_evaluation.cases}
    rows = []
    for s, case in zip(scored, evaluation.cases):
        b = base_cases.get(s.name)
        rows.append({
            "name": s.name,
            "kind": s.kind,
            "score": s.row["score"],
            "flagged": s.row["flagged"] == 1,
            "voxels_over_threshold": s.row["voxels_over_threshold"],
            "lesion_voxels": case.lesion_voxels,
            # Dice of a scan without lesion is undefined (0 with any false positive)
            "dice": _finite_or_none(case.dice) if case.has_lesion else None,
            "seconds": s.row["seconds"],
            "network_evaluations": s.row["network_evaluations"],
            "baseline_score": b.score if b else None,
            "baseline_dice": _finite_or_none(b.dice) if b and b.has_lesion else None,
            "files": {k: _rel(v, out) for k, v in s.files.items()},
        })
    return rows


# --------------------------------------------------------------------------------------------
# facts for the report
# --------------------------------------------------------------------------------------------


def _checkpoint_facts(ckpt: Any, shipped_name: str | None) -> dict[str, Any]:
    """The checkpoint's own record, plus the model card's facts when it is a shipped model."""
    from medidiff.config import Config

    try:
        cfg = Config.from_dict(ckpt.config)
        model = {"spatial_dims": cfg.model.spatial_dims, "preset": cfg.model.preset}
        d = cfg.diffusion
        diffusion = {"schedule": d.schedule, "T": d.num_train_timesteps, "noise": d.noise,
                     "prediction_type": d.prediction_type}
    except Exception:  # noqa: BLE001 - facts only; an unusable config already failed earlier
        model, diffusion = {}, {}
    params = int(sum(int(np.prod(t.shape)) for t in ckpt.state_dict.values()))
    prep = ckpt.preprocessing or {}
    facts: dict[str, Any] = {
        "path": str(ckpt.path),
        "sha256": ckpt.sha256,
        "training_step": ckpt.extra.get("step"),
        "parameters": params,
        "grid_shape": prep.get("shape"),
        "grid_spacing_mm": prep.get("spacing"),
        **model,
        **diffusion,
        "written_by": f"medidiff {ckpt.version}",
    }
    card: dict[str, Any] = {}
    if shipped_name is not None:
        from medidiff.models.pretrained import model_card_facts

        card = model_card_facts(shipped_name)
    return {"name": shipped_name or Path(ckpt.path).name, "shipped": shipped_name is not None,
            "checkpoint": facts, "card": card}


def _shipped_name(arg: Any, resolved: Path, default: str) -> str | None:
    """The shipped model's name when ``resolved`` is the package's own file."""
    from medidiff.models.pretrained import MODELS, WEIGHTS_DIR

    if arg is None or (isinstance(arg, str) and arg in MODELS):
        return default if arg is None else str(arg)
    try:
        if Path(resolved).resolve().parent == WEIGHTS_DIR.resolve():
            stem = Path(resolved).name.removesuffix(".safetensors")
            return stem if stem in MODELS else None
    except OSError:
        pass
    return None


def _machine(device: Any) -> dict[str, Any]:
    import torch

    versions = {"medidiff": medidiff.__version__, "python": platform.python_version(),
                "torch": torch.__version__, "numpy": np.__version__}
    for module in ("monai", "nibabel", "SimpleITK", "sklearn", "scipy"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - informative only
            versions[module] = "unknown"
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if str(device).startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(device)
    return {"versions": versions, "machine": machine}


def _commands(out: Path, sample_data: Path, ckpt2d: Path, ckpt3d: Path, num_synth: int,
              limit: int | None, argv: Sequence[str] | None) -> list[str]:
    """The shell commands that reproduce the report's numbers step by step."""
    q = shlex.quote
    data = q(str(sample_data / "dataset.json"))
    if argv:
        demo = "medidiff demo " + " ".join(q(a) for a in argv)
    else:
        demo = f"medidiff demo --out {q(str(out))}"
    lines = [
        "# everything at once:",
        demo,
        "# or step by step (same checkpoint, method and data):",
        f"medidiff calibrate --checkpoint {q(str(ckpt2d))} --healthy {data} --split validation "
        f"--fpr {FPR:g} --out {q(str(out / 'thresholds.json'))}",
        f"medidiff anomaly --checkpoint {q(str(ckpt2d))} --input {data} --split test "
        f"--thresholds {q(str(out / 'thresholds.json'))} --out {q(str(out / 'anomaly'))}",
        f"medidiff evaluate --pred {q(str(out / 'anomaly'))} --truth {data} "
        f"--thresholds {q(str(out / 'thresholds.json'))}",
        f"medidiff synthesize --checkpoint {q(str(ckpt2d))} --num {num_synth} "
        f"--sampler {SYNTH_SAMPLER} --steps {SYNTH_STEPS} --out {q(str(out / 'synthesis_2d'))}",
        f"medidiff synthesize --checkpoint {q(str(ckpt3d))} --num {num_synth} "
        f"--sampler {SYNTH_SAMPLER} --steps {SYNTH_STEPS} --out {q(str(out / 'synthesis_3d'))}",
        "# every anomaly method and the baseline side by side:",
        f"python pipelines/benchmark_anomaly.py --checkpoint {q(str(ckpt2d))}",
    ]
    if limit is not None:
        lines.insert(3, f"# (this run scored {limit} test scans, the kinds taken in turn)")
    return lines


def _rel(path: Any, out: Path) -> str | None:
    """``path`` relative to ``out`` (posix), or ``None`` when it is missing."""
    if path is None or not Path(path).exists():
        return None
    return Path(os.path.relpath(Path(path), out)).as_posix()


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
            the shipped ``brain_mri_2d``, :func:`medidiff.models.pretrained.resolve_checkpoint`).
        checkpoint_3d: the 3D model for volume synthesis (default: the shipped
            ``brain_mri_3d``).
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
    from medidiff.errors import ConfigError
    from medidiff.models.pretrained import DEFAULT_2D, DEFAULT_3D, resolve_checkpoint
    from medidiff.runtime.distributed import resolve_device
    from medidiff.runtime.parallel import default_workers

    began = time.perf_counter()
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
    run = _DemoRun(out, sample, paths, dev, healthy, test, seed, batch_size, workers, progress,
                   _Stages(9, progress))
    anomaly = _anomaly_stages(run)
    synthesis = _synthesis_stages(
        run, {"2d": anomaly["loaded"].checkpoint, "3d": anomaly["ckpt3d"]}, num_synth)
    figures, notes = _figures_stage(run, anomaly)
    with run.stages.stage("report", f"writing {out / 'metrics.json'} and {out / 'report.html'}"):
        metrics = _metrics(run, anomaly, synthesis, figures, notes, limit=limit,
                           num_synth=num_synth, argv=argv,
                           shipped={"2d": _shipped_name(checkpoint_2d, paths["2d"], DEFAULT_2D),
                                    "3d": _shipped_name(checkpoint_3d, paths["3d"], DEFAULT_3D)})
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


def _anomaly_stages(run: _DemoRun) -> dict[str, Any]:
    """Load, calibrate, score, the baseline, evaluate: everything anomaly detection does."""
    from medidiff.anomaly.baseline import IntensityBaseline
    from medidiff.anomaly.detector import AnomalyDetector
    from medidiff.anomaly.methods import MethodConfig
    from medidiff.anomaly.metrics import evaluate_cases
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
                      f"healthy validation scans at {FPR:.0%} FPR"):
        thresholds = calibrate(detector, healthy, fpr=FPR, **common)
        thresholds_path = thresholds.save(out / "thresholds.json")
    with stages.stage("score", f"scoring {len(test)} test scans -> {out / 'anomaly'}"):
        scored = _score_test(detector, test, thresholds, thresholds_path, out / "anomaly",
                             **common)
    with stages.stage("baseline", "the no-network intensity baseline: calibrate and score"):
        baseline = IntensityBaseline.from_healthy(loaded.checkpoint, healthy,
                                                  detector.postprocess)
        base_thresholds = calibrate(baseline, healthy, fpr=FPR, workers=run.workers)
        base_thresholds.save(out / "thresholds_baseline.json")
        base_scored = _score_baseline(baseline, test, base_thresholds, out / "baseline", **common)
    with stages.stage("evaluate", "evaluating against the lesion masks (inside brain masks)"):
        evaluation = evaluate_cases([s.case for s in scored],
                                    voxel_threshold=thresholds.voxel_threshold)
        base_evaluation = evaluate_cases([s.case for s in base_scored],
                                         voxel_threshold=base_thresholds.voxel_threshold)
        per_kind = _per_kind(evaluation, base_evaluation)
    return {"loaded": loaded, "ckpt3d": ckpt3d, "detector": detector, "baseline": baseline,
            "thresholds": thresholds, "thresholds_path": thresholds_path,
            "base_thresholds": base_thresholds, "scored": scored, "evaluation": evaluation,
            "base_evaluation": base_evaluation, "per_kind": per_kind,
            "quality": _quality(per_kind)}


def _synthesis_stages(run: _DemoRun, checkpoints: Mapping[str, Any], num_synth: int
                      ) -> dict[str, Any]:
    """A few 2D slices and 3D volumes with the fast sampler."""
    from medidiff.synthesis.synthesizer import Synthesizer, synthesize_to_folder

    synthesis: dict[str, Any] = {}
    for key, kind in (("2d", "slices"), ("3d", "volumes")):
        with run.stages.stage(f"synthesis_{key}", f"synthesising {num_synth} {key.upper()} "
                              f"{kind} ({SYNTH_SAMPLER}, {SYNTH_STEPS} steps)"):
            ckpt = checkpoints[key]
            synth = Synthesizer(ckpt, device=run.device, sampler=SYNTH_SAMPLER,
                                steps=SYNTH_STEPS, batch_size=min(num_synth, 8))
            summary = synthesize_to_folder(synth, run.out / f"synthesis_{key}", num_synth,
                                           seed=run.seed, overwrite=True, progress=run.progress)
            synthesis[key] = {
                "folder": _rel(summary.out_dir, run.out), "montage": _rel(summary.montage, run.out),
                "kind": summary.kind, "num": summary.num_files, "sampler": synth.sampler,
                "steps": synth.steps, "seconds": summary.seconds,
                "shape": list(synth.output_shape),
                "checkpoint": str(ckpt.path),
            }
    return synthesis


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
                figures = {k: _rel(v, run.out) for k, v in written.items()}
            except Exception as exc:  # noqa: BLE001 - the report says so; the rest stands
                if os.environ.get("MEDIDIFF_DEBUG"):
                    raise
                notes.append(f"how-it-works strips failed: {type(exc).__name__}: {exc}")
        for note in notes:
            print(f"medidiff demo: warning: {note}", file=sys.stderr, flush=True)
    return figures, notes


def _metrics(run: _DemoRun, anomaly: Mapping[str, Any], synthesis: Mapping[str, Any],
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
        "scans": _scan_rows(anomaly["scored"], evaluation, base_evaluation, out),
        "synthesis": synthesis,
        "figures": figures,
        "models": {
            "2d": _checkpoint_facts(anomaly["loaded"].checkpoint, shipped["2d"]),
            "3d": _checkpoint_facts(anomaly["ckpt3d"], shipped["3d"]),
        },
        "commands": _commands(out, run.sample, run.checkpoints["2d"], run.checkpoints["3d"],
                              num_synth, limit, argv),
        **_machine(run.device),
        "workers": run.workers,
        "timings": dict(run.stages.seconds),
        "time_budget_s": TIME_BUDGET_S,
        "notes": list(notes),
    }


def _write_metrics_and_report(metrics: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    from medidiff.io.volume import write_json_atomic
    from medidiff.viz.report import write_demo_report

    metrics_path = write_json_atomic(out / "metrics.json", _jsonable(metrics))
    return metrics_path, write_demo_report(_jsonable(metrics), out)


def format_timings(timings: Mapping[str, float], total: float) -> str:
    """A small text table of the stage times."""
    width = max(len(k) for k in timings) if timings else 5
    lines = [f"  {k:<{width}}  {v:7.1f} s" for k, v in timings.items()]
    lines.append(
        f"  {'total':<{width}}  {total:7.1f} s  (budget {TIME_BUDGET_S:.0f} s on 2 CPU cores)"
    )
    return "\n".join(lines)

