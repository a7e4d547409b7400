"""Reconstruction quality of a trained autoencoder on whole scans, inside the brain.

For each scan of a split (default: the healthy ``validation`` scans of sample_data): bring
it onto the autoencoder's model grid with its own preprocessing, encode (latent mean) and
decode the whole volume (or in tiles with ``--tile``), and compare with the input inside
the brain mask:

- SSIM: the local SSIM map of Wang et al. 2004 (Gaussian window, sigma 1.5 voxels,
  K1 = 0.01, K2 = 0.03, data range 1) averaged over brain voxels;
- PSNR: 10 log10(1 / MSE) over brain voxels (intensities are in [0, 1]).

Prints one row per scan, the mean and the per-scan minimum, and the time per volume.

``--noise-ceiling`` also scores the best any autoencoder could do on sample_data: each scan
is rebuilt by ``pipelines/make_sample_data.py`` with the same seeds but without its Rician
noise step (the noisy rebuild is checked to equal the file), mapped onto the model grid with
the noisy scan's own intensity map, and compared with the noisy input like a reconstruction.
An autoencoder cannot reproduce the noise, so this noise-free scan bounds its scores.

    python pipelines/benchmark_autoencoder.py --checkpoint runs/brain_mri_3d_autoencoder/model.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def local_ssim(x: np.ndarray, y: np.ndarray, sigma: float = 1.5, data_range: float = 1.0) -> np.ndarray:
    """The SSIM map of two same-shape arrays (Gaussian-weighted local statistics)."""
    from scipy.ndimage import gaussian_filter

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    mx, my = gaussian_filter(x, sigma), gaussian_filter(y, sigma)
    vx = gaussian_filter(x * x, sigma) - mx * mx
    vy = gaussian_filter(y * y, sigma) - my * my
    cxy = gaussian_filter(x * y, sigma) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def brain_scores(reference: np.ndarray, output: np.ndarray, brain: np.ndarray) -> tuple[float, float]:
    """(SSIM, PSNR dB) of ``output`` against ``reference`` over brain voxels (range 1)."""
    err = (output - reference)[brain]
    psnr = float(10 * np.log10(1.0 / max(float(np.mean(err**2)), 1e-12)))
    return float(local_ssim(reference, output)[brain].mean()), psnr


def noise_free_ceiling(entry, pre) -> tuple[float, float]:
    """(SSIM, PSNR) of the noise-free rebuild of a sample_data scan against the scan itself."""
    sys.path.insert(0, str(ROOT / "pipelines"))
    import make_sample_data as msd

    from medidiff.data.transforms import intensity_to_model, to_model
    from medidiff.io import load_volume

    spec = next(s for s in msd.cohort_specs() if s.name == entry.name)
    template = msd.load_template()
    noisy = msd.make_subject(spec, template, base_seed=0)
    if not np.array_equal(np.asarray(noisy.image), np.asarray(load_volume(entry.image).array)):
        raise SystemExit(f"{entry.image}: the rebuild differs from the file; not sample_data as built")
    keep = msd.add_rician_noise
    msd.add_rician_noise = lambda image, brain, rng, snr: (image * brain).astype(np.float32)
    try:
        clean = msd.make_subject(spec, template, base_seed=0)
    finally:
        msd.add_rician_noise = keep
    grid = to_model(np.asarray(clean.image, np.float32), pre, interpolation="linear")
    clean_model = np.clip(intensity_to_model(grid, pre), 0, 1)
    brain = (pre.mask > 0) if pre.mask is not None else pre.foreground
    return brain_scores(pre.image, clean_model, brain)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="autoencoder model.safetensors")
    p.add_argument("--data", default=str(ROOT / "sample_data" / "dataset.json"), help="datalist")
    p.add_argument("--split", default="validation", help="split to measure (default: validation)")
    p.add_argument("--tile", type=int, default=None, help="encode/decode in tiles of this edge")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--noise-ceiling", action="store_true",
                   help="also score the noise-free rebuild of each sample_data scan (needs nilearn)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)

    import torch

    from medidiff.data.datalist import load_datalist
    from medidiff.data.transforms import preprocess
    from medidiff.io import load_volume
    from medidiff.models.autoencoder import decode_tiled, encode_tiled
    from medidiff.models.loaded import load_autoencoder

    torch.set_num_threads(args.threads)
    ae = load_autoencoder(args.checkpoint)
    entries = load_datalist(args.data, split=args.split)
    rows = []
    for e in entries:
        pre = preprocess(load_volume(e.image), ae.preprocessing, mask=load_volume(e.mask) if e.mask else None)
        brain = (pre.mask > 0) if pre.mask is not None else pre.foreground
        x = torch.as_tensor(pre.image, dtype=torch.float32)[None, None]
        t0 = time.perf_counter()
        z = encode_tiled(ae.network, x, tile=args.tile)
        tile = None if args.tile is None else max(1, args.tile // ae.downsample_factor)
        y = decode_tiled(ae.network, z, tile=tile)[0, 0].clamp(0, 1).numpy()
        seconds = time.perf_counter() - t0
        ssim, psnr = brain_scores(pre.image, y, brain)
        row = {"scan": e.name, "ssim": ssim, "psnr": psnr,
               "l1": float(np.abs(y - pre.image)[brain].mean()), "seconds": seconds}
        if args.noise_ceiling:
            row["ceiling_ssim"], row["ceiling_psnr"] = noise_free_ceiling(e, pre)
        rows.append(row)
    step = ae.provenance.step
    print(f"autoencoder {args.checkpoint} (step {step}), split {args.split}, "
          f"{'whole volumes' if args.tile is None else f'tiles of {args.tile}'}, {args.threads} thread(s)")
    print("| scan | SSIM (brain) | PSNR dB (brain) | L1 | s/volume |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scan']} | {r['ssim']:.4f} | {r['psnr']:.2f} | {r['l1']:.4f} | {r['seconds']:.1f} |")
    for name, f in (("mean", np.mean), ("min", np.min)):
        print(f"| **{name}** | {f([r['ssim'] for r in rows]):.4f} | {f([r['psnr'] for r in rows]):.2f} "
              f"| {f([r['l1'] for r in rows]):.4f} | {f([r['seconds'] for r in rows]):.1f} |")
    if args.noise_ceiling:
        print("noise-free ceiling (SSIM / PSNR): " + ", ".join(
            f"{r['scan']} {r['ceiling_ssim']:.4f} / {r['ceiling_psnr']:.2f}" for r in rows)
            + f"; mean {np.mean([r['ceiling_ssim'] for r in rows]):.4f} / "
            f"{np.mean([r['ceiling_psnr'] for r in rows]):.2f} dB")
    if args.json:
        Path(args.json).write_text(json.dumps({"step": step, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
