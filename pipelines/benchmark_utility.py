"""Downstream utility of paired synthetic data, and how real the inpainted lesions are.

Segmentation utility (the field's test of a paired synthetic dataset; Med-DDPM, Dorjsembe
et al. 2024, report Dice 0.621 synthetic-only vs 0.653 real-only and 0.668 for both):
the same MONAI ``UNet`` (2D, channels 8-16-32-64, one residual unit per level, batch norm), the same
recipe (batch Dice + cross-entropy on sigmoid outputs, Adam 5e-3 with cosine decay, ``--iterations``
steps (1000) of batch 16, half of each batch from slices with lesion, left-right flips; chosen
on ``validation_lesions``) and the same seeds
are trained on

  (a) real:        sample_data ``training_lesions`` (24 labelled lesion scans),
  (b) synthetic:   pairs painted by ``medidiff inpaint`` into the 24 healthy ``train`` scans
                   (random masks of every kind from the lesion-shape model),
  (c) real + synthetic,

and evaluated on the real ``test`` split's 12 lesion scans, which neither the generator nor
the segmenter saw: per-scan Dice on the model grid (2.5 mm, 64 x 80 axial slices, the
diffusion model's preprocessing), mean over scans, then mean +- std over ``--seeds``.

Inpainting realism, per lesion kind, on the model scale (each scan's intensities mapped to
[0, 1] by its 1st-99th percentiles, so scans are comparable):

- W1 (Wasserstein-1) between the intensities inside the painted lesions and inside the
  real ``training_lesions`` lesions of that kind; for reference the same W1 for the healthy
  tissue that was under the masks before painting, and between two real lesion sets
  (``validation_lesions`` vs ``training_lesions``: the real-vs-real floor).
- Anomaly AUPRC: medidiff's AnomalyDetector (shipped ``brain_mri_2d``, its default method)
  on the inpainted scans, labels = the painted masks, against the same on the real
  ``validation_lesions`` scans: voxel AUPRC pooled inside the brain masks, on the native
  grid.

Usage:
    python pipelines/benchmark_utility.py --checkpoint runs/lesions/model.safetensors \\
        --pairs runs/utility_pairs --out benchmarks/utility.json
    python pipelines/benchmark_utility.py ... --iterations 100 --seeds 0 --quick   # smoke run
    python pipelines/benchmark_utility.py --checkpoint brain_mri_2d --training-data real \
        --parts utility --eval-split validation_lesions --seeds 0 1   # choosing the recipe

The pairs folder is made (or completed: the command resumes) with ``medidiff inpaint``'s
own code; ``--steps``/``--resample`` set its RePaint cost. Prints Markdown tables, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "sample_data" / "dataset.json"
TRAINING_DATA = ("real", "synthetic", "real+synthetic")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="mask-conditioned model that paints the pairs")
    p.add_argument("--pairs", default=None,
                   help="pairs folder (made or resumed here; needed unless only --training-data real)")
    p.add_argument("--per-scan", type=int, default=1, help="pairs per healthy train scan (default 1)")
    p.add_argument("--steps", type=int, default=20, help="RePaint steps (default 20)")
    p.add_argument("--resample", type=int, default=2, help="RePaint jumps per step (default 2)")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance on the label map (default 1)")
    p.add_argument("--iterations", type=int, default=1000, help="segmenter training steps (default 1000)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="segmenter seeds (default 0 1 2)")
    p.add_argument("--anomaly-limit", type=int, default=None,
                   help="score at most this many inpainted and real scans for the AUPRC (default all)")
    p.add_argument("--training-data", nargs="+", choices=TRAINING_DATA, default=list(TRAINING_DATA),
                   help="segmenter training sets (default all three)")
    p.add_argument("--eval-split", default="test", choices=("test", "validation_lesions"),
                   help="real lesion scans the segmenters are scored on: test (report, default) or "
                   "validation_lesions (choosing the recipe)")
    p.add_argument("--parts", nargs="+", choices=("utility", "realism"), default=["utility", "realism"],
                   help="what to measure (default both; run them as two processes to use two cores)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 test scans, 6 pairs")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", default=None, help="JSON to write")
    args = p.parse_args(argv)
    if needs_pairs(args) and not args.pairs:
        p.error("--pairs is needed for synthetic training data and for the realism part")
    return args


def needs_pairs(args: argparse.Namespace) -> bool:
    return "realism" in args.parts or ("utility" in args.parts and args.training_data != ["real"])


# ---------------------------------------------------------------------------------- data


@dataclass
class SliceSet:
    """Axial model-grid slices of some volumes: ``images``/``labels`` ``(N, 1, X, Y)``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def __add__(self, other: "SliceSet") -> "SliceSet":
        return SliceSet(np.concatenate([self.images, other.images]), np.concatenate([self.labels, other.labels]))


