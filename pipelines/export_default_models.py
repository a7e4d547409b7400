#!/usr/bin/env python
"""Export a training run as a default model shipped inside the package.

Reads ``RUN/model.safetensors`` (EMA weights, written by ``medidiff train``), stores it as
fp16 in ``medidiff/weights/<name>.safetensors`` (same metadata: config, preprocessing,
training step), checks that fp16 changes the network's output by a negligible amount, and
writes the model card: ``<name>.json`` (facts), ``<name>_loss.png`` (loss curve from
``RUN/metrics.csv``) and ``<name>.md``. Metrics measured elsewhere (the anomaly benchmark,
the demo, the synthesis benchmark) enter the card with ``--metrics FILE.json``: a JSON
object ``{"title": ..., "command": ..., "date": ..., "machine": ..., "table": markdown or
"rows": {...}}`` stored verbatim under ``metrics``.

Usage (what made the shipped models):

    python pipelines/export_default_models.py --run runs/brain_mri_2d --name brain_mri_2d \\
        --config configs/brain_mri_2d.yaml --machine "2-core x86_64 CPU (AVX2), 1 thread"
    python pipelines/export_default_models.py --run runs/brain_mri_3d --name brain_mri_3d \\
        --config configs/brain_mri_3d.yaml --machine "..."
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_BYTES = 20 * 1024 * 1024  # the limit for a shipped model


def read_metrics(path: Path) -> list[dict[str, float]]:
    """Rows of a run's metrics.csv as floats."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def wall_time(rows: list[dict[str, float]]) -> float:
    """Training wall time over resumed segments: ``seconds`` restarts at each resume."""
    total, last = 0.0, 0.0
    for row in rows:
        s = row.get("seconds", 0.0)
        if s < last:  # a resume: close the previous segment
            total += last
        last = s
    return total + last


def fp16_error(fp32_path: Path, fp16_path: Path) -> float:
    """Largest |eps_fp16 - eps_fp32| of the network on a fixed random input (float32 compute)."""
    import torch

    from medidiff.models.checkpoint import build_model_from_checkpoint

    loaded = build_model_from_checkpoint(fp32_path)
    a = loaded.model.eval()
    b = build_model_from_checkpoint(fp16_path).model.eval()
    prep = loaded.checkpoint.preprocessing
    dims = int(loaded.checkpoint.model_kwargs["spatial_dims"])
    shape = tuple(prep["shape"][:2]) if dims == 2 else tuple(prep["shape"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 1, *shape), generator=g)
    t = torch.tensor([100, 600])
    with torch.no_grad():
        extra = {}
        if getattr(a, "num_class_embeds", None):
            extra["class_labels"] = torch.tensor([a.num_class_embeds - 1] * 2)
        return float((a(x, t, **extra) - b(x, t, **extra)).abs().max())


def loss_curve_png(metrics_csv: Path, out: Path) -> None:
    from medidiff.viz.figures import loss_curve
    from medidiff.viz.display import save_figure

    save_figure(loss_curve(metrics_csv), out)


def demo_card_metrics(path: Path) -> dict:
    """The anomaly results of a ``medidiff demo`` run (its metrics.json) as a card section."""
    m = json.loads(path.read_text())
    ev = m["evaluation"]

    def f(v: object) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    rows = ["| scans | method | voxel AUROC | voxel AUPRC | Dice @ 5 % FPR (dataset-wise) | oracle Dice | scan AUROC |",
            "|---|---|---|---|---|---|---|"]
    for group in ["overall", "tumor", "ms", "stroke"]:
        for who in ("default", "baseline"):
            g = ev[who]["overall"] if group == "overall" else ev[who]["groups"].get(group)
            if not g:
                continue
            oracle = g.get("oracle_dice_dataset_wise", g.get("oracle_dice"))
            rows.append(f"| {'all 16' if group == 'overall' else group} | "
                        f"{'default method' if who == 'default' else 'intensity baseline'} | "
                        f"{f(g['voxel_auroc'])} | {f(g['voxel_auprc'])} | {f(g['dice_dataset_wise'])} | "
                        f"{f(oracle)} | {f(g.get('scan_auroc'))} |")
    meth = m["method"]
    return {
        "title": "Anomaly detection on sample_data (medidiff demo)",
        "date": m.get("created", ""),
        "machine": ", ".join(f"{k} {v}" for k, v in m.get("machine", {}).items()),
        "command": "medidiff demo --out demo_out",
        "table": "\n".join(rows),
        "notes": (f"Method {meth.get('method')} (t = {meth.get('t_start')}, {meth.get('steps')} steps), "
                  f"post-processing {m.get('postprocess')}; thresholds calibrated on the 6 healthy "
                  "validation scans at 5 % FPR; metrics on each scan's native grid inside its brain "
                  "mask. The method's t, K and post-processing were tuned on 4 of these 16 test "
                  "scans (benchmarks/RESULTS.md)."),
    }


