"""Make the figures of docs/how_it_works.md from a trained model, in one command.

Writes into ``--out`` (default ``docs/figures/``):

- ``noising.png``: a healthy validation slice noised by the forward process at several t;
- ``reverse.png``: a DDIM trajectory from pure noise to a sample (x_t and the x_0 estimate);
- ``anomaly.png``: partial-diffusion anomaly detection (the default method: DDIM from
  t = 250, 10 steps) on ``test/images/tumor-000`` of ``--sample-data``: input, x_t,
  reconstruction, anomaly map, segmentation, ground truth. The segmentation's voxel
  threshold is calibrated on the healthy validation scans of ``--sample-data`` at a 5 %
  false-positive rate (or read from ``--thresholds``; ``--no-calibrate`` drops the panel);
- ``loss_brain_mri_2d.png`` / ``loss_brain_mri_3d.png``: the training loss curves of
  ``RUNS/brain_mri_2d/metrics.csv`` and ``RUNS/brain_mri_3d/metrics.csv`` when present.

All of it comes from :func:`medidiff.viz.figures.save_how_it_works_figures` and
:func:`medidiff.viz.figures.loss_curve`. The default checkpoint is the shipped 2.5 mm 2D model
``brain_mri_2d`` (the base of the default anomaly model, ``brain_mri_2d_2mm``).

Usage:
    python pipelines/make_figures.py                        # shipped model -> docs/figures/
    python pipelines/make_figures.py --checkpoint runs/brain_mri_2d/model.safetensors
    python pipelines/make_figures.py --thresholds runs/thresholds.json --out /tmp/figs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Runs whose loss curves are drawn when their metrics.csv exists: run folder -> PNG name.
LOSS_RUNS = {"brain_mri_2d": "loss_brain_mri_2d.png", "brain_mri_3d": "loss_brain_mri_3d.png"}
#: Size limit of a committed figure.
MAX_BYTES = 300 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None,
                   help="model.safetensors or a shipped model name (default: brain_mri_2d, the 2.5 mm "
                   "model the figures of docs/how_it_works.md were made with)")
    p.add_argument("--sample-data", default=str(ROOT / "sample_data"),
                   help="the sample_data folder or its dataset.json")
    p.add_argument("--out", default=str(ROOT / "docs" / "figures"), help="output folder")
    p.add_argument("--runs", default=str(ROOT / "runs"),
                   help="folder with the training runs whose loss curves to draw")
    p.add_argument("--thresholds", default=None,
                   help="thresholds JSON for the segmentation panel (made by medidiff calibrate "
                        "for the same checkpoint and default method)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="without --thresholds, skip calibrating on the healthy validation scans "
                        "of --sample-data (then the anomaly strip has no segmentation panel)")
    p.add_argument("--fpr", type=float, default=0.05,
                   help="voxel false-positive rate of the calibration (default 0.05)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from medidiff.anomaly.detector import AnomalyDetector
    from medidiff.anomaly.runner import calibrate
    from medidiff.data.datalist import load_datalist
    from medidiff.errors import MedidiffError
    from medidiff.io.images import save_figure
    from medidiff.viz.curves import loss_curve
    from medidiff.viz.figures import save_how_it_works_figures
    from medidiff.models.pretrained import COARSE_2D, resolve_checkpoint

    start = time.perf_counter()
    try:
        checkpoint = resolve_checkpoint(args.checkpoint, COARSE_2D)
        print(f"checkpoint: {checkpoint}")
        out = Path(args.out)
        detector = AnomalyDetector(checkpoint, device=args.device, seed=args.seed)
        thresholds = args.thresholds
        if thresholds is None and args.calibrate:
            dataset = Path(args.sample_data)
            dataset = dataset / "dataset.json" if dataset.is_dir() else dataset
            healthy = load_datalist(dataset, split="validation")
            print(f"calibrating on {len(healthy)} healthy validation scans (fpr {args.fpr}) ...")
            thresholds = calibrate(detector, healthy, fpr=args.fpr)
            print(f"voxel threshold {thresholds.voxel_threshold:.4g}")
        written = dict(save_how_it_works_figures(
            checkpoint, args.sample_data, out, detector=detector, thresholds=thresholds,
            device=args.device, seed=args.seed,
        ))
        for run, name in LOSS_RUNS.items():
            metrics = Path(args.runs) / run / "metrics.csv"
            if metrics.is_file():
                fig = loss_curve(metrics, title=f"{run} training loss")
                written[f"loss_{run}"] = save_figure(fig, out / name)
            else:
                print(f"skipped {name}: {metrics} not found")
    except MedidiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    too_big = []
    for key, path in written.items():
        size = path.stat().st_size
        print(f"{key:>20}: {path} ({size / 1024:.0f} KB)")
        if size > MAX_BYTES:
            too_big.append(path)
    print(f"wrote {len(written)} figures to {args.out} in {time.perf_counter() - start:.0f} s")
    if too_big:
        names = ", ".join(map(str, too_big))
        print(f"error: over {MAX_BYTES // 1024} KB: {names}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
