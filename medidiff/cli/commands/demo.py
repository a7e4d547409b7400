"""The main job on sample_data with the default models, ending in an HTML report.

Steps (each timed, with progress):
  1. load the default 2D model (anomaly detection, slices) and 3D model (volumes) and the
     sample data (sample_data/dataset.json: healthy 'validation' scans, 'test' scans of
     kinds tumor / ms / stroke / healthy with lesion and brain masks);
  2. calibrate the default anomaly method (ddim: noise to t=50, 3 DDIM steps back) on
     the healthy validation scans (at most 1 ml of false positives per healthy scan,
     components under 0.5 ml dropped: the default target)  -> DIR/thresholds.json
  3. score every test scan -> DIR/anomaly/ (NAME_anomaly, NAME_recon, NAME_seg .nii.gz on
     the scan's own grid, NAME_overlay.png, scores.csv: as 'medidiff anomaly')
  4. the same for a no-network baseline (|x - median healthy intensity|, same
     post-processing and calibration) -> DIR/baseline/scores.csv
  5. evaluate both against the lesion masks inside the brain masks (voxel AUROC/AUPRC,
     Dice at the calibrated threshold, per lesion kind)
  6. when the 3D model is a latent model: 3D latent anomaly scoring (method latent,
     calibrated the same way -> DIR/thresholds_3d.json; test scans -> DIR/anomaly_3d/),
     evaluated next to the 2D default; skipped for a pixel-space 3D model
  7. synthesise a few slices (2D model) and volumes (3D model) with DPM-Solver++(2M),
     20 steps (a rectified-flow model: Euler, 30 steps) -> DIR/synthesis_2d/, DIR/synthesis_3d/
  8. draw the "how it works" strips -> DIR/figures/
  9. write DIR/metrics.json and DIR/report.html (summary with the quality bars stated as
     pass/fail, per-kind and per-scan tables, overlays, synthesis montages, model cards,
     the commands to reproduce, versions and timings)

It ends by printing the stage times and 'report: DIR/report.html'. An existing non-empty
DIR is refused unless it holds an earlier demo's output and --overwrite is given (then
only the demo's own outputs are replaced).

Examples:
    medidiff demo                                  # -> demo_out/report.html
    medidiff demo --out /tmp/d --limit 4 --num-synth 2     # a quick look
    medidiff demo --checkpoint-2d runs/brain_mri_2d/model.safetensors --overwrite
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from medidiff.models.pretrained import DEFAULT_2D

    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--checkpoint-2d", default=None, metavar="CKPT",
                   help="2D model for anomaly detection and slice synthesis (default: the "
                   f"shipped {DEFAULT_2D})")
    p.add_argument("--checkpoint-3d", default=None, metavar="CKPT",
                   help="3D model for volume synthesis and, if a latent model, 3D anomaly "
                   "scoring (default: the shipped brain_mri_3d)")
    p.add_argument("--sample-data", default=None, metavar="DIR",
                   help="folder holding dataset.json (default: the repository's sample_data)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run (default: auto = cuda when available, else cpu)")
    p.add_argument("--num-synth", type=int, default=4, metavar="N",
                   help="slices (2D) and volumes (3D) to synthesise (default 4 each)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score only N test scans, the kinds taken in turn (quick looks; "
                   "default: all)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier demo output in --out")
    p.add_argument("--no-progress", action="store_true",
                   help="no stage lines or progress bars (the summary is still printed)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--workers", type=int, default=None, metavar="W",
                   help="processes scoring scans side by side (default: one per CPU core, "
                   "at most 4, on the CPU; 1 on CUDA). The numbers do not depend on it")


def run(args: argparse.Namespace) -> int:
    import sys

    from medidiff.cli.demo import format_timings, run_demo

    argv = ["--out", args.out]
    for flag, value in (("--checkpoint-2d", args.checkpoint_2d),
                        ("--checkpoint-3d", args.checkpoint_3d),
                        ("--sample-data", args.sample_data), ("--limit", args.limit)):
        if value is not None:
            argv += [flag, str(value)]
    if args.num_synth != 4:
        argv += ["--num-synth", str(args.num_synth)]
    if args.device != "auto":
        argv += ["--device", args.device]
    if args.seed:
        argv += ["--seed", str(args.seed)]
    if args.workers is not None:
        argv += ["--workers", str(args.workers)]
    result = run_demo(
        args.out,
        checkpoint_2d=args.checkpoint_2d,
        checkpoint_3d=args.checkpoint_3d,
        sample_data=args.sample_data,
        device=args.device,
        num_synth=args.num_synth,
        limit=args.limit,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        seed=args.seed,
        workers=args.workers,
        argv=argv,
    )
    print("\nstage times:")
    print(format_timings(result.timings, result.seconds))
    print("\nquality bars (test split; thresholds calibrated on the healthy validation scans):")
    for q in result.quality:
        print(f"  {q.detail}")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"\nmetrics: {result.metrics}")
    print(f"report: {result.report}")
    return 0