def card_markdown(facts: dict) -> str:
    n = facts["name"]
    lines = [
        f"# Model card: {n}",
        "",
        facts["description"] + ".",
        "",
        "| | |",
        "|---|---|",
        f"| file | `medidiff/weights/{n}.safetensors` ({facts['size_bytes'] / 1e6:.1f} MB, fp16; sha256 `{facts['sha256'][:16]}...`) |",
        f"| network | {facts['network']} ({facts['parameters'] / 1e6:.2f} M parameters) |",
        f"| data | {facts['data']} |",
        f"| preprocessing | {facts['preprocessing']} |",
        f"| diffusion | {facts['diffusion']} |",
        f"| training | {facts['steps']} steps, batch {facts['batch_size']}, lr {facts['lr']:g} (warm-up + cosine), EMA {facts['ema_decay']} |",
        f"| wall time | {facts['wall_time_s'] / 3600:.2f} h on {facts['machine']} |",
        f"| final loss | {facts['final_loss']:.4f} (mean of the last 10 logged values) |",
        f"| fp16 export | max abs change of the network output {facts['fp16_max_abs_error']:.2e} on a random input |",
        f"| trained | {facts['trained_on']}, config `{facts['config']}` |",
        *([f"| note | {facts['note']} |"] if facts.get("note") else []),
        "",
        f"![loss curve]({n}_loss.png)",
        "",
        "Retrain and re-export:",
        "",
        "```",
        f"medidiff train --config {facts['config']} --out runs/{n}",
        f"python pipelines/export_default_models.py --run runs/{n} --name {n} --config {facts['config']}",
        "```",
        "",
        "## Metrics",
        "",
    ]
    metrics = facts.get("metrics")
    if not metrics:
        lines += ["Not measured for this export.", ""]
    else:
        for m in metrics if isinstance(metrics, list) else [metrics]:
            lines += [f"### {m.get('title', 'results')}", ""]
            for key in ("date", "machine", "command"):
                if m.get(key):
                    lines.append(f"- {key}: `{m[key]}`" if key == "command" else f"- {key}: {m[key]}")
            lines.append("")
            if m.get("table"):
                lines += [m["table"], ""]
            if m.get("notes"):
                lines += [m["notes"], ""]
    lines += [
        "## Limits",
        "",
        "Trained on sample_data only: 24 healthy subjects made from the MNI152 template by smooth "
        "deformations and intensity changes (see DOMAIN.md and pipelines/make_sample_data.py). It "
        "has seen no real patient anatomy, scanner or contrast variation; use it to learn the "
        "tool and as a starting point, and train on your own data for research results.",
        "",
    ]
    return "\n".join(lines)


def card_metrics(a: argparse.Namespace) -> list[dict]:
    """The card's metrics sections: each ``--metrics`` JSON, then the demo's results."""
    return [json.loads(p.read_text(encoding="utf-8")) for p in a.metrics] + (
        [demo_card_metrics(a.demo_metrics)] if a.demo_metrics else [])