@dataclass
class EvalVolume:
    name: str
    kind: str
    image: np.ndarray   # (X, Y, Z) model grid
    label: np.ndarray   # (X, Y, Z) bool
    keep: np.ndarray    # (Z,) slices with brain


def model_grid(image_path: str, label_path: str | None, mask_path: str | None, preprocessing: Any) -> tuple:
    """A scan and its lesion label on the model grid; the slices with enough brain."""
    from medidiff.data.transforms import preprocess, to_model
    from medidiff.io import load_volume

    volume = load_volume(image_path)
    mask = load_volume(mask_path) if mask_path else None
    pre = preprocess(volume, preprocessing, mask=mask)
    label = np.zeros(pre.image.shape, bool)
    if label_path:
        seg = load_volume(label_path)
        label = to_model((np.asarray(seg.array) > 0).astype(np.uint8), pre, reference=seg,
                         interpolation="nearest") > 0
    region = pre.mask > 0 if pre.mask is not None else pre.foreground
    keep = region.mean(axis=(0, 1)) >= 0.15
    return pre, label, keep


def slices_of(cases: list[tuple[str, str | None, str | None]], preprocessing: Any) -> SliceSet:
    images, labels = [], []
    for image, label, mask in cases:
        pre, lab, keep = model_grid(image, label, mask, preprocessing)
        for z in np.flatnonzero(keep):
            images.append(pre.image[None, :, :, z])
            labels.append(lab[None, :, :, z])
    return SliceSet(np.stack(images).astype(np.float32), np.stack(labels).astype(np.float32))


def datalist(split: str) -> list[Any]:
    from medidiff.data.datalist import load_datalist

    return load_datalist(DATASET, split=split)


def cases_of(entries: list[Any]) -> list[tuple[str, str | None, str | None]]:
    return [(str(e.image), str(e.segmentation) if e.segmentation else None, str(e.mask) if e.mask else None)
            for e in entries]


# ---------------------------------------------------------------------------------- pairs


def make_pairs(args: argparse.Namespace) -> Path:
    """Paint the pairs (resumes) with ``medidiff inpaint``'s code; returns the folder."""
    from medidiff.synthesis.inpaint import Inpainter
    from medidiff.synthesis.lesion_pairs import InpaintPairMaker, inpaint_jobs
    from medidiff.synthesis.lesion_shapes import LesionShapeModel
    from medidiff.synthesis.pairs import write_pairs

    entries = datalist("training")
    if args.quick:
        entries = entries[:6]
    inpainter = Inpainter(args.checkpoint, device=args.device, steps=args.steps, resample=args.resample,
                          guidance=args.guidance)
    shapes = LesionShapeModel.fit_datalist(DATASET, split="training_lesions")
    jobs = inpaint_jobs(entries, seed=0, random_kind="any", per_scan=args.per_scan, shape_model=shapes)
    settings = {**inpainter.settings(), "seed": 0, "masks": None, "random_masks": "any", "kind": None}
    began = time.perf_counter()
    summary = write_pairs(jobs, InpaintPairMaker(inpainter, shapes), args.pairs, settings=settings, progress=True)
    print(f"pairs: {len(summary.generated)} painted, {len(summary.skipped)} present "
          f"({time.perf_counter() - began:.0f} s)", file=sys.stderr)
    return Path(args.pairs)


def source_of(row: dict[str, str], healthy: dict[str, tuple[str, str]]) -> tuple[str, str | None]:
    """The healthy scan a pair was painted into and its brain mask, found by file name among
    sample_data's ``training`` scans (else the manifest's path, without a mask)."""
    return healthy.get(Path(row["source_scan"]).name, (row["source_scan"], None))


