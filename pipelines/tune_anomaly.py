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
    python pipelines/tune_anomaly.py --method multi --starts 25,50,100,200 50,50,50,50 --steps 1 \
        --residuals l1 mahalanobis
    python pipelines/tune_anomaly.py --method thor --t 100 200 --steps 5 --residuals l1 l1ssim

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
    p.add_argument("--checkpoint", default=None, help="default: the shipped default 2D model (brain_mri_2d_2mm)")
    p.add_argument("--data", default=str(ROOT / "sample_data" / "dataset.json"))
    p.add_argument("--method", default="ddim",
                   choices=["ddim", "anoddpm", "x0", "patched", "latent", "multi", "ensemble", "thor"])
    p.add_argument("--starts", nargs="+", default=None,
                   help="multi / ensemble: start sets to try, each comma-separated (e.g. 25,50,100,200)")
    p.add_argument("--split", default="validation_lesions",
                   help="labelled split to tune on (default validation_lesions; the test split is "
                   "for reporting, not tuning)")
    p.add_argument("--t", type=int, nargs="+", default=[250])
    p.add_argument("--steps", type=int, nargs="+", default=[10])
    p.add_argument("--eta", type=float, nargs="+", default=[0.0], help="DDIM stochasticity (ddim only)")
    p.add_argument("--medians", type=int, nargs="+", default=[1, 3, 5, 7])
    p.add_argument("--erodes", type=int, nargs="+", default=[0, 2, 3])
    p.add_argument("--residuals", nargs="+", default=["l1", "l2"],
                   help="residual kinds (l1 l2 ssim gradient l1ssim mahalanobis)")
    p.add_argument("--limit", type=int, default=None, help="scans of --split (stratified by kind)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/medidiff_tune"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON of every row")
    p.add_argument("--calibrate-on", default=None,
                   help="healthy split (e.g. validation): also compare calibration rules (voxel FPR, "
                   "false-positive volume, component size) by the dataset-wise Dice they give on "
                   "--split, for the --calib-top best settings by AUPRC")
    p.add_argument("--calib-top", type=int, default=3)
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
    several = a.method in ("multi", "ensemble")
    starts = [tuple(int(v) for v in s.split(",")) for s in a.starts] if several and a.starts else [None]
    for t, k, eta in itertools.product(starts if several else a.t, a.steps, a.eta):
        extra = {"eta": eta} if a.method == "ddim" else {}
        where = {"t_starts": t} if several else {"t_start": t}
        det = AnomalyDetector(loaded, MethodConfig(a.method, steps=k, **where, **extra), batch_size=a.batch_size, seed=a.seed)
        t = "+".join(map(str, det.method.t_starts)) if several else t
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
    from medidiff.errors import ConfigError

    rows = []
    kinds = sorted({kind for _, kind, *_ in scans if kind != "healthy"})
    for (t, k), outs in recon.items():
        for res, med, er in itertools.product(a.residuals, a.medians, a.erodes):
            cfg = PostprocessConfig(residual=res, median_size=med, erode=er)
            scores, labels, groups = [], [], []
            try:
                pairs = [anomaly_map(image, r, region, cfg) for (_, _, image, region, _), r in zip(scans, outs)]
            except ConfigError:  # e.g. mahalanobis on a single reconstruction
                continue
            for (name, kind, image, region, truth), (amap, scored) in zip(scans, pairs):
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


def _dice(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / max(2 * tp + fp + fn, 1)


def oracle_dice(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The best dataset-wise Dice over all thresholds (labels used: an optimistic bound)."""
    order = np.argsort(-scores, kind="stable")
    y = labels[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    fn = y.sum() - tp
    dice = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    best = int(np.argmax(dice))
    return float(dice[best]), float(scores[order][best])


RULES = (
    [("voxel-fpr", f, 0.0) for f in (0.05, 0.02, 0.01, 0.005, 0.002, 0.001)]
    + [("fp-volume", ml, mc) for ml in (0.5, 1.0, 2.0, 4.0, 8.0) for mc in (0.0, 0.25, 0.5, 1.0, 2.0)]
)


def calibration_rows(a: argparse.Namespace, rows: list[dict[str, Any]], scans: list[tuple[Any, ...]],
                     recon: dict[tuple, list[np.ndarray]], healthy: list[tuple[Any, ...]],
                     hrecon: dict[tuple, list[np.ndarray]], voxel_ml: float) -> list[dict[str, Any]]:
    """For the best settings: each calibration rule's threshold on the healthy scans, and the
    dataset-wise Dice it gives on the labelled scans (model grid), beside the oracle Dice."""
    import math

    from medidiff.anomaly.calibration import HealthyMap, fp_volume_threshold, voxel_fpr_threshold
    from medidiff.anomaly.postprocess import PostprocessConfig, anomaly_map, segment

    out = []
    for row in sorted(rows, key=lambda r: -r["auprc"])[: a.calib_top]:
        key = (row["t"], row["K"])
        cfg = PostprocessConfig(residual=row["residual"], median_size=row["median"], erode=row["erode"])
        maps = [HealthyMap(h[0], *anomaly_map(h[2], r, h[3], cfg)) for h, r in zip(healthy, hrecon[key])]
        lesions = [(anomaly_map(sc[2], r, sc[3], cfg), sc[4]) for sc, r in zip(scans, recon[key])]
        pooled_s = np.concatenate([amap[m] for (amap, m), _ in lesions])
        pooled_y = np.concatenate([truth[m] for (_, m), truth in lesions])
        best, _ = oracle_dice(pooled_s, pooled_y)
        for target, value, mc_ml in RULES:
            mc = int(math.ceil(mc_ml / voxel_ml - 1e-9)) if mc_ml else 0
            thr = (voxel_fpr_threshold(maps, value) if target == "voxel-fpr"
                   else fp_volume_threshold(maps, value, voxel_ml, mc))
            tp = fp = fn = 0
            for (amap, m), truth in lesions:
                seg = segment(amap, m, thr, mc)
                t_in = truth & m
                tp += int((seg & t_in).sum()); fp += int((seg & ~t_in).sum()); fn += int((~seg & t_in).sum())
            fp_h = float(np.mean([(segment(h.values, h.mask, thr, mc)).sum() for h in maps])) * voxel_ml
            out.append({"t": row["t"], "K": row["K"], "residual": row["residual"], "median": row["median"],
                        "erode": row["erode"], "target": target, "value": value, "min_component_ml": mc_ml,
                        "threshold": thr, "dice": _dice(tp, fp, fn), "oracle_dice": best,
                        "healthy_fp_ml": fp_h})
    return out


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
    recon = reconstructions(a, loaded, scans)
    rows, kinds = score_rows(a, scans, recon)
    head = ["t", "K", "residual", "median", "erode", "auroc", "auprc"] + [f"auprc_{k}" for k in kinds]
    print(f"checkpoint {ckpt} (step {loaded.checkpoint.extra.get('step')}), {len(scans)} {a.split} scans, model grid")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(f"{r[h]:.3f}" if isinstance(r[h], float) else str(r[h]) for h in head) + " |")
    calib = []
    if a.calibrate_on:
        healthy = model_grid_scans(loaded, load_datalist(a.data, split=a.calibrate_on))
        hrecon = reconstructions(a, loaded, healthy)
        voxel_ml = float(np.prod(loaded.preprocessing.spacing)) / 1000.0  # a LoadedModel, not a detector
        calib = calibration_rows(a, rows, scans, recon, healthy, hrecon, voxel_ml)
        chead = ["t", "K", "residual", "median", "erode", "target", "value", "min_component_ml",
                 "dice", "oracle_dice", "healthy_fp_ml"]
        print(f"\ncalibration rules: thresholds from {len(healthy)} healthy {a.calibrate_on} scans, "
              f"dataset-wise Dice on the {len(scans)} {a.split} scans (model grid)")
        print("| " + " | ".join(chead) + " |")
        print("|" + "---|" * len(chead))
        for r in sorted(calib, key=lambda r: -r["dice"]):
            print("| " + " | ".join(f"{r[h]:.3f}" if isinstance(r[h], float) else str(r[h]) for h in chead) + " |")
    if a.out:
        a.out.write_text(json.dumps({"rows": rows, "calibration": calib}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