def rewrite_card(a: argparse.Namespace) -> int:
    """``--card-only``: new metrics and note in the existing card; weights untouched."""
    from medidiff.models.checkpoint import file_sha256
    from medidiff.io import write_json_atomic, write_text_atomic

    facts_path = a.out / f"{a.name}.json"
    facts = json.loads(facts_path.read_text(encoding="utf-8"))
    weights = a.out / f"{a.name}.safetensors"
    if file_sha256(weights) != facts.get("sha256"):
        raise SystemExit(f"{weights} is not the file its card describes (sha256 differs); "
                         "export it again without --card-only")
    if a.metrics or a.demo_metrics:
        facts["metrics"] = card_metrics(a)
    if a.note:
        facts["note"] = a.note
    write_json_atomic(facts_path, facts)
    write_text_atomic(a.out / f"{a.name}.md", card_markdown(facts))
    print(f"card {a.out / (a.name + '.md')} rewritten; weights unchanged (sha256 {facts['sha256'][:12]})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="training run folder")
    p.add_argument("--name", required=True, choices=["brain_mri_2d", "brain_mri_3d"])
    p.add_argument("--config", required=True, help="the config file the run used (recorded)")
    p.add_argument("--machine", default=None, help="where it trained (default: this machine, described)")
    p.add_argument("--metrics", type=Path, action="append", default=[],
                   help="JSON results to put in the card (repeatable)")
    p.add_argument("--demo-metrics", type=Path, default=None,
                   help="a `medidiff demo` metrics.json: its anomaly results go into the card")
    p.add_argument("--note", default="", help="a sentence on how the run went (stopped early, resumed, ...)")
    p.add_argument("--out", type=Path, default=ROOT / "medidiff" / "weights")
    p.add_argument("--card-only", action="store_true",
                   help="keep the shipped weights (and their sha256, which thresholds are tied "
                   "to); rewrite only the card's metrics (--metrics/--demo-metrics) and note")
    a = p.parse_args(argv)
    if a.card_only:
        return rewrite_card(a)

    import torch

    from medidiff.models.checkpoint import file_sha256, load_inference, save_inference
    from medidiff.config import Config
    from medidiff.io import write_json_atomic, write_text_atomic
    from medidiff.models.pretrained import MODELS

    src = a.run / "model.safetensors"
    ckpt = load_inference(src)
    cfg = Config.from_dict(ckpt.config)
    a.out.mkdir(parents=True, exist_ok=True)
    dst = a.out / f"{a.name}.safetensors"
    save_inference(dst, ckpt.state_dict, model_kwargs=ckpt.model_kwargs, config=ckpt.config,
                   preprocessing=ckpt.preprocessing, extra=ckpt.extra, half=True)
    size = dst.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{dst}: {size / 1e6:.1f} MB exceeds the 20 MB limit for a shipped model")
    err = fp16_error(src, dst)

    rows = read_metrics(a.run / "metrics.csv")
    step = int(ckpt.extra.get("step", rows[-1]["step"] if rows else 0))
    rows = [r for r in rows if r["step"] <= step]
    last = [r["loss"] for r in rows[-10:]]
    prep = ckpt.preprocessing
    d, t, m = cfg.diffusion, cfg.train, cfg.model
    kw = ckpt.model_kwargs
    params = sum(v.numel() for v in ckpt.state_dict.values())
    machine = a.machine or (
        f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, {platform.system()}"
    )
    facts = {
        "name": a.name,
        "description": MODELS[a.name],
        "config": a.config,
        "data": f"sample_data '{cfg.data.split}' split (24 healthy T1 volumes, 2 mm)",
        "preprocessing": (
            f"{prep.get('modality')} resampled to {' x '.join(f'{s:g}' for s in prep['spacing'])} mm, "
            f"RAS grid {' x '.join(str(s) for s in prep['shape'])}, intensities to [0, 1] by the "
            f"{prep.get('lower_percentile', 1):g}-{prep.get('upper_percentile', 99):g} percentiles"
        ),
        "network": (
            f"MONAI DiffusionModelUNet {kw['spatial_dims']}D, preset '{m.preset}', channels "
            f"{tuple(kw['channels'])}, attention {tuple(kw['attention_levels'])}"
        ),
        "diffusion": (
            f"{d.num_train_timesteps} steps, {d.schedule} ({d.beta_start:g} .. {d.beta_end:g}), "
            f"{d.prediction_type} prediction, {d.noise} noise"
        ),
        "parameters": int(params),
        "steps": step,
        "batch_size": t.batch_size,
        "lr": t.lr,
        "ema_decay": t.ema_decay,
        "wall_time_s": round(wall_time(rows), 1),
        "machine": machine,
        "final_loss": sum(last) / max(1, len(last)),
        "fp16_max_abs_error": err,
        "trained_on": _dt.date.today().isoformat(),
        "sha256": file_sha256(dst),
        "size_bytes": size,
        "metrics": card_metrics(a),
        "note": a.note,
    }
    loss_curve_png(a.run / "metrics.csv", a.out / f"{a.name}_loss.png")
    write_json_atomic(a.out / f"{a.name}.json", facts)
    write_text_atomic(a.out / f"{a.name}.md", card_markdown(facts))
    print(f"{dst} ({size / 1e6:.2f} MB, step {step}, fp16 max abs error {err:.2e}); card {a.out / (a.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
