"""Score scans for anomalies: voxel maps, reconstructions, segmentations and per-scan scores.

Each scan is noised part of the way and denoised by a model trained on healthy scans; the
residual between scan and reconstruction, post-processed on the model grid (brain mask,
3D median filter, eroded mask), is the anomaly map. Methods (--method):

  ddim      noise to --t-start (50), --steps DDIM steps (3)              [default, fast]
  anoddpm   noise to --t-start (250), full DDPM chain (t + 1 = 251 steps) [slow reference]
  x0        noise to --t-start (250), one-shot x0 prediction (1 step)
  patched   pDDPM: noise one patch at a time at t = 500, one-shot, stitched
            (--patch-size / --patch-stride in model voxels; default half the slice, 50 % overlap)
  ensemble  residuals averaged over --t-starts (250 500 750), one-shot each (cDDPM-style)

The noise defaults to the one the checkpoint was trained with (--noise to override).

Outputs in --out, for each input NAME, on the input's own grid and affine:
  NAME_anomaly.nii.gz   float32 anomaly map
  NAME_recon.nii.gz     reconstruction, in the input's intensity units
  NAME_seg.nii.gz       uint8 segmentation (only with --thresholds from 'medidiff calibrate')
  NAME_overlay.png      a few axial slices: input, reconstruction, map, segmentation contour
plus scores.csv (one row per scan: file, name, score, flagged, voxels_over_threshold,
seconds, network_evaluations, nfe_per_input) and anomaly_config.json (method, checkpoint
and its sha256, seed, version). Scans whose outputs and scores.csv row already exist are
skipped (resumable) unless --overwrite; temporaries left by a killed run are deleted. A
file that cannot be read or scored (corrupt, truncated, 4D, 2D, NaN/Inf, constant, ...) is
reported on one line and skipped, leaving no outputs of its own; the run then ends with
exit status 4, listing them (when no scan at all could be scored, a new --out is not
created). Missing paths and empty folders are refused before anything is scored. Under
torchrun the inputs are shared out over the ranks and rank 0 writes scores.csv.

Examples:
    medidiff anomaly --checkpoint runs/brain_mri_2d/model.safetensors \\
        --input sample_data/test/images --out results/
    medidiff anomaly --checkpoint model.safetensors --input sample_data/dataset.json \\
        --split test --thresholds thresholds.json --method anoddpm --out results_anoddpm/
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from medidiff.cli.commands._common import add_device_args
from medidiff.constants import (
    ANOMALY_DEFAULTS,
    ANOMALY_METHODS,
    ENSEMBLE_STARTS,
    NOISE_KINDS,
    SAMPLERS,
)

#: Methods, from medidiff.constants so that ``--help`` needs no heavy import.
METHOD_NAMES = ANOMALY_METHODS
EXIT_SOME_FAILED = 4
SCORE_COLUMNS = (
    "file",
    "name",
    "score",
    "flagged",
    "voxels_over_threshold",
    "seconds",
    "network_evaluations",
    "nfe_per_input",
)


# ---- arguments shared with 'medidiff calibrate' ---------------------------------------------


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--checkpoint, method and post-processing options, batch size, device, seed, masks."""
    p.add_argument(
        "--checkpoint",
        help="model.safetensors written by 'medidiff train', or the name of a shipped model "
        "(default: brain_mri_2d, the 2D brain T1 model inside the package; its model card is "
        "medidiff/weights/brain_mri_2d.md)",
    )
    p.add_argument(
        "--split",
        default=None,
        help="which list of a Decathlon dataset.json (or CSV split) to read (default: training)",
    )
    p.add_argument(
        "--masks",
        default=None,
        metavar="DIR_or_DATALIST",
        help="brain masks: a folder with files named like the inputs, or a datalist whose entries "
        "have a 'mask' (default: a datalist entry's own mask, else the preprocessed foreground)",
    )
    m = p.add_argument_group("method")
    m.add_argument(
        "--method",
        default="ddim",
        choices=METHOD_NAMES,
        help="reconstruction method (default: ddim)",
    )
    m.add_argument(
        "--t-start",
        type=int,
        default=None,
        help="noise level, a timestep of 0..T-1 (default "
        + "; ".join(f"{m} {t}" for m, (t, _, _) in ANOMALY_DEFAULTS.items() if t is not None)
        + ")",
    )
    m.add_argument(
        "--t-starts",
        type=int,
        nargs="+",
        default=None,
        help=f"ensemble: the noise levels averaged (default {' '.join(map(str, ENSEMBLE_STARTS))})",
    )
    m.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps per start (default: ddim "
        f"{ANOMALY_DEFAULTS['ddim'][2]}, anoddpm t+1 (full chain), one-shot 1)",
    )
    m.add_argument(
        "--sampler",
        default=None,
        choices=SAMPLERS,
        help="reverse sampler (default: the method's; ensemble may use any)",
    )
    m.add_argument(
        "--noise",
        default=None,
        choices=NOISE_KINDS,
        help="noise kind (default: the one the checkpoint was trained with)",
    )
    m.add_argument(
        "--eta", type=float, default=0.0, help="DDIM stochasticity (default 0: deterministic)"
    )
    m.add_argument("--no-clip", action="store_true", help="do not clamp x0 estimates to [0, 1]")
    m.add_argument(
        "--patch-size",
        type=int,
        nargs="+",
        default=None,
        help="patched: patch size in model voxels, one value or one per axis "
        "(default: half the input)",
    )
    m.add_argument(
        "--patch-stride",
        type=int,
        nargs="+",
        default=None,
        help="patched: stride between patches (default: half the patch)",
    )
    m.add_argument(
        "--window-overlap",
        type=float,
        default=0.25,
        help="overlap of sliding windows when the grid exceeds the trained size (default 0.25)",
    )
    q = p.add_argument_group("post-processing")
    q.add_argument(
        "--residual",
        default="l1",
        choices=["l1", "l2"],
        help="residual |x - x_hat| (l1, default) or squared (l2)",
    )
    q.add_argument(
        "--erode",
        type=int,
        default=2,
        help="erode the brain mask by this many model voxels (default 2; 0 disables)",
    )
    q.add_argument(
        "--median-size",
        type=int,
        default=9,
        help="3D median filter edge in model voxels (default 9, tuned for the default model; "
        "3-5 keeps lesions a few voxels wide; 0 or 1 disables)",
    )
    q.add_argument(
        "--min-component",
        type=int,
        default=0,
        help="drop segmented components smaller than this many model voxels (default 0: keep all)",
    )
    q.add_argument(
        "--top-fraction",
        type=float,
        default=0.01,
        help="scan score = mean of this top fraction of voxel scores in the mask (default 0.01)",
    )
    p.add_argument(
        "--batch-size", type=int, default=16, help="network inputs per call (default 16)"
    )
    add_device_args(p)


