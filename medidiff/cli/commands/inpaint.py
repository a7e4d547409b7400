"""Paint lesions into real scans: paired synthetic data (image + label) from healthy scans.

For each input scan NAME, writes in --out, on the scan's own grid and affine:
  NAME_synth.nii.gz   the scan with a lesion painted into the mask (float32, the scan's units)
  NAME_label.nii.gz   the lesion mask (uint8 0/1)
and manifest.csv (name, image, label, seed, mask_source, kind, lesion_ml, source_scan, nfe,
seconds), pairs_config.json (checkpoint sha256, steps, ...) and montage.png (pairs with the
label outlined in red).

Only the mask plus a blend margin (--margin voxels, linear blend by distance) changes:
outside it the output equals the input exactly. The painting is RePaint (Lugmayr et al.
2022): --steps strided DDPM steps with --resample jumps each, the known region taken from the
forward-noised scan at every step. With a mask-conditioned model (a config with
conditioning.mask, e.g. configs/brain_mri_2d_lesions.yaml) the model also sees the label map
(brain mask + lesion of its kind), so it paints a lesion; --guidance W is classifier-free
guidance on it. An unconditional model fills the mask with healthy-looking tissue.

Masks: --mask FILE (one mask for every scan, same grid) or FOLDER (masks named like the
scans), or --random-masks KIND (tumor, ms, stroke or any): masks drawn inside the brain from
a lesion-shape model fitted to --lesion-datalist (default: sample_data's training_lesions
split): a real lesion of the kind, moved to a jittered position of the same relative place,
rotated, mirrored, scaled and elastically deformed. --per-scan N draws N pairs per scan.

Pair k gets seed --seed + k; re-running resumes (finished pairs are kept); with torchrun the
pairs are shared over the ranks.

Examples:
  medidiff inpaint --checkpoint runs/lesions/model.safetensors --input sample_data/train/images \\
      --random-masks any --per-scan 2 --out pairs/
  medidiff inpaint --checkpoint runs/lesions/model.safetensors --input scan.nii.gz \\
      --mask lesion.nii.gz --kind tumor --out painted/
"""

from __future__ import annotations

import argparse

from medidiff.cli.commands._common import add_device_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None,
                   help="model.safetensors of a pixel-space diffusion model (mask-conditioned to paint "
                        "lesions); default: the shipped brain_mri_2d (unconditional)")
    p.add_argument("--input", nargs="+", required=True,
                   help="scans: files, folder, glob or datalist (a datalist's brain masks are used)")
    p.add_argument("--split", default=None, help="split of a dataset.json --input (default: training)")
    masks = p.add_mutually_exclusive_group(required=True)
    masks.add_argument("--mask", default=None,
                       help="lesion mask file (for every scan) or folder of masks named like the scans")
    masks.add_argument("--random-masks", default=None, metavar="KIND",
                       help="draw masks of this kind: tumor, ms, stroke (as fitted) or any")
    p.add_argument("--kind", default=None,
                   help="lesion kind of --mask masks, for a model conditioned on kinds (e.g. tumor)")
    p.add_argument("--per-scan", type=int, default=1, help="pairs per scan with --random-masks (default 1)")
    p.add_argument("--lesion-datalist", default=None,
                   help="datalist with lesion labels, brain masks and kinds to fit the lesion shapes on "
                        "(default: sample_data/dataset.json)")
    p.add_argument("--lesion-split", default="training_lesions",
                   help="its split (default training_lesions)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=50, help="RePaint strided DDPM steps (default 50)")
    p.add_argument("--resample", type=int, default=5, help="RePaint resampling jumps per step (default 5)")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance on the label map (default 1 = plain conditional)")
    p.add_argument("--margin", type=int, default=2, help="blend margin around the mask, voxels (default 2)")
    p.add_argument("--batch-size", type=int, default=16, help="slices painted together (default 16)")
    p.add_argument("--overwrite", action="store_true", help="remake every pair (default: resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_args(p)


def default_lesion_datalist() -> str:
    """sample_data/dataset.json of the source tree."""
    from pathlib import Path

    import medidiff

    return str(Path(medidiff.__file__).resolve().parents[1] / "sample_data" / "dataset.json")


def run(args: argparse.Namespace) -> int:
    from medidiff.data.datalist import load_datalist
    from medidiff.errors import ConfigError
    from medidiff.models.pretrained import COARSE_2D, resolve_checkpoint
    from medidiff.runtime.distributed import cleanup, init_distributed
    from medidiff.synthesis.inpaint import Inpainter
    from medidiff.synthesis.lesion_pairs import InpaintPairMaker, inpaint_jobs
    from medidiff.synthesis.pairs import read_pairs_manifest, write_pairs

    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0; got {args.seed}")
    if args.kind is not None and args.random_masks is not None:
        raise ConfigError("--kind names the kind of --mask masks; --random-masks KIND sets it for drawn ones")
    entries = load_datalist(list(args.input) if len(args.input) > 1 else args.input[0], split=args.split)
    info = init_distributed(args.device)
    try:
        inpainter = Inpainter(
            resolve_checkpoint(args.checkpoint, COARSE_2D), device=info.device, steps=args.steps,
            resample=args.resample, guidance=args.guidance, margin=args.margin,
            batch_size=args.batch_size,
        )
        shape_model = None
        if args.random_masks is not None:
            from medidiff.synthesis.lesion_shapes import LesionShapeModel

            shape_model = LesionShapeModel.fit_datalist(
                args.lesion_datalist or default_lesion_datalist(), split=args.lesion_split
            )
        jobs = inpaint_jobs(entries, seed=args.seed, masks=args.mask, random_kind=args.random_masks,
                            kind=args.kind, per_scan=args.per_scan, shape_model=shape_model)
        settings = {**inpainter.settings(), "seed": args.seed, "masks": args.mask,
                    "random_masks": args.random_masks, "kind": args.kind}
        summary = write_pairs(jobs, InpaintPairMaker(inpainter, shape_model), args.out, settings=settings,
                              info=info, overwrite=args.overwrite, progress=not args.no_progress)
    finally:
        cleanup(info)
    if info.is_main:
        from medidiff.viz.pairs import save_pair_montage

        montage = save_pair_montage(summary.out_dir, read_pairs_manifest(summary.manifest),
                                    summary.out_dir / "montage.png")
        note = "" if inpainter.conditioning.mask_conditional else \
            " (unconditional model: the masks were filled with healthy-looking tissue)"
        print(f"{len(summary.generated)} pair(s) painted, {len(summary.skipped)} already present{note}; "
              f"{len(jobs)} pairs in {summary.out_dir}/ with manifest.csv"
              + (f", {montage.name}" if montage else ""))
    return 0
