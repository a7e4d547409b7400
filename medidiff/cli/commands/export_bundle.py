"""Export a checkpoint as a MONAI bundle that scores scans as 'medidiff anomaly' does.

CHECKPOINT is a model.safetensors written by 'medidiff train' or the name of a shipped model
(see 'medidiff export-bundle --help' for their names). OUT is the bundle folder to create;
its name is the bundle's name. The method and post-processing options are those of 'medidiff anomaly'
and are resolved against the checkpoint and written out in full, with the seed, so a bundle
run reproduces the medidiff run exactly; --thresholds (from 'medidiff calibrate' with the
same checkpoint and options) is copied in and enables segmentations.

The bundle (MONAI's bundle specification):
  OUT/configs/inference.json   the workflow (medidiff's detector; needs medidiff installed)
  OUT/configs/metadata.json    versions, task, network_data_format, the exact settings
  OUT/configs/logging.conf
  OUT/models/model.safetensors the checkpoint, byte for byte
  OUT/models/model.pt          the network's state dict (+ model_autoencoder.pt, latent models)
  OUT/models/thresholds.json   with --thresholds
  OUT/docs/README.md           the commands, the equivalent 'medidiff anomaly' command
  OUT/LICENSE

It is written to a temporary folder and renamed, so a failed export leaves nothing; an
existing OUT is refused unless --overwrite (and a folder that is not a bundle never replaced).

Run it with MONAI:
    python -m monai.bundle run --config_file OUT/configs/inference.json \\
        --bundle_root OUT --dataset_dir scans/ --output_dir results/

Examples:
    medidiff export-bundle brain_mri_2d bundles/brain_mri_2d --thresholds thresholds.json
    medidiff export-bundle runs/brain2d/model.safetensors bundles/brain2d --method x0 --t-start 200
"""

from __future__ import annotations

import argparse
import shlex

from medidiff.cli.commands.anomaly import _add_method_arguments, _add_postprocess_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    from medidiff.models.pretrained import MODELS

    p.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="model.safetensors from 'medidiff train', or a shipped model's name "
        f"({', '.join(MODELS)})",
    )
    p.add_argument("out", metavar="OUT", help="the bundle folder to create (its name is the bundle's)")
    p.add_argument(
        "--thresholds",
        help="thresholds JSON from 'medidiff calibrate' with this checkpoint and these options "
        "(copied into the bundle; enables NAME_seg and 'flagged')",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at OUT")
    p.add_argument("--no-overlay", action="store_true",
                   help="the bundle does not draw NAME_overlay.png montages")
    p.add_argument("--bundle-version", default="0.1.0",
                   help="the bundle's version in its metadata (default 0.1.0)")
    p.add_argument("--authors", default=None,
                   help="who made the weights, for the metadata (default: unknown; shipped "
                   "models: medidiff contributors)")
    p.add_argument("--license", default=None, metavar="FILE",
                   help="a text file with the weights' licence, copied into OUT/LICENSE")
    _add_method_arguments(p.add_argument_group("method (as in 'medidiff anomaly')"))
    _add_postprocess_arguments(p.add_argument_group("post-processing (as in 'medidiff anomaly')"))
    p.add_argument("--batch-size", type=int, default=16,
                   help="network inputs per call in the bundle (default 16; does not change the maps)")
    p.add_argument("--seed", type=int, default=0, help="the noise seed the bundle uses (default: 0)")


def run(args: argparse.Namespace) -> int:
    from medidiff.bundle import export_bundle
    from medidiff.cli.commands.anomaly import configs_from_args, require_checkpoint

    method, post = configs_from_args(args)  # reads args.checkpoint for the default method
    done = export_bundle(
        require_checkpoint(args), args.out, method=method, postprocess=post,
        thresholds=args.thresholds, seed=args.seed, batch_size=args.batch_size,
        overlays=not args.no_overlay, version=args.bundle_version, authors=args.authors,
        license_file=args.license, overwrite=args.overwrite,
    )
    out = done.path
    print(f"method: {shlex.join(done.command[done.command.index('--method'):])}")
    print("run it with:")
    print(f"  python -m monai.bundle run --config_file {shlex.quote(str(out / 'configs' / 'inference.json'))} "
          f"--bundle_root {shlex.quote(str(out))} --dataset_dir INPUTS --output_dir RESULTS")
    print(f"wrote the MONAI bundle ({len(done.files)} files) to {out}/")
    return 0