def configs_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """The (MethodConfig, PostprocessConfig) the options describe."""
    from medidiff.anomaly.methods import MethodConfig
    from medidiff.errors import ConfigError
    from medidiff.anomaly.postprocess import PostprocessConfig

    if args.method != "ensemble" and args.t_starts is not None:
        raise ConfigError(
            f"--t-starts applies to --method ensemble; use --t-start with --method {args.method}"
        )
    if args.method == "ensemble" and args.t_start is not None:
        raise ConfigError(
            "--method ensemble averages several starts: use --t-starts, not --t-start"
        )
    method = MethodConfig(
        method=args.method,
        t_start=args.t_start,
        steps=args.steps,
        sampler=args.sampler,
        noise=args.noise,
        eta=args.eta,
        clip=not args.no_clip,
        t_starts=tuple(args.t_starts) if args.t_starts else None,
        patch_size=tuple(args.patch_size) if args.patch_size else None,
        patch_stride=tuple(args.patch_stride) if args.patch_stride else None,
        window_overlap=args.window_overlap,
    )
    post = PostprocessConfig(
        residual=args.residual,
        erode=args.erode,
        median_size=args.median_size,
        min_component=args.min_component,
        top_fraction=args.top_fraction,
    )
    return method, post


def build_detector(args: argparse.Namespace, checkpoint: Path, method: Any, post: Any, info: Any,
                   *, thresholds: Any = None) -> Any:
    """The :class:`~medidiff.anomaly.detector.AnomalyDetector` the command-line options describe."""
    from medidiff.anomaly.detector import AnomalyDetector

    return AnomalyDetector(
        checkpoint,
        method,
        post,
        device=info.device,
        batch_size=args.batch_size,
        seed=args.seed,
        thresholds=thresholds,
        progress=info.is_main,
    )


