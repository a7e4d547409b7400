"""Benchmark a latent model: 3D synthesis quality and speed, and 3D latent anomaly scoring
next to the default 2D model, in one run.

Synthesis (``--synth``): for each configuration (default rectified-flow Euler 1 / 5 / 10 /
30 steps, and ``--reference`` configurations of other checkpoints, e.g. DDPM 1000 steps of a
v-prediction latent model trained on the same latents) the same seeds generate ``--num``
whole volumes on the model grid (sampling plus decoding, timed per volume); each set is
scored against the training scans with :mod:`medidiff.synthesis.metrics` (Fréchet distance on
the fixed ``medidiff-stats-v1`` features, NOT FID; mean pairwise MS-SSIM; foreground
Wasserstein-1; memorisation: nearest-training-scan SSIM and near-copy flags). The
**real-vs-real spread** is the same scoring of held-out real scans (the healthy
``validation`` split) against the training scans: a synthetic set "within the spread" has a
Fréchet distance no larger than the held-out scans' and an MS-SSIM no further from the
training set's than theirs.

Anomaly scoring (``--anomaly``): thresholds are calibrated on the healthy ``validation``
scans at ``--fpr`` and the ``test`` scans are scored and evaluated on their native grid inside
the brain masks exactly as ``pipelines/benchmark_anomaly.py`` does (its functions are used),
for the latent model's ``latent`` method, the 2D default's ``ddim`` method and the
intensity baseline. Network evaluations per volume count the diffusion U-Net's calls (one
per slice and step for 2D, one per volume and step for the latent model); the latent
model also encodes and decodes each volume once (not counted; their time is in s/volume).

Usage:
    python pipelines/benchmark_latent.py                          # shipped brain_mri_3d vs brain_mri_2d
    python pipelines/benchmark_latent.py --latent runs/brain_mri_3d_latent/model.safetensors \\
        --num 8 --limit 8 --calib-limit 4 --threads 2
    python pipelines/benchmark_latent.py --no-anomaly --synth euler:30 euler:10 \\
        --reference runs/ldm_v/model.safetensors@ddpm:1000

Prints Markdown tables and writes ``OUT/benchmark_latent.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent", default="brain_mri_3d", help="latent model (path or shipped name)")
    p.add_argument("--pixel", default="brain_mri_2d", help="2D model to compare anomaly scoring with")
    p.add_argument("--data", default=str(ROOT / "sample_data" / "dataset.json"))
    p.add_argument("--synth", nargs="*", default=["euler:1", "euler:5", "euler:10", "euler:30"],
                   metavar="SAMPLER:STEPS", help="configurations of the latent model")
    p.add_argument("--reference", nargs="*", default=[], metavar="CHECKPOINT@SAMPLER:STEPS",
                   help="configurations of other checkpoints scored the same way (e.g. DDPM 1000)")
    p.add_argument("--num", type=int, default=8, help="volumes per configuration")
    p.add_argument("--max-pairs", type=int, default=500,
                   help="MS-SSIM pairs of the training set (3D pairs cost about a second each)")
    p.add_argument("--no-synthesis", action="store_true")
    p.add_argument("--no-anomaly", action="store_true")
    p.add_argument("--limit", type=int, default=None, help="test scans (stratified by kind)")
    p.add_argument("--calib-limit", type=int, default=None, help="healthy calibration scans")
    p.add_argument("--fpr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "runs" / "benchmark_latent"))
    return p.parse_args(argv)


def _config(item: str, default_checkpoint: str) -> tuple[str, str, int]:
    checkpoint, _, spec = item.rpartition("@")
    sampler, _, steps = spec.partition(":")
    if not steps.isdigit():
        raise SystemExit(f"{item!r} is not [CHECKPOINT@]SAMPLER:STEPS (e.g. euler:30)")
    return checkpoint or default_checkpoint, sampler, int(steps)


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def synthesis(args: argparse.Namespace, latent_path: Path) -> tuple[list[dict], dict]:
    """Rows of the synthesis table and the real-vs-real spread."""
    import numpy as np

    from medidiff.synthesis.metrics import ImageSet, RealReference, evaluate_against, load_real_images
    from medidiff.synthesis.synthesizer import Synthesizer

    probe = Synthesizer(latent_path, device=args.device, steps=1)
    prep = probe.preprocessing
    train = load_real_images(args.data, prep, spatial_dims=3, split="training")
    held = load_real_images(args.data, prep, spatial_dims=3, split="validation")
    reference = RealReference.build(train, max_pairs=args.max_pairs, seed=args.seed)
    spread = evaluate_against(reference, held)
    real = {"n_train": len(train), "n_held_out": len(held), "frechet": spread.frechet.distance,
            "ms_ssim_train": reference.diversity.mean, "ms_ssim_held_out": spread.diversity_synthetic.mean,
            "foreground_w1": spread.foreground_w1}
    print(f"real-vs-real: held-out {len(held)} vs training {len(train)}: Frechet {real['frechet']:.4f}, "
          f"MS-SSIM train {real['ms_ssim_train']:.4f} / held-out {real['ms_ssim_held_out']:.4f}", flush=True)
    rows = []
    configs = [_config(c, str(latent_path)) for c in args.synth]
    configs += [_config(c, "") for c in args.reference]
    for checkpoint, sampler, steps in configs:
        synth = Synthesizer(checkpoint, device=args.device, sampler=sampler, steps=steps, batch_size=1)
        t0 = time.perf_counter()
        samples = list(synth.generate(range(args.num), seed=args.seed))
        seconds = (time.perf_counter() - t0) / args.num
        images = ImageSet.from_arrays([s.array for s in samples], 3, names=[f"s{s.index}" for s in samples])
        ev = evaluate_against(reference, images)
        nn = np.asarray(ev.memorisation.nearest_ssim)
        row = {"checkpoint": str(checkpoint), "sampler": sampler, "steps": steps, "nfe": samples[0].nfe,
               "seconds_per_volume": seconds, "peak_rss_gb": _peak_gb(),
               "frechet": ev.frechet.distance, "ms_ssim": ev.diversity_synthetic.mean,
               "foreground_w1": ev.foreground_w1, "nearest_ssim_max": float(nn.max()),
               "flagged": len(ev.memorisation.flagged)}
        row["within_spread"] = bool(
            row["frechet"] <= real["frechet"]
            and abs(row["ms_ssim"] - real["ms_ssim_train"]) <= abs(real["ms_ssim_held_out"] - real["ms_ssim_train"])
        )
        rows.append(row)
        print(f"{Path(checkpoint).name} {sampler} {steps}: {seconds:.1f} s/volume, Frechet {row['frechet']:.4f}, "
              f"MS-SSIM {row['ms_ssim']:.4f}, flagged {row['flagged']}", flush=True)
    return rows, real


def anomaly(args: argparse.Namespace, latent_path: Path, pixel_path: Path
            ) -> tuple[list[tuple[str, str, dict]], argparse.Namespace]:
    """(label, split, summary) rows: latent, 2D ddim, baseline; and the benchmark's settings."""
    import benchmark_anomaly as ba

    from medidiff.data.datalist import load_datalist, stratified_by_kind
    from medidiff.models.loaded import load_model
    from medidiff.runtime.distributed import resolve_device

    device = resolve_device(args.device)
    val = load_datalist(args.data, split="validation")
    val = val[: args.calib_limit] if args.calib_limit else val
    test = stratified_by_kind(load_datalist(args.data, split="test"), args.limit)
    from medidiff.constants import CALIBRATION_DEFAULTS

    bench = argparse.Namespace(anoddpm_t=None, anoddpm_calib_limit=None, calib_limit=None,
                               device=device, batch_size=args.batch_size, seed=args.seed, fpr=args.fpr,
                               target=CALIBRATION_DEFAULTS["target"],
                               max_fp_ml=CALIBRATION_DEFAULTS["max_fp_ml"],
                               min_component_ml=CALIBRATION_DEFAULTS["min_component_ml"])
    rows = []
    for label, method, path in (("latent (3D latent model)", "latent", latent_path),
                                ("ddim (2D default)", "ddim", pixel_path),
                                ("baseline (no network)", "baseline", pixel_path)):
        loaded = load_model(path, device)
        run = ba.run_method(method, bench, val, {"test": test}, loaded)
        rows.append((label, "test", ba.summarise(run, "test")))
    return rows, bench


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from medidiff.io import write_json_atomic, write_text_atomic
    from medidiff.models.pretrained import resolve_checkpoint

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    latent_path = resolve_checkpoint(args.latent)
    pixel_path = resolve_checkpoint(args.pixel)
    lines = ["# Latent model benchmark", "",
             f"- latent model: `{latent_path}`; 2D model: `{pixel_path}`; data `{args.data}`",
             f"- device {args.device}, {torch.get_num_threads()} thread(s), "
             f"{platform.processor() or platform.machine()}; date {datetime.date.today().isoformat()}", ""]
    out: dict[str, Any] = {"latent": str(latent_path), "pixel": str(pixel_path), "threads": torch.get_num_threads()}
    if not args.no_synthesis:
        rows, real = synthesis(args, latent_path)
        out["synthesis"], out["real_vs_real"] = rows, real
        lines += [
            f"## Synthesis ({args.num} volumes per row, seeds {args.seed}..; scored against the "
            f"{real['n_train']} training scans)", "",
            f"Real-vs-real spread (held-out validation scans, {real['n_held_out']}): Fréchet "
            f"{real['frechet']:.4f}; MS-SSIM training {real['ms_ssim_train']:.4f}, held-out "
            f"{real['ms_ssim_held_out']:.4f}. Fréchet on medidiff-stats-v1 features (NOT FID).", "",
            "| model | sampler | steps | NFE | s/volume | peak RSS GB | Fréchet | MS-SSIM | W1 fg | "
            "nearest SSIM max | near-copies | within spread |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
        ]
        lines += [
            f"| {Path(r['checkpoint']).name} | {r['sampler']} | {r['steps']} | {r['nfe']} | "
            f"{r['seconds_per_volume']:.1f} | {r['peak_rss_gb']:.2f} | {r['frechet']:.4f} | {r['ms_ssim']:.4f} | "
            f"{r['foreground_w1']:.4f} | {r['nearest_ssim_max']:.3f} | {r['flagged']} | "
            f"{'yes' if r['within_spread'] else 'no'} |" for r in rows
        ]
        lines.append("")
    if not args.no_anomaly:
        import benchmark_anomaly as ba

        rows, bench = anomaly(args, latent_path, pixel_path)
        out["anomaly"] = [{"label": label, **{k: v for k, v in s.items() if k != "report"}}
                          for label, _, s in rows]
        lines += ["## Anomaly scoring (test split; thresholds calibrated on the healthy validation scans)",
                  "", ba.table(rows, bench), ""]
    lines.append(f"Total {time.perf_counter() - began:.0f} s.")
    text = "\n".join(lines) + "\n"
    folder = Path(args.out)
    write_text_atomic(folder / "benchmark_latent.md", text)
    write_json_atomic(folder / "benchmark_latent.json", out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
