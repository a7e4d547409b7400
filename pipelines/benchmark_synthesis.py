"""Benchmark samplers x steps on one trained model: speed and quality in one table.

For each configuration (default: DDPM 1000, DDIM 100/50/25/10, DPM-Solver++(2M) 20/10)
the same seeds generate ``--num`` samples (sample i uses seed + i, so every sampler starts
from the same x_T), timed per sample; each set is scored against the real scans with
:mod:`medidiff.synthesis.metrics` (MS-SSIM diversity, foreground Wasserstein-1, the Fréchet
distance on the fixed ``medidiff-stats-v1`` features (NOT FID), nearest-real SSIM). The
reference is DDPM with all T steps, measured in the same run; the table gives each
configuration's ratios to it and whether it lies within 10 % of it on both the Fréchet
distance and MS-SSIM (the target: a sampler at <= 50 steps that does). A second verdict,
"no worse", reads the target one-sidedly: Fréchet at most 10 % above the reference's (lower
is closer to the real data) and MS-SSIM within 10 % of the reference's or closer to the
real set's own MS-SSIM than the reference is (diversity like the real data's). A fast
sampler that is *better* than DDPM-1000 fails the two-sided test and passes this one;
both are printed.

Outputs: ``OUT/benchmark_synthesis.md`` (the table, with the run's settings) and
``OUT/benchmark_synthesis.json`` (every number), written atomically.

Usage:
    python pipelines/benchmark_synthesis.py                      # the shipped brain_mri_2d model, 16 samples
    python pipelines/benchmark_synthesis.py --num 64 --batch-size 32 --threads 2
    python pipelines/benchmark_synthesis.py --configs ddim:50 dpm++2m:20 --num 8

With few samples the Fréchet distance is dominated by covariance noise and MS-SSIM by pair
noise: read small-``--num`` tables as a smoke test of the machinery, not as a ranking.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ["ddpm:1000", "ddim:100", "ddim:50", "ddim:25", "ddim:10", "dpm++2m:20", "dpm++2m:10"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(ROOT / "medidiff" / "weights" / "brain_mri_2d.safetensors"))
    p.add_argument("--real", nargs="+", default=[str(ROOT / "sample_data" / "dataset.json")],
                   help="real scans (default: sample_data's training split, the model's training data)")
    p.add_argument("--split", default=None, help="split of a Decathlon --real datalist (default training)")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, metavar="SAMPLER:STEPS",
                   help="configurations; the first ddpm one with all T steps is the reference")
    p.add_argument("--num", type=int, default=16, help="samples per configuration")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-pairs", type=int, default=500)
    p.add_argument("--out", default=str(ROOT / "runs" / "benchmark_synthesis"))
    return p.parse_args(argv)


def parse_configs(items: list[str]) -> list[tuple[str, int]]:
    configs = []
    for item in items:
        sampler, _, steps = item.partition(":")
        if not steps.isdigit():
            raise SystemExit(f"--configs: {item!r} is not SAMPLER:STEPS (e.g. ddim:50)")
        configs.append((sampler, int(steps)))
    return configs


def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from medidiff.io import write_json_atomic, write_text_atomic
    from medidiff.synthesis.synthesizer import Synthesizer
    from medidiff.synthesis.metrics import ImageSet, RealReference, evaluate_against, load_real_images

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    configs = parse_configs(args.configs)
    began = time.perf_counter()

    # the real reference, once, on the model grid of the checkpoint
    probe = Synthesizer(args.checkpoint, device=args.device, steps=1)
    ckpt = probe.checkpoint
    real = load_real_images(args.real, probe.preprocessing, spatial_dims=probe.spatial_dims,
                            min_foreground=float(probe.config.data.min_foreground), split=args.split)
    reference = RealReference.build(real, max_pairs=args.max_pairs, seed=args.seed)
    print(f"real reference: {len(real)} images ({probe.kind}) in "
          f"{time.perf_counter() - began:.1f} s", flush=True)
    T = probe.schedule.num_train_timesteps

    results = []
    for sampler, steps in configs:
        synth = Synthesizer(ckpt, device=probe.device, sampler=sampler, steps=steps,
                            batch_size=args.batch_size)
        t0 = time.perf_counter()
        samples = list(synth.generate(range(args.num), seed=args.seed))
        seconds = (time.perf_counter() - t0) / args.num
        images = ImageSet.from_arrays([s.array for s in samples], synth.spatial_dims,
                                      names=[f"{sampler}{steps}_{s.index}" for s in samples])
        ev = evaluate_against(reference, images)
        nn = np.asarray(ev.memorisation.nearest_ssim)
        row = {
            "sampler": sampler, "steps": steps, "nfe": samples[0].nfe, "seconds_per_sample": seconds,
            "ms_ssim": ev.diversity_synthetic.mean, "frechet": ev.frechet.distance,
            "foreground_w1": ev.foreground_w1, "nearest_real_ssim_median": float(np.median(nn)),
            "nearest_real_ssim_max": float(nn.max()), "flagged": len(ev.memorisation.flagged),
        }
        results.append(row)
        print(f"{sampler:8s} {steps:5d} steps: {seconds:8.3f} s/sample, MS-SSIM {row['ms_ssim']:.4f}, "
              f"Frechet {row['frechet']:.4f}, W1 {row['foreground_w1']:.4f}", flush=True)

    ref = next((r for r in results if r["sampler"] == "ddpm" and r["steps"] == T), None)
    for r in results:
        if ref is None:
            r.update(frechet_ratio=None, ms_ssim_ratio=None, speedup=None, within_10pct=None,
                     no_worse=None)
            continue
        r["frechet_ratio"] = r["frechet"] / ref["frechet"] if ref["frechet"] > 0 else float("nan")
        r["ms_ssim_ratio"] = r["ms_ssim"] / ref["ms_ssim"] if ref["ms_ssim"] > 0 else float("nan")
        r["speedup"] = ref["seconds_per_sample"] / r["seconds_per_sample"]
        r["within_10pct"] = bool(abs(r["frechet_ratio"] - 1) <= 0.10 and abs(r["ms_ssim_ratio"] - 1) <= 0.10)
        r["no_worse"] = no_worse(r, ref, reference.diversity.mean)
    target = [f"{r['sampler']} {r['steps']}" for r in results if r["steps"] <= 50 and r.get("within_10pct")]
    target_one_sided = [f"{r['sampler']} {r['steps']}" for r in results
                        if r["steps"] <= 50 and r.get("no_worse")]

    real_div = reference.diversity
    header = [
        "# Synthesis benchmark: samplers x steps",
        "",
        f"- checkpoint: `{ckpt.path}` (sha256 {ckpt.sha256[:12]}, training step {ckpt.extra.get('step')})",
        f"- samples per configuration: {args.num} (seeds {args.seed}..{args.seed + args.num - 1}, batch "
        f"{args.batch_size}); device {probe.device}, {torch.get_num_threads()} thread(s), "
        f"{platform.processor() or platform.machine()}",
        f"- real set: {len(real)} {probe.kind} images from {', '.join(args.real)}; real MS-SSIM "
        f"{_fmt(real_div.mean)} ({real_div.pairs} pairs)",
        f"- MS-SSIM: {real_div.settings.scales} scales, window {real_div.settings.kernel_size}; Fréchet on "
        "medidiff-stats-v1 features (NOT FID; not comparable with published FIDs)",
        f"- reference: DDPM {T} steps in this run; target (<= 50 steps within 10 % of it on Fréchet "
        f"and MS-SSIM): {'met by ' + ', '.join(target) if target else 'not met'}; one-sided "
        f"(no worse than it): {'met by ' + ', '.join(target_one_sided) if target_one_sided else 'not met'}",
        f"- date {datetime.date.today().isoformat()}, total {time.perf_counter() - began:.0f} s",
        "",
        "| sampler | steps | NFE | s/sample | speed-up | MS-SSIM | ratio | Fréchet | ratio | W1 fg "
        "| nearest SSIM (median/max) | within 10 % | no worse |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: | :---: |",
    ]
    lines = [
        f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['seconds_per_sample']:.3f} | "
        f"{_fmt(r['speedup'], 1)} | {_fmt(r['ms_ssim'])} | {_fmt(r['ms_ssim_ratio'], 3)} | "
        f"{_fmt(r['frechet'])} | {_fmt(r['frechet_ratio'], 3)} | {_fmt(r['foreground_w1'])} | "
        f"{_fmt(r['nearest_real_ssim_median'], 3)}/{_fmt(r['nearest_real_ssim_max'], 3)} | "
        f"{_yes_no(r['within_10pct'])} | {_yes_no(r['no_worse'])} |"
        for r in results
    ]
    table = "\n".join(header + lines) + "\n"
    out = Path(args.out)
    write_text_atomic(out / "benchmark_synthesis.md", table)
    write_json_atomic(out / "benchmark_synthesis.json", {
        "checkpoint": str(ckpt.path), "checkpoint_sha256": ckpt.sha256,
        "training_step": ckpt.extra.get("step"),
        "num_samples": args.num, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "device": str(probe.device), "seed": args.seed, "real": args.real, "n_real": len(real),
        "real_ms_ssim": real_div.mean, "ms_ssim_settings": dataclasses.asdict(real_div.settings),
        "features": "medidiff-stats-v1 (NOT FID)", "reference": f"ddpm {T}", "target_met_by": target,
        "target_one_sided_met_by": target_one_sided,
        "results": results, "python": sys.version.split()[0], "torch": torch.__version__,
    })
    print(table)
    print(f"written to {out}/benchmark_synthesis.md and .json")
    return 0


def _yes_no(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "no")


def no_worse(row: dict, ref: dict, real_ms_ssim: float, tolerance: float = 0.10) -> bool:
    """The one-sided reading of the target: Fréchet at most ``tolerance`` above the
    reference's, and MS-SSIM within ``tolerance`` of it or closer to the real set's."""
    frechet_ok = row["frechet"] <= (1 + tolerance) * ref["frechet"]
    ms_close = abs(row["ms_ssim"] / ref["ms_ssim"] - 1) <= tolerance if ref["ms_ssim"] > 0 else False
    ms_nearer_real = abs(row["ms_ssim"] - real_ms_ssim) <= abs(ref["ms_ssim"] - real_ms_ssim)
    return bool(frechet_ok and (ms_close or ms_nearer_real))


if __name__ == "__main__":
    sys.exit(main())
