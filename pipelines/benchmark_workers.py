#!/usr/bin/env python
"""Benchmark scan-level worker processes against one process with all the threads.

Calibrates the default detector and the no-network intensity baseline on sample_data's
healthy validation scans (what ``medidiff demo`` does first) with ``W`` worker processes of
``threads / W`` PyTorch threads each (:mod:`medidiff.runtime.parallel`), for every ``W`` asked, in
one run, and prints a table: seconds per configuration and the speed-up over ``W = 1``
(the reference, measured in the same run). It also checks that the thresholds are the same
whatever ``W`` is.

    python pipelines/benchmark_workers.py                 # W = 1 and 2 on all cores
    python pipelines/benchmark_workers.py --workers 1 2 4 --threads 4
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: the shipped default 2D model (brain_mri_2d_2mm)")
    p.add_argument("--data", default=str(ROOT / "sample_data" / "dataset.json"))
    p.add_argument("--split", default="validation",
                   help="the scans to calibrate on (default: the 6 healthy validation scans; "
                   "'test' times 16 scans; only the time matters here)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=None, help="total torch threads (default: all CPUs)")
    a = p.parse_args(argv)

    import torch

    from medidiff.anomaly.detector import AnomalyDetector, MethodConfig
    from medidiff.anomaly.runner import calibrate
    from medidiff.anomaly.baseline import IntensityBaseline
    from medidiff.models.checkpoint import build_model_from_checkpoint
    from medidiff.data.datalist import load_datalist
    from medidiff.runtime.parallel import usable_cpus
    from medidiff.models.pretrained import resolve_checkpoint

    threads = a.threads or usable_cpus()
    torch.set_num_threads(threads)
    loaded = build_model_from_checkpoint(resolve_checkpoint(a.checkpoint))
    healthy = load_datalist(a.data, split=a.split)
    detector = AnomalyDetector(loaded, MethodConfig(), seed=0)
    baseline = IntensityBaseline.from_healthy(loaded.checkpoint, healthy, detector.postprocess)

    rows, reference = [], {}
    for name, scorer in (("default method", detector), ("intensity baseline", baseline)):
        for workers in a.workers:
            start = time.perf_counter()
            thresholds = calibrate(scorer, healthy, workers=workers)
            seconds = time.perf_counter() - start
            key = (name, workers)
            reference.setdefault(name, (seconds, thresholds.voxel_threshold))
            ref_seconds, ref_threshold = reference[name]
            rows.append((name, workers, max(1, threads // workers), seconds, ref_seconds / seconds,
                         thresholds.voxel_threshold == ref_threshold))
            print(f"  {key}: {seconds:.1f} s", flush=True)

    print(f"\n{len(healthy)} '{a.split}' scans calibrated; {threads} torch threads in all; "
          f"{platform.machine()}, {usable_cpus()} usable CPUs; method {detector.method.method} "
          f"t={detector.method.t_start} K={detector.method.steps}; reference: the first --workers value")
    print("| scorer | workers | threads each | seconds | speed-up | same thresholds |")
    print("|---|---|---|---|---|---|")
    for name, workers, each, seconds, speedup, same in rows:
        print(f"| {name} | {workers} | {each} | {seconds:.1f} | {speedup:.2f}x | {'yes' if same else 'NO'} |")
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
