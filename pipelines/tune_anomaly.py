#!/usr/bin/env python
"""Tune the default anomaly method on sample_data: noise level t, DDIM steps, post-processing.

Reconstructions are the expensive part, post-processing is cheap: this script reconstructs
each test scan once per (t, steps) setting on the model grid (cached as .npz under
``--cache``, so reruns and new post-processing variants cost seconds), then scores every
post-processing variant (residual kind, median filter size, mask erosion) and prints one
table: pooled voxel AUROC / AUPRC on the model grid inside the brain mask, and AUPRC per
lesion kind, next to the no-network intensity baseline computed the same way.

Model-grid metrics are for ranking settings only; the numbers to report come from
``pipelines/benchmark_anomaly.py`` / ``medidiff demo`` on the native grid.

    python pipelines/tune_anomaly.py --t 150 250 400 --steps 10 --limit 8 --cache /tmp/tune
    python pipelines/tune_anomaly.py --checkpoint brain_mri_3d --method latent --t 100 250 400 --steps 1 5

Settings are tuned on the labelled ``validation_lesions`` split by default; the test split
(``--split test``) is for reporting only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: the shipped brain_mri_2d model")
    p.add_argument("--data", default=str(ROOT / "sample_data" / "dataset.json"))
    p.add_argument("--method", default="ddim", choices=["ddim", "anoddpm", "x0", "patched", "latent"])
    p.add_argument("--split", default="validation_lesions",
                   help="labelled split to tune on (default validation_lesions; the test split is "
                   "for reporting, not tuning)")
    p.add_argument("--t", type=int, nargs="+", default=[250])
    p.add_argument("--steps", type=int, nargs="+", default=[10])
    p.add_argument("--eta", type=float, nargs="+", default=[0.0], help="DDIM stochasticity (ddim only)")
    p.add_argument("--medians", type=int, nargs="+", default=[1, 3, 5, 7])
    p.add_argument("--erodes", type=int, nargs="+", default=[0, 2, 3])
    p.add_argument("--residuals", nargs="+", default=["l1", "l2"])
    p.add_argument("--limit", type=int, default=None, help="scans of --split (stratified by kind)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/medidiff_tune"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON of every row")
    return p.parse_args(argv)


def model_grid_scans(loaded: Any, tests: list[Any]) -> list[tuple[Any, ...]]:
    """(name, kind, image, brain mask, lesion mask) of each test scan on the model grid."""
    from medidiff.data.transforms import preprocess, to_model
    from medidiff.io.volume import load_volume

    prep = loaded.preprocessing
    scans = []
    for e in tests:
        mask = load_volume(e.mask)
        pre = preprocess(load_volume(e.image), prep, mask=mask)
        truth = np.zeros(pre.image.shape, bool)
        if e.segmentation is not None:
            truth = to_model(np.asarray(load_volume(e.segmentation).array) > 0, pre, interpolation="nearest") > 0.5
        scans.append((e.name, e.extra.get("kind", "?"), pre.image, pre.mask > 0, truth))
    return scans


def reconstructions(a: argparse.Namespace, loaded: Any, scans: list[tuple[Any, ...]]) -> dict[tuple, list[np.ndarray]]:
    """Per (t, steps) setting, each scan's reconstructions (cached), plus the baseline's."""
    from medidiff.anomaly.detector import AnomalyDetector, MethodConfig

    tag = loaded.checkpoint.sha256[:12]
    recon: dict[tuple, list[np.ndarray]] = {}
    for t, k, eta in itertools.product(a.t, a.steps, a.eta):
        extra = {"eta": eta} if a.method == "ddim" else {}
        det = AnomalyDetector(loaded, MethodConfig(a.method, t_start=t, steps=k, **extra), batch_size=a.batch_size, seed=a.seed)
        outs = []
        for name, kind, image, region, _ in scans:
            suffix = f"_eta{eta:g}" if eta else ""
            f = a.cache / f"{tag}_{a.method}_t{t}_k{k}{suffix}_s{a.seed}_{name}.npz"
            if f.exists():
                outs.append(np.load(f)["r"])
                continue
            start = time.perf_counter()
            r = det.reconstructor.reconstruct(image, region, name).images
            np.savez_compressed(f, r=r)
            print(f"  reconstructed {name} t={t} K={k} eta={eta:g} in {time.perf_counter() - start:.1f} s", flush=True)
            outs.append(r)
        recon[(t, f"{k}" + (f" eta={eta:g}" if eta else ""))] = outs
    healthy_level = float(np.median(np.concatenate([img[reg] for _, kind, img, reg, _ in scans if kind == "healthy"] or [scans[0][2][scans[0][3]]])))
    recon[("baseline", 0)] = [np.full((1, *img.shape), healthy_level, np.float32) for _, _, img, _, _ in scans]
    return recon


def score_rows(a: argparse.Namespace, scans: list[tuple[Any, ...]], recon: dict[tuple, list[np.ndarray]]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per (setting, post-processing variant): pooled AUROC/AUPRC and AUPRC per kind."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from medidiff.anomaly.postprocess import PostprocessConfig, anomaly_map

    rows = []
    kinds = sorted({kind for _, kind, *_ in scans if kind != "healthy"})
    for (t, k), outs in recon.items():
        for res, med, er in itertools.product(a.residuals, a.medians, a.erodes):
            cfg = PostprocessConfig(residual=res, median_size=med, erode=er)
            scores, labels, groups = [], [], []
            for (name, kind, image, region, truth), r in zip(scans, outs):
                amap, scored = anomaly_map(image, r, region, cfg)
                scores.append(amap[scored]); labels.append(truth[scored]); groups.append(np.full(scored.sum(), kind))
            s, y, g = np.concatenate(scores), np.concatenate(labels), np.concatenate(groups)
            row = {"t": t, "K": k, "residual": res, "median": med, "erode": er,
                   "auroc": roc_auc_score(y, s), "auprc": average_precision_score(y, s)}
            for kind in kinds:
                sel = (g == kind) | (g == "healthy")
                row[f"auprc_{kind}"] = average_precision_score(y[sel], s[sel]) if y[sel].any() else float("nan")
            rows.append(row)
    rows.sort(key=lambda r: -r["auroc"])
    return rows, kinds


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    from medidiff.data.datasets import load_datalist, stratified_by_kind
    from medidiff.models.checkpoint import build_model_from_checkpoint
    from medidiff.models.pretrained import resolve_checkpoint

    torch.set_num_threads(a.threads)
    ckpt = resolve_checkpoint(a.checkpoint)
    loaded = build_model_from_checkpoint(ckpt)
    tests = stratified_by_kind(load_datalist(a.data, split=a.split), a.limit)
    a.cache.mkdir(parents=True, exist_ok=True)
    scans = model_grid_scans(loaded, tests)
    rows, kinds = score_rows(a, scans, reconstructions(a, loaded, scans))
    head = ["t", "K", "residual", "median", "erode", "auroc", "auprc"] + [f"auprc_{k}" for k in kinds]
    print(f"checkpoint {ckpt} (step {loaded.checkpoint.extra.get('step')}), {len(scans)} {a.split} scans, model grid")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(f"{r[h]:.3f}" if isinstance(r[h], float) else str(r[h]) for h in head) + " |")
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
