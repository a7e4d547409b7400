"""Quality, diversity and memorisation metrics of synthetic scans against real ones.

Real scans go through the checkpoint's preprocessing (found in the synthetic folder's
synthesis_config.json, or given with --checkpoint) so both sets share the model grid and
its [0, 1] intensity scale; a 2D model's samples are compared with the real scans' axial
training slices, a 3D model's with whole volumes. Metrics:

  MS-SSIM among synthetic samples and among real images (diversity; lower = more diverse;
    fewer scales / a smaller window on small images, reported),
  Wasserstein-1 distance between foreground intensity distributions (model scale),
  a Frechet distance on fixed hand-crafted features ("medidiff-stats-v1": NOT FID, not
    comparable with published FIDs; biased upwards at small n, so fewer than 10 images on
    either side get a WARNING line, on stderr and in the JSON's "warnings"),
  memorisation: each sample's nearest real image by SSIM; near-copies above a threshold
    (default max(0.95, 99th percentile of real-vs-real nearest-neighbour SSIM)) are flagged.

Pass the model's training scans as --real for the memorisation check to mean something.
Prints a table; writes the metrics as JSON (default SYNTHETIC/synthesis_metrics.json; an
existing file is replaced only with --overwrite).

Examples:
  medidiff evaluate-synthesis --real sample_data/dataset.json --synthetic synth/
  medidiff evaluate-synthesis --real scans/ --synthetic other_samples/ --checkpoint model.safetensors
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--real", nargs="+", required=True, help="real scans: files, folder, glob or datalist")
    p.add_argument("--synthetic", required=True,
                   help="folder of synthetic scans (medidiff synthesize output)")
    p.add_argument("--out", help="metrics JSON to write (default: SYNTHETIC/synthesis_metrics.json)")
    p.add_argument("--checkpoint", default=None,
                   help="model whose preprocessing defines the common grid (default: the one recorded "
                        "in SYNTHETIC/synthesis_config.json)")
    p.add_argument("--split", default=None, help="split of a Decathlon --real datalist (default: training)")
    p.add_argument("--memorisation-threshold", type=float, default=None, metavar="SSIM",
                   help="flag samples whose nearest real image has SSIM above this "
                        "(default: max(0.95, p99 of real-vs-real nearest-neighbour SSIM))")
    p.add_argument("--max-pairs", type=int, default=500, help="MS-SSIM pairs per set (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random pair subsets (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing metrics JSON")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from medidiff.errors import ConfigError

    if args.max_pairs < 1:
        raise ConfigError(f"--max-pairs must be >= 1; got {args.max_pairs}")
    from medidiff.synthesis.folder import METRICS_NAME

    out = Path(args.out) if args.out else Path(args.synthetic) / METRICS_NAME
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; give a .json file name")
    from medidiff.cli.commands._common import check_json_out

    check_json_out(out, args.overwrite)  # exists without --overwrite, or not writable: before any work

    from medidiff.io import write_json_atomic
    from medidiff.synthesis.metrics import evaluate_synthesis

    result = evaluate_synthesis(
        args.real, args.synthetic, checkpoint=args.checkpoint, split=args.split,
        memorisation_threshold=args.memorisation_threshold, max_pairs=args.max_pairs, seed=args.seed,
    )
    if result.warnings:
        import sys

        for warning in result.warnings:
            print(f"medidiff: warning: {warning}", file=sys.stderr, flush=True)
    print(result.table())
    write_json_atomic(out, result.to_dict())
    print(f"metrics written to {out}")
    return 0