def pair_cases(folder: Path) -> list[dict[str, str]]:
    from medidiff.synthesis.pairs import read_pairs_manifest

    return read_pairs_manifest(folder / "manifest.csv")


# ---------------------------------------------------------------------------------- segmenter


def build_segmenter() -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16, 32, 64),
                strides=(2, 2, 2), num_res_units=1, norm="batch")


def train_segmenter(data: SliceSet, *, seed: int, iterations: int, device: str = "cpu",
                    batch: int = 16) -> torch.nn.Module:
    """The fixed recipe: batch DiceCE (sigmoid), Adam 5e-3 with cosine decay, half of each
    batch lesion slices, LR flips (chosen on ``validation_lesions``: see RESULTS.md)."""
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build_segmenter().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, iterations))
    # batch Dice (one Dice over the whole batch, as nnU-Net): per-sample Dice of the slices
    # without lesion punishes any foreground and keeps a short run predicting nothing
    loss_fn = DiceCELoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
    positive = np.flatnonzero(data.labels.reshape(len(data), -1).any(axis=1))
    everything = np.arange(len(data))
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    net.train()
    for _ in range(iterations):
        half = batch // 2
        pick = np.concatenate([
            rng.choice(positive if len(positive) else everything, half),
            rng.choice(everything, batch - half),
        ])
        x, y = images[pick].clone(), labels[pick].clone()
        flip = torch.from_numpy(rng.random(batch) < 0.5)
        x[flip], y[flip] = x[flip].flip(-2), y[flip].flip(-2)  # left-right (X is the RAS x axis)
        loss = loss_fn(net(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """2 |P & T| / (|P| + |T|); 1 when both are empty."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = pred.sum() + truth.sum()
    return 1.0 if denom == 0 else float(2 * (pred & truth).sum() / denom)


@torch.no_grad()
def evaluate_segmenter(net: torch.nn.Module, volumes: list[EvalVolume], device: str = "cpu") -> dict[str, Any]:
    per_scan = {}
    for v in volumes:
        pred = np.zeros(v.label.shape, bool)
        zs = np.flatnonzero(v.keep)
        x = torch.from_numpy(np.moveaxis(v.image[:, :, zs], -1, 0)[:, None].copy()).float().to(device)
        prob = torch.sigmoid(net(x))[:, 0].cpu().numpy()
        pred[:, :, zs] = np.moveaxis(prob > 0.5, 0, -1)
        per_scan[v.name] = (v.kind, dice(pred, v.label))
    kinds = sorted({k for k, _ in per_scan.values()})
    out = {"mean": float(np.mean([d for _, d in per_scan.values()])),
           "per_scan": {n: d for n, (_, d) in per_scan.items()}}
    out.update({k: float(np.mean([d for kk, d in per_scan.values() if kk == k])) for k in kinds})
    return out


# ---------------------------------------------------------------------------------- realism


def lesion_intensities(cases: list[tuple[str, str | None, str | None, str]], preprocessing: Any,
                       before: bool = False) -> dict[str, np.ndarray]:
    """Model-scale intensities inside the lesions, by kind."""
    out: dict[str, list[np.ndarray]] = {}
    for image, label, mask, kind in cases:
        pre, lab, _ = model_grid(image, label, mask, preprocessing)
        out.setdefault(kind, []).append(pre.image[lab])
    return {k: np.concatenate(v) for k, v in out.items()}


def w1_table(synth: dict, healthy: dict, real: dict, real_val: dict) -> dict[str, dict[str, float]]:
    from scipy.stats import wasserstein_distance

    table = {}
    for kind in sorted(real):
        row = {}
        for name, values in (("inpainted", synth), ("healthy_before", healthy), ("real_val", real_val)):
            if kind in values and len(values[kind]):
                row[name] = float(wasserstein_distance(values[kind], real[kind]))
        table[kind] = row
    return table


def anomaly_auprc(scans: list[tuple[str, str, str | None, str]], limit: int | None, device: str) -> dict[str, float]:
    """Voxel AUPRC (pooled inside brain masks, native grid), overall and by kind."""
    from sklearn.metrics import average_precision_score

    from medidiff.anomaly.detector import AnomalyDetector
    from medidiff.io import load_volume
    from medidiff.models.pretrained import pretrained_path

    detector = AnomalyDetector(pretrained_path("brain_mri_2d"), device=device)
    scores: dict[str, list[np.ndarray]] = {}
    truths: dict[str, list[np.ndarray]] = {}
    for image, label, mask, kind in scans[:limit]:
        volume = load_volume(image)
        brain = load_volume(mask) if mask else volume.with_array((np.asarray(volume.array) > 0).astype(np.uint8))
        result = detector.score(volume, mask=brain)
        inside = np.asarray(brain.array) > 0
        for key in (kind, "all"):
            scores.setdefault(key, []).append(np.asarray(result.anomaly_map)[inside])
            truths.setdefault(key, []).append(np.asarray(load_volume(label).array)[inside] > 0)
    return {k: float(average_precision_score(np.concatenate(truths[k]), np.concatenate(scores[k])))
            for k in sorted(scores)}


# ---------------------------------------------------------------------------------- main


def _fmt(values: list[float]) -> str:
    return f"{np.mean(values):.3f} +- {np.std(values):.3f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from medidiff.models.loaded import load_model

    from medidiff.models.pretrained import resolve_checkpoint

    began = time.perf_counter()
    args.checkpoint = str(resolve_checkpoint(args.checkpoint))  # a path or a shipped model's name
    preprocessing = load_model(args.checkpoint).preprocessing
    folder = make_pairs(args) if needs_pairs(args) else None
    rows = pair_cases(folder) if folder else []
    # source scans by file name: a pairs folder made from another checkout still resolves
    healthy_masks = {Path(e.image).name: (str(e.image), str(e.mask)) for e in datalist("training")}

    real_entries = datalist("training_lesions")
    result: dict[str, Any] = {
        "checkpoint": str(args.checkpoint), "pairs": str(folder) if folder else None, "num_pairs": len(rows),
        "repaint": {"steps": args.steps, "resample": args.resample, "guidance": args.guidance},
        "quick": bool(args.quick),
    }
    if "utility" in args.parts:
        result.update(utility_part(args, preprocessing, folder, rows, healthy_masks, real_entries))
    if "realism" in args.parts:
        result.update(realism_part(args, preprocessing, folder, rows, healthy_masks, real_entries))
    result["seconds"] = time.perf_counter() - began
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


def utility_part(args: argparse.Namespace, preprocessing: Any, folder: Path, rows: list, healthy_masks: dict,
                 real_entries: list) -> dict[str, Any]:
    """Segmenters on real / synthetic / both, Dice on the lesion scans of ``--eval-split``."""
    test_entries = [e for e in datalist(args.eval_split) if e.extra.get("kind") != "healthy"]
    if args.quick:
        test_entries = test_entries[::3]
    sets: dict[str, SliceSet] = {}
    if {"real", "real+synthetic"} & set(args.training_data):
        sets["real"] = slices_of(cases_of(real_entries), preprocessing)
    if {"synthetic", "real+synthetic"} & set(args.training_data):
        sets["synthetic"] = slices_of(
            [(str(folder / r["image"]), str(folder / r["label"]), source_of(r, healthy_masks)[1]) for r in rows],
            preprocessing)
    if "real+synthetic" in args.training_data:
        sets["real+synthetic"] = sets["real"] + sets["synthetic"]
    volumes = []
    for e in test_entries:
        pre, lab, keep = model_grid(str(e.image), str(e.segmentation), str(e.mask), preprocessing)
        volumes.append(EvalVolume(e.name, str(e.extra.get("kind")), pre.image, lab, keep))
    print("slices: " + ", ".join(f"{name} {len(d)} ({int(d.labels.any(axis=(1, 2, 3)).sum())} with lesion)"
                                 for name, d in sets.items())
          + f"; {len(volumes)} {args.eval_split} scans", file=sys.stderr)

    utility: dict[str, Any] = {}
    for name in args.training_data:
        data = sets[name]
        runs = []
        for seed in args.seeds:
            t0 = time.perf_counter()
            net = train_segmenter(data, seed=seed, iterations=args.iterations, device=args.device)
            runs.append(evaluate_segmenter(net, volumes, args.device))
            print(f"{name} seed {seed}: Dice {runs[-1]['mean']:.3f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr)
        kinds = [k for k in runs[0] if k not in ("mean", "per_scan")]
        utility[name] = {"dice": [r["mean"] for r in runs],
                         **{k: [r[k] for r in runs] for k in kinds}, "slices": len(data)}
    first = next(iter(utility.values()))
    print(f"\nDice on {args.eval_split} ({len(volumes)} lesion scans)\n")
    print("| training data | slices | Dice (mean +- std over seeds) | " +
          " | ".join(k for k in first if k not in ("dice", "slices")) + " |")
    print("|---|---|---|" + "---|" * (len(first) - 2))
    for name, u in utility.items():
        extra = " | ".join(_fmt(u[k]) for k in u if k not in ("dice", "slices"))
        print(f"| {name} | {u['slices']} | {_fmt(u['dice'])} | {extra} |")
    ratio = gain = None
    if {"real", "synthetic"} <= set(utility):
        ratio = float(np.mean(utility["synthetic"]["dice"]) / max(np.mean(utility["real"]["dice"]), 1e-9))
        print(f"\nsynthetic-only / real-only Dice: {ratio:.1%} (target >= 90 %)")
    if {"real", "real+synthetic"} <= set(utility):
        gain = float(np.mean(utility["real+synthetic"]["dice"]) - np.mean(utility["real"]["dice"]))
        print(f"real+synthetic - real: {gain:+.3f} (target > 0)")
    return {
        "segmenter": {"network": "monai UNet 2D (8, 16, 32, 64), 1 res unit, batch norm", "loss": "batch DiceCE (sigmoid)",
                      "optimizer": "Adam 5e-3, cosine decay", "sampling": "half lesion slices",
                      "iterations": args.iterations, "batch": 16, "seeds": args.seeds,
                      "eval": f"per-scan Dice on the model grid, {args.eval_split} lesion scans"},
        "utility": utility, "synthetic_over_real": ratio, "real_plus_synthetic_gain": gain,
    }


def realism_part(args: argparse.Namespace, preprocessing: Any, folder: Path, rows: list, healthy_masks: dict,
                 real_entries: list) -> dict[str, Any]:
    """W1 of lesion intensities and the anomaly detector's AUPRC, inpainted vs real."""
    sources = [source_of(r, healthy_masks) for r in rows]  # (healthy scan, its brain mask)
    synth_k = [(str(folder / r["image"]), str(folder / r["label"]), mask, r["kind"])
               for r, (_, mask) in zip(rows, sources)]
    before_k = [(image, str(folder / r["label"]), mask, r["kind"]) for r, (image, mask) in zip(rows, sources)]
    real_k = [(str(e.image), str(e.segmentation), str(e.mask), str(e.extra.get("kind"))) for e in real_entries]
    val_k = [(str(e.image), str(e.segmentation), str(e.mask), str(e.extra.get("kind")))
             for e in datalist("validation_lesions")]
    w1 = w1_table(lesion_intensities(synth_k, preprocessing), lesion_intensities(before_k, preprocessing),
                  lesion_intensities(real_k, preprocessing), lesion_intensities(val_k, preprocessing))
    limit = args.anomaly_limit if not args.quick else 3
    auprc = {"inpainted": anomaly_auprc(synth_k, limit, args.device),
             "real_val_lesions": anomaly_auprc(val_k, limit, args.device)}

    print("\n| kind | W1 inpainted vs real | W1 healthy tissue under the mask vs real | W1 real (val) vs real (train) |")
    print("|---|---|---|---|")
    for kind, row in w1.items():
        print(f"| {kind} | " + " | ".join(f"{row.get(k, float('nan')):.3f}" for k in
                                          ("inpainted", "healthy_before", "real_val")) + " |")
    columns = sorted(set(auprc["inpainted"]) | set(auprc["real_val_lesions"]))
    print("\n| voxel AUPRC (shipped brain_mri_2d detector) | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, row in auprc.items():
        print(f"| {name} | " + " | ".join(f"{row.get(k, float('nan')):.3f}" for k in columns) + " |")

    return {"w1_model_scale": w1, "anomaly_voxel_auprc": auprc}


if __name__ == "__main__":
    main()
