"""Generate new scans from a checkpoint.

A 3D model generates whole volumes; a 2D model generates single axial slices, written as
NIfTI volumes of shape X x Y x 1 with the training grid's in-plane spacing and slice
thickness (the manifest's kind column says "2d-slice"; independent slices are not a
volume). Samples carry the model grid's RAS geometry, centred at the origin, and the
training data's intensity scale (as recorded in the checkpoint; else [0, 1], noted in the
manifest's intensity column).

Outputs in DIR: synth_00000.nii.gz ..., manifest.csv (file, index, seed, sampler, steps,
label, guidance, seconds, kind, nfe, intensity), montage.png (the first 16 samples) and
synthesis_config.json (checkpoint path and sha256, sampler, steps, seed, geometry, ...).

Sample i draws all its noise from seed + i, so it is the same whatever --batch-size, the
number of ranks or an interruption. Re-running the same command resumes: complete files
are kept (writes are atomic), only missing ones are generated. A sample file damaged by
something else (it does not load) is reported on one line, deleted and generated again; an
unreadable manifest.csv is rebuilt from the sample files (exit 0: the folder ends
complete). A DIR made with another checkpoint, sampler, steps, seed, label or guidance is
refused unless --overwrite; a bad --label or --guidance is refused before anything is
written.

Class-conditional models: --label NAME|INDEX picks the class (names from the training
datalist's label column); --guidance W is classifier-free guidance (0 = unconditional,
1 = conditional (the default with --label), > 1 = stronger).

Mask-conditioned models (trained with conditioning.mask): --mask FILE_OR_FOLDER gives label
maps (0 = background, i = the model's i-th label, e.g. 1=brain 2=tumor 3=ms 4=stroke for
configs/brain_mri_2d_lesions.yaml); each map yields MAP_synth.nii.gz (a scan generated to
match it, on the map's own grid: every labelled axial slice for a 2D model, the whole
volume for a 3D one, background left at 0) and MAP_label.nii.gz (its lesion voxels, uint8),
with manifest.csv and montage.png as for `medidiff inpaint`. --num (default: one per map)
cycles through the maps with seeds seed + i; sampling is strided DDPM (--steps, default 50);
--guidance W is classifier-free guidance on the map (default 1). A mask-conditioned model
needs --mask and an unconditional one refuses it.

Examples:
  medidiff synthesize --checkpoint runs/brain_mri_2d/model.safetensors --num 64 --out synth/
  medidiff synthesize --checkpoint model.safetensors --num 16 --out s/ --sampler dpm++2m --steps 20
  medidiff synthesize --checkpoint cond.safetensors --num 8 --out s/ --label tumor --guidance 3
  medidiff synthesize --checkpoint lesions.safetensors --mask label_maps/ --out pairs/ --guidance 2
  torchrun --nproc_per_node 4 -m -- medidiff synthesize --checkpoint model.safetensors --num 1000 --out s/

(With torchrun, put "--" before "medidiff": torchrun's own parser would otherwise take
--num for an abbreviation of its --numa-binding option.)
"""

from __future__ import annotations

import argparse

from medidiff.cli.commands._common import add_device_args
from medidiff.constants import GENERATIVE_SAMPLERS, SYNTHESIS_DEFAULT_STEPS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None,
                   help="model.safetensors written by `medidiff train`, or a shipped model's name: "
                        "brain_mri_3d (default: whole brains at 2 mm, latent rectified flow), brain_mri_3d_5mm "
                        "(3D volumes at 5 mm) or brain_mri_2d (2D slices)")
    p.add_argument("--num", type=int, default=None,
                   help="number of samples the folder should hold (required without --mask)")
    p.add_argument("--mask", default=None, metavar="FILE_OR_FOLDER",
                   help="label maps for a mask-conditioned model (one pair per map by default)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sampler", default=None, choices=GENERATIVE_SAMPLERS,
                   help="ddim (default, deterministic), dpm++2m (DPM-Solver++ 2M), ddpm (ancestral) "
                        "or euler (rectified-flow models; their default)")
    p.add_argument("--steps", type=int, default=None,
                   help="network evaluations per sample (default: "
                        + ", ".join(f"{name} {'all T' if k is None else k}"
                                    for name, k in SYNTHESIS_DEFAULT_STEPS.items()) + ")")
    p.add_argument("--batch-size", type=int, default=4, help="samples per batch (does not change samples)")
    p.add_argument("--label", default=None, help="class name or index (class-conditional models only)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance weight (needs --label; default 1 = plain conditional)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a folder that holds samples of another configuration")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_args(p)


