"""Score scans for anomalies: voxel maps, reconstructions, segmentations and per-scan scores.

Each scan is noised part of the way and denoised by a model trained on healthy scans; the
residual between scan and reconstruction, post-processed on the model grid (brain mask,
3D median filter, eroded mask), is the anomaly map. Methods (--method):

{METHOD_TABLE}

A rectified-flow model takes the euler sampler where a method's is ddim or ddpm; on a latent
model every method but patched runs in latent space.

The noise defaults to the one the checkpoint was trained with (--noise to override).

Outputs in --out, for each input NAME, on the input's own grid and affine:
  NAME_anomaly.nii.gz   float32 anomaly map
  NAME_recon.nii.gz     reconstruction, in the input's intensity units
  NAME_seg.nii.gz       uint8 segmentation (only with --thresholds from 'medidiff calibrate')
  NAME_overlay.png      a few axial slices of the model grid: input, reconstruction, map
                        (colour bar in the map's units, one scale for the whole run),
                        segmentation contour; orientation letters and slice positions
plus scores.csv (one row per scan: file, name, score, flagged (yes / no / not calibrated),
scan_threshold, voxels_over_threshold, anomalous_ml, voxel_threshold, input_check,
seconds, network_evaluations, nfe_per_input), scores.json (what each column means) and
anomaly_config.json (method, checkpoint and its sha256, seed, version).

Every input is compared with the profile of the model's training scans (modality,
foreground intensities, extent and volume, skull-stripping, voxel size; stored in the
checkpoint): a scan out of profile (e.g. CT given to an MRI model) gets one warning line
and its finding in scores.csv's input_check column; --strict refuses such scans instead. Scans whose outputs and scores.csv row already exist are
skipped (resumable) unless --overwrite; temporaries left by a killed run are deleted. A
file that cannot be read or scored (corrupt, truncated, 4D, 2D, NaN/Inf, constant, ...) is
reported on one line and skipped, leaving no outputs of its own; the run then ends with
exit status 4, listing them (when no scan at all could be scored, a new --out is not
created). Missing paths and empty folders are refused before anything is scored. Under
torchrun the inputs are shared out over the ranks and rank 0 writes scores.csv; --workers W
scores W scans side by side in processes (CPU; the numbers do not change). The loop, resume
and scores.csv are medidiff.anomaly.runner's (score_folder); this module parses the options.

Examples:
    medidiff anomaly --checkpoint runs/brain_mri_2d/model.safetensors \\
        --input sample_data/test/images --out results/
    medidiff anomaly --checkpoint model.safetensors --input sample_data/dataset.json \\
        --split test --thresholds thresholds.json --method anoddpm --out results_anoddpm/
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

from medidiff.cli.commands._common import add_device_args
from medidiff.constants import (
    ANOMALY_DEFAULTS,
    ANOMALY_METHODS,
    DEFAULT_RESIDUALS,
    ENSEMBLE_STARTS,
    MULTI_STARTS,
    NOISE_KINDS,
    SAMPLERS,
)

#: The split of a datalist that ``anomaly`` scores when --split is not given: never the
#: training split by accident (a model reconstructs its own training scans best).
SCORING_SPLIT = "test"

#: Methods, from medidiff.constants so that ``--help`` needs no heavy import.
METHOD_NAMES = ANOMALY_METHODS


def method_table() -> str:
    """The methods and their default settings as ``--help`` lists them, written from
    :data:`medidiff.constants.ANOMALY_DEFAULTS` so the help cannot drift from the code."""
    d = ANOMALY_DEFAULTS
    t_anoddpm = d["anoddpm"][0]
    rows = [
        ("ddim", f"noise to --t-start ({d['ddim'][0]}), --steps DDIM steps ({d['ddim'][2]})",
         "[default, fast]"),
        ("anoddpm", f"noise to --t-start ({t_anoddpm}), full DDPM chain "
                    f"(t + 1 = {t_anoddpm + 1} steps)", "[slow reference]"),
        ("x0", f"noise to --t-start ({d['x0'][0]}), one-shot x0 prediction "
               f"({d['x0'][2]} step)", ""),
        ("patched", f"pDDPM: noise one patch at a time at t = {d['patched'][0]}, one-shot, "
                    "stitched\n(--patch-size / --patch-stride in model voxels; default half "
                    "the slice, 50 % overlap)", ""),
        ("ensemble", "residuals averaged over --t-starts "
                     f"({' '.join(map(str, ENSEMBLE_STARTS))}), one-shot each (cDDPM-style)", ""),
        ("multi", f"several reconstructions (--t-starts {' '.join(map(str, MULTI_STARTS))}, "
                  f"--steps {d['multi'][2]} each),\nresiduals averaged with the structure-aware "
                  f"{DEFAULT_RESIDUALS['multi']} (--residual mahalanobis:\nthe per-voxel Mahalanobis "
                  "distance to them, Behrendt et al. 2024)", ""),
        ("thor", f"noise to --t-start ({d['thor'][0]}), --steps DDIM steps ({d['thor'][2]}), each "
                 "intermediate\nstate harmonised with the noised input where it agrees with it "
                 "(THOR,\nBercea et al. 2024)", ""),
        ("latent", "latent models only [their default]: encode the volume, noise the latent "
                   f"to\n--t-start ({d['latent'][0]}), --steps steps ({d['latent'][2]}), "
                   "decode; residual in image space", ""),
    ]
    lines = []
    for name, text, tag in rows:
        first, *rest = text.split("\n")
        lines.append(f"  {name:<9} {first}" + (f"  {tag}" if tag else ""))
        lines += [f"  {'':<9} {more}" for more in rest]
    return "\n".join(lines)


__doc__ = (__doc__ or "").replace("{METHOD_TABLE}", method_table())
EXIT_SOME_FAILED = 4


# ---- arguments shared with 'medidiff calibrate' ---------------------------------------------


def add_model_arguments(p: argparse.ArgumentParser, *, split_default: str = "training") -> None:
    """--checkpoint, method and post-processing options, batch size, device, seed, masks
    (``split_default``: the --split a datalist is read with when none is given)."""
    from medidiff.models.pretrained import COARSE_2D, DEFAULT_2D

    p.add_argument(
        "--checkpoint",
        help="model.safetensors written by 'medidiff train', or the name of a shipped model "
        f"(default: {DEFAULT_2D}, the 2D brain T1 model inside the package; its model card is "
        f"medidiff/weights/{DEFAULT_2D}.md; {COARSE_2D} is the faster 2.5 mm model)",
    )
    p.add_argument(
        "--split",
        default=None,
        help="which list of a Decathlon dataset.json (or which rows of a CSV with a 'split' "
        f"column) to read (default: {split_default})",
    )
    p.add_argument(
        "--masks",
        default=None,
        metavar="DIR_or_DATALIST",
        help="brain masks: a folder with files named like the inputs, or a datalist whose entries "
        "have a 'mask' (default: a datalist entry's own mask, else the preprocessed foreground)",
    )
    p.add_argument(
        "--volume-index",
        type=int,
        default=None,
        metavar="N",
        help="score volume N (0-based; -1 the last) of 4D inputs, e.g. one echo or time point "
        "(default: inputs must be 3D; 'medidiff info FILE' shows how many volumes a file has)",
    )
    _add_method_arguments(p.add_argument_group("method"))
    _add_postprocess_arguments(p.add_argument_group("post-processing"))
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse scans that do not look like the model's training scans (modality, "
        "intensities, extent, skull-stripping, voxel size): each is reported and skipped, "
        "nothing written for it, exit status 4 (default: warn and score them)",
    )
    p.add_argument(
        "--batch-size", type=int, default=16, help="network inputs per call (default 16)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="W",
        help="processes that score scans side by side on the CPU (default 1; the numbers do "
        "not depend on it)",
    )
    add_device_args(p)


def _add_method_arguments(m: Any) -> None:
    m.add_argument(
        "--method",
        default=None,
        choices=METHOD_NAMES,
        help="reconstruction method (default: ddim; latent for a latent model, where every "
        "method but patched runs in latent space)",
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
        help=f"ensemble / multi: the noise levels (default {' '.join(map(str, ENSEMBLE_STARTS))} / "
        f"{' '.join(map(str, MULTI_STARTS))}); repeat a level for several noise draws",
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


def _add_postprocess_arguments(q: Any) -> None:
    q.add_argument(
        "--residual",
        default=None,
        choices=["l1", "l2", "ssim", "gradient", "l1ssim", "mahalanobis"],
        help="residual: |x - x_hat| (l1, the default of every method but multi), squared (l2), "
        "structure-aware (ssim: 1 - local SSIM; gradient: edge-strength difference; l1ssim: "
        "l1 weighted up where structure differs; multi's default), or mahalanobis (distance "
        "of the input to several reconstructions, in units of their spread)",
    )
    q.add_argument(
        "--erode",
        type=int,
        default=None,
        help="erode the brain mask by this many model voxels (default: the model's tuned value, "
        "else 2; 0 disables)",
    )
    q.add_argument(
        "--median-size",
        type=int,
        default=None,
        help="3D median filter edge in model voxels (default: the model's tuned value, else 9, "
        "tuned for the default model; 3-5 keeps lesions a few voxels wide; 0 or 1 disables)",
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


def configs_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """The (MethodConfig, PostprocessConfig) the options describe."""
    from medidiff.anomaly.methods import MethodConfig
    from medidiff.errors import ConfigError

    if args.method is None:
        from medidiff.models.checkpoint import checkpoint_network

        latent = checkpoint_network(require_checkpoint(args)) == "latent_diffusion"
        args.method = "latent" if latent else "ddim"
    several = args.method in ("ensemble", "multi")
    if not several and args.t_starts is not None:
        raise ConfigError(
            f"--t-starts applies to --method ensemble or multi; use --t-start with --method {args.method}"
        )
    if several and args.t_start is not None:
        raise ConfigError(
            f"--method {args.method} uses several starts: use --t-starts, not --t-start"
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
    from medidiff.anomaly.postprocess import postprocess_for
    from medidiff.models.checkpoint import checkpoint_extra

    post = postprocess_for(
        checkpoint_extra(require_checkpoint(args)),
        args.method,
        residual=args.residual,
        erode=args.erode,
        median_size=args.median_size,
        min_component=args.min_component,
        top_fraction=args.top_fraction,
    )
    return method, post


def build_detector(args: argparse.Namespace, checkpoint: Path, method: Any, post: Any,
                   info: Any) -> Any:
    """The :class:`~medidiff.anomaly.detector.AnomalyDetector` the command-line options describe."""
    from medidiff.anomaly.detector import AnomalyDetector

    detector = AnomalyDetector(
        checkpoint,
        method,
        post,
        device=info.device,
        batch_size=args.batch_size,
        seed=args.seed,
        input_check="strict" if getattr(args, "strict", False) else "warn",
        volume_index=getattr(args, "volume_index", None),
    )
    if detector.input_profile is None and info.is_main:
        print(f"medidiff: note: {checkpoint} records no profile of its training scans (written "
              "before medidiff recorded one), so inputs are checked against the model grid only, "
              "not for modality, intensities or skull-stripping", file=sys.stderr, flush=True)
    return detector


def datalist_split(
    sources: list[str], split: str | None, default: str
) -> tuple[str | None, tuple[str, str] | None]:
    """The split to read from the datalists among ``sources``: ``split`` if given, else
    ``default`` when every datalist with splits has it.

    Returns:
        ``(split, None)`` when no source has splits, else ``(split, (the datalists, their
        splits))`` as text for the line that says which split is read.

    Raises:
        ConfigError: no ``split`` given and some datalist has no ``default`` split.
    """
    from medidiff.data.datalist import datalist_splits
    from medidiff.errors import ConfigError

    offered = {s: datalist_splits(s) for s in sources}
    offered = {s: found for s, found in offered.items() if found is not None}
    if not offered:
        return split, None
    if split is None:
        lacking = [s for s, found in offered.items() if default not in found]
        if lacking:
            raise ConfigError(
                f"{lacking[0]}: a datalist with splits {', '.join(offered[lacking[0]]) or 'none'} "
                f"and no {default!r} split; choose the scans to read with --split NAME"
            )
        split = default
    names = sorted({n for found in offered.values() for n in found})
    return split, (", ".join(offered), ", ".join(names))


def require_checkpoint(args: argparse.Namespace) -> Path:
    """--checkpoint as given, else the shipped default 2D model."""
    from medidiff.models.pretrained import DEFAULT_2D, resolve_checkpoint

    return resolve_checkpoint(args.checkpoint, DEFAULT_2D)


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
    add_model_arguments(p, split_default=f"{SCORING_SPLIT}; the split read is printed")




def run(args: argparse.Namespace) -> int:
    from medidiff.anomaly.runner import load_entries, score_folder
    from medidiff.anomaly.thresholds import Thresholds
    from medidiff.runtime.distributed import cleanup, init_distributed

    checkpoint = require_checkpoint(args)
    method, post = configs_from_args(args)
    thresholds = Thresholds.load(args.thresholds) if args.thresholds else None
    split, datalists = datalist_split(args.input, args.split, SCORING_SPLIT)
    entries = load_entries(args.input, split, args.masks)
    info = init_distributed(args.device)
    try:
        if info.is_main and datalists:
            how = "" if args.split else f" (the default; --split picks another of {datalists[1]})"
            print(f"scoring split {split!r} of {datalists[0]}: {len(entries)} scan(s){how}")
        detector = build_detector(args, checkpoint, method, post, info)
        overlay = None
        if not args.no_overlay:
            from medidiff.viz.overlay import map_scale, write_overlay

            overlay = functools.partial(write_overlay, scale=map_scale(thresholds, post.residual))
        done = score_folder(
            detector, entries, args.out, thresholds=thresholds, thresholds_path=args.thresholds,
            overwrite=args.overwrite, on_result=overlay, workers=args.workers, info=info,
            progress=info.is_main,
        )
        if info.is_main:
            _summary(done, len(entries))
        return EXIT_SOME_FAILED if done.failures else 0
    finally:
        cleanup(info)


def _summary(done: Any, inputs: int) -> None:
    """What the run did, in a few lines (failures on stderr)."""
    if done.resumed:
        print(f"resumed: {done.resumed} scan(s) already had outputs (use --overwrite to recompute)")
    if done.failures:
        print(f"{len(done.failures)} of {inputs} input(s) failed and were skipped:", file=sys.stderr)
        for image, _ in done.failures:
            print(f"  {image}", file=sys.stderr)
    if done.wrote:
        print(f"wrote anomaly maps of {len(done.outcomes)} scan(s) to {done.out}/ "
              "(scores.csv, described in scores.json; anomaly_config.json)")
    else:
        print(f"no scan could be scored; nothing was written to {done.out}/")
