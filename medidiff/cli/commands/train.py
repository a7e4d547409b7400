"""Train a diffusion U-Net, or the autoencoder of a latent model, from a YAML config.

The config's ``stage`` says which: ``diffusion`` (default) or ``autoencoder`` (the first
stage of latent diffusion: MONAI AutoencoderKL, L1 + KL + optional patch-adversarial loss,
3D volumes on random patches; see configs/brain_mri_3d_autoencoder.yaml).

Writes RUN_DIR/model.safetensors (EMA inference weights with the config and the
preprocessing the model expects), RUN_DIR/config.yaml (resolved), RUN_DIR/checkpoints/last.pt
(resumable state), RUN_DIR/metrics.csv, TensorBoard events (RUN_DIR/tb) and preview PNGs.

Examples:
  medidiff train --config configs/tiny_test.yaml --out runs/tiny
  medidiff train --config configs/brain_mri_2d.yaml --out runs/brain2d --set train.max_steps=2000
  medidiff train --config configs/brain_mri_2d.yaml --out runs/brain2d --resume
  medidiff train --config configs/brain_mri_3d_autoencoder.yaml --out runs/brain_ae
  torchrun --nproc_per_node 2 -m medidiff train --config configs/brain_mri_2d.yaml --out runs/ddp
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=100 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue from RUN_DIR/checkpoints/last.pt (train.* keys may change)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh even if RUN_DIR already holds a run")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to train (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from medidiff.config import Config
    from medidiff.io import check_writable_folder
    from medidiff.training import build_trainer
    from medidiff.training.trainer import check_run_folder

    config = Config.from_yaml(args.config, args.overrides)
    run_dir = Path(args.out)
    # before the (possibly long) data loading; fit() checks the run folder again
    check_run_folder(run_dir, resume=args.resume, overwrite=args.overwrite)
    check_writable_folder(run_dir)
    trainer = build_trainer(config, run_dir, device=args.device, progress=not args.no_progress,
                            config_dir=Path(args.config).resolve().parent)
    result = trainer.fit(resume=args.resume, overwrite=args.overwrite)
    if trainer.info.is_main:
        print(
            f"trained {result.steps} steps (from {result.resumed_from}) in {result.seconds:.1f} s, "
            f"final loss {result.final_loss:.4f}; weights: {result.model_path}"
        )
    return 0