def run(args: argparse.Namespace) -> int:
    from medidiff.errors import ConfigError

    from medidiff.models.pretrained import DEFAULT_3D, resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint, DEFAULT_3D)
    if args.mask is not None:
        return _run_masks(args, checkpoint)
    if args.num is None:
        raise ConfigError("--num is required (the number of samples), unless --mask gives label maps")
    if args.num < 1:
        raise ConfigError(f"--num must be >= 1; got {args.num}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0; got {args.seed}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1; got {args.steps}")

    from medidiff.runtime.distributed import cleanup, init_distributed
    from medidiff.synthesis.folder import synthesize_to_folder
    from medidiff.synthesis.synthesizer import Synthesizer

    info = init_distributed(args.device)
    try:
        synth = Synthesizer(
            checkpoint, device=info.device, sampler=args.sampler, steps=args.steps,
            batch_size=args.batch_size, label=args.label, guidance=args.guidance,
        )
        summary = synthesize_to_folder(
            synth, args.out, args.num, seed=args.seed, overwrite=args.overwrite, info=info,
            progress=not args.no_progress,
        )
    finally:
        cleanup(info)
    if info.is_main:
        import sys

        for note in summary.repaired:  # damaged files found on resume, now regenerated
            print(f"medidiff: warning: {note}", file=sys.stderr)
        extras = ", ".join(p.name for p in (summary.manifest, summary.montage, summary.config) if p)
        label = f", label {synth.label_name} (guidance {synth.guidance:g})" if synth.label_name else ""
        print(
            f"{args.num - len(summary.skipped)} sample(s) generated, "
            f"{len(summary.skipped)} already present ({summary.kind}, {synth.sampler} {synth.steps} steps"
            f"{label}); {summary.num_files} samples in {summary.out_dir}/ with {extras}"
        )
    return 0


def _run_masks(args: argparse.Namespace, checkpoint: object) -> int:
    """``--mask``: scans generated from label maps by a mask-conditioned model."""
    from medidiff.errors import ConfigError
    from medidiff.runtime.distributed import cleanup, init_distributed
    from medidiff.synthesis.inpaint import Inpainter
    from medidiff.synthesis.lesion_pairs import LabelMapPairMaker, label_map_jobs
    from medidiff.synthesis.pairs import read_pairs_manifest, write_pairs

    if args.sampler not in (None, "ddpm"):
        raise ConfigError(f"--sampler {args.sampler}: with --mask sampling is strided DDPM; drop --sampler")
    if args.label is not None:
        raise ConfigError("--label is for class-conditional models; with --mask the label map conditions")
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0; got {args.seed}")
    info = init_distributed(args.device)
    try:
        inpainter = Inpainter(checkpoint, device=info.device, steps=args.steps or 50, resample=1,
                              guidance=1.0 if args.guidance is None else args.guidance,
                              batch_size=max(args.batch_size, 1))
        if not inpainter.conditioning.mask_conditional:
            raise ConfigError(
                f"--mask: {inpainter.loaded.provenance.path} is an unconditional model (trained without "
                "conditioning.mask); drop --mask, or use `medidiff inpaint` to paint into scans"
            )
        jobs = label_map_jobs(args.mask, seed=args.seed, num=args.num)
        settings = {**inpainter.settings(), "seed": args.seed, "masks": str(args.mask), "num": len(jobs)}
        summary = write_pairs(jobs, LabelMapPairMaker(inpainter), args.out, settings=settings, info=info,
                              overwrite=args.overwrite, progress=not args.no_progress)
    finally:
        cleanup(info)
    if info.is_main:
        from medidiff.viz.pairs import save_pair_montage

        montage = save_pair_montage(summary.out_dir, read_pairs_manifest(summary.manifest),
                                    summary.out_dir / "montage.png")
        print(f"{len(summary.generated)} scan(s) generated from label maps, {len(summary.skipped)} already "
              f"present (DDPM {inpainter.steps} steps, guidance {inpainter.guidance:g}); {len(jobs)} pairs in "
              f"{summary.out_dir}/ with manifest.csv" + (f", {montage.name}" if montage else ""))
    return 0