def require_checkpoint(args: argparse.Namespace) -> Path:
    """--checkpoint as given, else the shipped default 2D model."""
    from medidiff.models.pretrained import DEFAULT_2D, resolve_checkpoint

    return resolve_checkpoint(args.checkpoint, DEFAULT_2D)


def load_inputs(sources: list[str], split: str | None, masks: str | None) -> list[Any]:
    """Datalist entries of the inputs, each with its brain mask (from --masks if given).

    Raises:
        DataError: no inputs, two inputs with the same name, or a --masks source without
            a mask for some input.
    """
    from dataclasses import replace

    from medidiff.data.datalist import load_datalist
    from medidiff.errors import DataError
    from medidiff.io.volume import is_volume_path, strip_volume_suffix

    entries = load_datalist(sources if len(sources) > 1 else sources[0], split=split)
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


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    from medidiff.errors import MedidiffError

    return text if isinstance(exc, MedidiffError) else f"unexpected {type(exc).__name__}: {text}"


def report_failure(image: Any, exc: BaseException) -> str:
    """Print one line for a skipped input; returns the message."""
    message = one_line(exc)
    if str(image) not in message:
        message = f"{image}: {message}"
    print(f"medidiff: error: skipped {message}", file=sys.stderr, flush=True)
    return message


def gather(obj: Any, info: Any) -> list[Any]:
    """``[obj]`` in a world of one; every rank's ``obj`` under torchrun."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


# ---- the command --------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="files, folder, glob or datalist (CSV, dataset.json)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--thresholds",
        help="thresholds JSON from 'medidiff calibrate' (enables NAME_seg and 'flagged')",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute scans whose outputs exist (default: skip them, i.e. resume)",
    )
    p.add_argument(
        "--no-overlay", action="store_true", help="do not write NAME_overlay.png montages"
    )
    add_model_arguments(p)


def _read_scores(path: Path) -> dict[str, dict[str, str]]:
    import csv

    if not path.exists():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return {row["name"]: row for row in csv.DictReader(f) if row.get("name")}
    except (OSError, KeyError, csv.Error):
        return {}


def _write_scores(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv
    import io

    from medidiff.io import write_text_atomic

    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=list(SCORE_COLUMNS), extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in SCORE_COLUMNS})
    write_text_atomic(path, buffer.getvalue())


def _identity(record: dict[str, Any]) -> dict[str, Any]:
    """The parts of anomaly_config.json that must match for earlier outputs to be reused."""
    return {
        "method": record.get("method"),
        "postprocess": record.get("postprocess"),
        "checkpoint": (record.get("checkpoint") or {}).get("sha256"),
        "seed": record.get("seed"),
        "thresholds": (record.get("thresholds") or {}).get("voxel_threshold"),
    }


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _remove_stale_temporaries(out: Path) -> None:
    """Delete temporaries that a killed run left (``.NAME_anomaly.nii.gz.XXXX.tmp.nii.gz``,
    see :func:`medidiff.io.volume.atomic_path`); finished files are never temporaries."""
    if not out.is_dir():
        return
    finals = ("_anomaly.nii.gz", "_recon.nii.gz", "_seg.nii.gz", "_overlay.png",
              "scores.csv", "anomaly_config.json")
    for entry in os.scandir(out):
        if not entry.name.startswith(".") or ".tmp" not in entry.name:
            continue
        stem = entry.name[1:].partition(".tmp")[0].rsplit(".", 1)[0]  # drop the random part
        if stem.endswith(finals) and entry.is_file():
            _discard(Path(entry.path))


def _check_resumable(out: Path, record: dict[str, Any], overwrite: bool) -> None:
    import json

    from medidiff.errors import OutputError

    path = out / "anomaly_config.json"
    if overwrite or not path.exists():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise OutputError(f"{path}: unreadable; pass --overwrite to recompute everything") from None
    mine, theirs = _identity(record), _identity(old if isinstance(old, dict) else {})
    diff = [k for k in mine if mine[k] != theirs[k]]
    if diff:
        raise OutputError(
            f"{out} holds outputs of another run (anomaly_config.json differs in: "
            f"{', '.join(diff)}); pass --overwrite to replace them or choose another --out"
        )


def run(args: argparse.Namespace) -> int:
    import os

    from tqdm.auto import tqdm

    from medidiff.anomaly.detector import Thresholds, scan_output_paths
    from medidiff.runtime.distributed import barrier, cleanup, init_distributed, shard
    from medidiff.errors import MedidiffError
    from medidiff.io import check_writable_folder, write_json_atomic

    checkpoint = require_checkpoint(args)
    method, post = configs_from_args(args)
    thresholds = Thresholds.load(args.thresholds) if args.thresholds else None
    entries = load_inputs(args.input, args.split, args.masks)
    info = init_distributed(args.device)
    try:
        detector = build_detector(args, checkpoint, method, post, info, thresholds=thresholds)
        out = Path(args.out)
        check_writable_folder(out)  # created by the first write; nothing is left on failure
        created = not out.exists()
        had_config = (out / "anomaly_config.json").exists()
        record = detector.describe()
        record["thresholds"] = (
            None
            if thresholds is None
            else {
                "path": str(args.thresholds),
                "voxel_threshold": thresholds.voxel_threshold,
                "scan_threshold": thresholds.scan_threshold,
                "fpr": thresholds.fpr,
            }
        )
        record["inputs"] = len(entries)
        _check_resumable(out, record, args.overwrite)
        if info.is_main:
            _remove_stale_temporaries(out)
        barrier(info)
        if info.is_main:
            write_json_atomic(out / "anomaly_config.json", record)
        previous = {} if args.overwrite else _read_scores(out / "scores.csv")

        order = {e.name: i for i, e in enumerate(entries)}
        rows: dict[str, dict[str, Any]] = {}
        failures: list[tuple[str, str]] = []
        skipped = 0
        mine = shard(entries, info)
        for entry in tqdm(mine, desc="scans", unit="scan", disable=None if info.is_main else True):
            paths = scan_output_paths(out, entry.name, thresholds is not None)
            if (
                not args.overwrite
                and entry.name in previous
                and all(p.exists() for p in paths.values())
            ):
                rows[entry.name] = previous[entry.name]
                skipped += 1
                continue
            try:
                result = detector.score_file(entry.image, mask=entry.mask, name=entry.name)
                from medidiff.viz.overlay import map_scale

                result.save(out, overlay=not args.no_overlay, map_max=map_scale(detector.thresholds))
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as exc:
                if os.environ.get("MEDIDIFF_DEBUG") and not isinstance(exc, MedidiffError):
                    raise
                failures.append((str(entry.image), report_failure(entry.image, exc)))
                # no partial set of outputs for a failed scan (e.g. the overlay failed)
                for path in (*paths.values(), out / f"{entry.name}_overlay.png"):
                    _discard(path)
                continue
            rows[entry.name] = {"file": str(entry.image), **result.row()}
            if not info.enabled:  # keep scores.csv current, so an interrupted run resumes
                _write_scores(
                    out / "scores.csv", sorted(rows.values(), key=lambda r: order[r["name"]])
                )

        all_rows = {k: v for part in gather(rows, info) for k, v in part.items()}
        all_failures = [f for part in gather(failures, info) for f in part]
        skipped = sum(gather(skipped, info))
        wrote = bool(all_rows) or had_config
        if info.is_main:
            if wrote:
                _write_scores(
                    out / "scores.csv", sorted(all_rows.values(), key=lambda r: order[r["name"]])
                )
            else:  # nothing scored in a new folder: leave no trace of the attempt
                _discard(out / "anomaly_config.json")
                if created:
                    with contextlib.suppress(OSError):
                        out.rmdir()  # only if empty
            if skipped:
                print(
                    f"resumed: {skipped} scan(s) already had outputs (use --overwrite to recompute)"
                )
            if all_failures:
                print(
                    f"{len(all_failures)} of {len(entries)} input(s) failed and were skipped:",
                    file=sys.stderr,
                )
                for image, _ in all_failures:
                    print(f"  {image}", file=sys.stderr)
            if wrote:
                print(
                    f"wrote anomaly maps of {len(all_rows)} scan(s) to {out}/ "
                    "(scores.csv, anomaly_config.json)"
                )
            else:
                print(f"no scan could be scored; nothing was written to {out}/")
        return EXIT_SOME_FAILED if all_failures else 0
    finally:
        cleanup(info)
