#!/usr/bin/env python
"""Export a training run as a default model shipped inside the package.

Reads ``RUN/model.safetensors`` (EMA weights, written by ``medidiff train``), stores it as
fp16 in ``medidiff/weights/<name>.safetensors`` (same network and metadata: config,
preprocessing, training step, and for a latent model both stages and the latent record),
checks that fp16 changes the network's output by a negligible amount (a latent model: the
U-Net on a random latent and the decoder's image of a random latent), and writes the model
card: ``<name>.json`` (facts), ``<name>_loss.png`` (loss curve from ``RUN/metrics.csv``),
``<name>_samples.png`` (``--samples`` samples with the model's default sampler and steps,
fixed seeds 0.., each as its middle axial, coronal and sagittal slice) and ``<name>.md``.

A latent model (``stage: latent``) holds its autoencoder; ``--autoencoder-run`` names the
autoencoder's training run, whose ``model.safetensors`` must be the one the latent model
was trained on (same sha256), so the card gives the autoencoder's steps, wall time and loss
and the total wall time of both stages. Metrics measured elsewhere (the anomaly benchmark,
the demo, the synthesis benchmark) enter the card with ``--metrics FILE.json``: a JSON
object ``{"title": ..., "command": ..., "date": ..., "machine": ..., "table": markdown or
"rows": {...}}`` stored verbatim under ``metrics``. ``--card-only`` rewrites the card of the
shipped file (name and description from :data:`medidiff.models.pretrained.MODELS`, metrics,
note, samples) without touching its weights. ``--add-input-profile`` measures the profile
of the model's training scans (:mod:`medidiff.data.profile`; the datalist and split of the
file's own config, resolved against ``configs/``) and writes it into the shipped file's
metadata: only the header changes, every tensor byte stays as it was (checked with
:func:`medidiff.models.checkpoint.tensors_sha256`), and the card gets the new file sha256.
An export from a run made before profiles were recorded adds one the same way.

Usage (what made the shipped models):

    python pipelines/export_default_models.py --run runs/brain_mri_2d --name brain_mri_2d \\
        --config configs/brain_mri_2d.yaml --machine "2-core x86_64 CPU (AVX2), 1 thread"
    python pipelines/export_default_models.py --run runs/brain_mri_3d_latent --name brain_mri_3d \\
        --config configs/brain_mri_3d_latent.yaml --autoencoder-run runs/brain_mri_3d_autoencoder \\
        --machine "..."
    python pipelines/export_default_models.py --name brain_mri_3d_5mm --card-only   # after a rename
    python pipelines/export_default_models.py --name brain_mri_2d --add-input-profile
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

MAX_BYTES = 20 * 1024 * 1024  # the issue's limit for a shipped model


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


def fp16_errors(fp32_path: Path, fp16_path: Path) -> dict[str, float]:
    """Largest |out_fp16 - out_fp32| of the networks on fixed random inputs (float32 compute).

    ``"network"``: the diffusion U-Net on ``(2, C, *input_shape)`` noise at t = 100 and 600
    (a latent model's U-Net at the latent shape and channels; a 2D model's on a slice; a 3D
    pixel model's on its training input). A latent model adds ``"decoder"``: the decoded
    image of one random scaled latent (what synthesis writes, before clipping).
    """
    import torch

    from medidiff.models.loaded import load_model

    a, b = load_model(fp32_path), load_model(fp16_path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, a.channels, *a.input_shape), generator=g)
    t = torch.tensor([100, 600])
    errors = {}
    with torch.no_grad():
        extra = {}
        if getattr(a.model, "num_class_embeds", None):
            extra["class_labels"] = torch.tensor([a.model.num_class_embeds - 1] * 2)
        errors["network"] = float((a.model.eval()(x, t, **extra) - b.model.eval()(x, t, **extra)).abs().max())
        if a.is_latent:
            z = torch.randn((1, *a.autoencoder.latent_shape(a.image_shape)), generator=g)
            errors["decoder"] = float((a.autoencoder.decode(z) - b.autoencoder.decode(z)).abs().max())
    return errors


def fp16_error(fp32_path: Path, fp16_path: Path) -> float:
    """The largest of :func:`fp16_errors`."""
    return max(fp16_errors(fp32_path, fp16_path).values())


def samples_png(weights: Path, out: Path, num: int, *, seed: int = 0) -> dict:
    """``num`` samples of the model with its default sampler and steps, seeds ``seed + i``,
    drawn as one PNG: a row per sample with its middle axial, coronal and sagittal slices
    (3D), or a row of slices (2D), on the model's [0, 1] scale.

    Returns:
        The card's record: file name, number, sampler, steps, seeds, seconds per sample.
    """
    import time

    import numpy as np

    from medidiff.io.images import display_view, new_figure, save_figure
    from medidiff.synthesis.synthesizer import Synthesizer

    synth = Synthesizer(weights, device="cpu", sampler=None, steps=None, batch_size=1)
    began = time.perf_counter()
    arrays = [s.array for s in synth.generate(range(num), seed=seed)]
    seconds = (time.perf_counter() - began) / max(1, num)
    sx, sy, sz = (float(v) for v in synth.preprocessing.spacing)
    if synth.spatial_dims == 3:
        views = [("axial", lambda v: v[:, :, v.shape[2] // 2], sy / sx),
                 ("coronal", lambda v: v[:, v.shape[1] // 2, :], sz / sx),
                 ("sagittal", lambda v: v[v.shape[0] // 2, :, :], sz / sy)]
        fig, axes = new_figure(num, 3, (6.0, 2.2 * num + 0.4))
        for i, volume in enumerate(arrays):
            for j, (title, cut, aspect) in enumerate(views):
                ax = axes[i, j]
                ax.imshow(display_view(cut(volume)), cmap="gray", vmin=0.0, vmax=1.0,
                          interpolation="nearest", aspect=aspect)
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(title, fontsize=9)
                if j == 0:
                    ax.set_ylabel(f"seed {seed + i}", fontsize=8)
    else:
        fig, axes = new_figure(1, num, (1.8 * num, 2.4))
        for i, image in enumerate(arrays):
            ax = axes[0, i]
            ax.imshow(display_view(np.asarray(image)), cmap="gray", vmin=0.0, vmax=1.0,
                      interpolation="nearest", aspect=sy / sx)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"seed {seed + i}", fontsize=8)
    fig.suptitle(f"{synth.kind} samples, {synth.sampler} {synth.steps} steps", fontsize=9)
    save_figure(fig, out, dpi=100)
    return {"file": out.name, "num": num, "sampler": synth.sampler, "steps": synth.steps,
            "seeds": [seed + i for i in range(num)], "seconds_per_sample": round(seconds, 2),
            "kind": synth.kind}


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

    latent = m.get("anomaly_3d") or {}
    labels = {"default": "default method", "baseline": "intensity baseline"}
    if latent.get("ran"):  # the demo's 3D model is a latent model: its scoring beside the 2D
        ev = {**ev, "latent_3d": latent["evaluation"]}
        labels = {"default": "2D default method", "latent_3d": "3D latent method",
                  "baseline": "intensity baseline"}
    n = len(m.get("data", {}).get("test_scans", [])) or 16
    rows = ["| scans | method | voxel AUROC | voxel AUPRC | Dice @ 5 % FPR (dataset-wise) | oracle Dice | scan AUROC |",
            "|---|---|---|---|---|---|---|"]
    for group in ["overall", "tumor", "ms", "stroke"]:
        for who, label in labels.items():
            g = ev[who]["overall"] if group == "overall" else ev[who]["groups"].get(group)
            if not g:
                continue
            oracle = g.get("oracle_dice_dataset_wise", g.get("oracle_dice"))
            rows.append(f"| {f'all {n}' if group == 'overall' else group} | {label} | "
                        f"{f(g['voxel_auroc'])} | {f(g['voxel_auprc'])} | {f(g['dice_dataset_wise'])} | "
                        f"{f(oracle)} | {f(g.get('scan_auroc'))} |")
    meth = m["method"]
    notes = ""
    if latent.get("ran"):
        lm, cost = latent["method"], latent.get("cost", {})
        per = {k: (v or {}) for k, v in cost.items()}
        notes = (f" The 3D latent method: {lm.get('method')} (t = {lm.get('t_start')}, {lm.get('steps')} "
                 f"{lm.get('sampler')} steps) of the 3D model, calibrated the same way; per volume "
                 f"{f(per.get('latent_3d', {}).get('nfe_per_volume'))} network evaluations and "
                 f"{f(per.get('latent_3d', {}).get('seconds_per_volume'))} s, against "
                 f"{f(per.get('default_2d', {}).get('nfe_per_volume'))} and "
                 f"{f(per.get('default_2d', {}).get('seconds_per_volume'))} s for the 2D default.")
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
                  "scans (benchmarks/RESULTS.md)." + notes),
    }


def _hours(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 3600:.2f} h"


def _wall_time_row(facts: dict) -> str:
    """The card's wall-time cell: both stages of a latent model, their sum first."""
    machine = facts["machine"]
    ae = facts.get("autoencoder")
    if not ae:
        return f"{_hours(facts['wall_time_s'])} on {machine}"
    diffusion = facts.get("diffusion_wall_time_s", facts["wall_time_s"])
    if ae.get("wall_time_s") is None:
        return (f"{_hours(diffusion)} for the diffusion stage on {machine}; the autoencoder "
                "stage's time is not recorded (export with --autoencoder-run)")
    return (f"{_hours(facts['wall_time_s'])} in all on {machine}: autoencoder "
            f"{_hours(ae['wall_time_s'])} + diffusion {_hours(diffusion)}")


def _autoencoder_row(ae: dict) -> str:
    shape = " x ".join(str(v) for v in ae["latent_shape"])
    network = "VQVAE (vector-quantised)" if ae.get("kind") == "vq" else "AutoencoderKL"
    text = (f"MONAI {network}, preset '{ae['preset']}', channels {tuple(ae['channels'])}, "
            f"{ae['latent_channels']} latent channels, {ae['factor']}x per axis ({shape} latent), "
            f"latent scale factor {ae['scale_factor']:.4g}, {ae['parameters'] / 1e6:.2f} M "
            f"parameters; trained {ae['steps']} steps")
    if ae.get("batch_size"):
        text += f", batch {ae['batch_size']}, lr {ae['lr']:g}"
    if ae.get("final_loss") is not None:
        text += f", final loss {ae['final_loss']:.4f}"
    if ae.get("config"):
        text += f", config `{ae['config']}`"
    return text + "; frozen while the diffusion stage trained on its latents"


def _retrain_lines(facts: dict) -> list[str]:
    n, config = facts["name"], facts["config"]
    run = facts.get("run") or f"runs/{n}"
    ae = facts.get("autoencoder")
    if not ae:
        tuned = facts.get("anomaly_postprocess") or {}
        post = (" --anomaly-postprocess " + " ".join(f"{k}={v}" for k, v in sorted(tuned.items()))
                if tuned else "")
        return [f"medidiff train --config {config} --out {run}",
                f"python pipelines/export_default_models.py --run {run} --name {n} --config {config}{post}"]
    ae_run = ae.get("run") or "runs/AUTOENCODER_RUN"
    return [f"medidiff train --config {ae.get('config') or 'AUTOENCODER_CONFIG'} --out {ae_run}",
            f"medidiff train --config {config} --out {run}   # autoencoder.checkpoint: {ae_run}/model.safetensors",
            f"python pipelines/export_default_models.py --run {run} --name {n} --config {config} "
            f"--autoencoder-run {ae_run}"]


def _samples_lines(facts: dict) -> list[str]:
    s = facts.get("samples")
    if not s:
        return []
    seeds = s["seeds"]
    views = ("middle axial, coronal and sagittal slice of each volume" if s.get("kind") == "3d-volume"
             else "one axial slice each")
    return [f"![samples]({s['file']})", "",
            f"{s['num']} samples (seeds {seeds[0]}..{seeds[-1]}), {s['sampler']} {s['steps']} steps "
            f"(the model's default), {views}, on the model's [0, 1] scale; "
            f"{s['seconds_per_sample']:.1f} s per sample on the exporting machine's CPU.", ""]


def card_markdown(facts: dict) -> str:
    n = facts["name"]
    fp16 = facts.get("fp16_errors") or {"network": facts["fp16_max_abs_error"]}
    fp16_text = f"max abs change of the network output {fp16['network']:.2e} on a random input"
    if "decoder" in fp16:
        fp16_text = (f"max abs change of the U-Net output {fp16['network']:.2e} on a random latent, "
                     f"of the decoded image {fp16['decoder']:.2e} on a random latent")
    ae = facts.get("autoencoder")
    lines = [
        f"# Model card: {n}",
        "",
        facts["description"] + ".",
        "",
        "| | |",
        "|---|---|",
        f"| file | `medidiff/weights/{n}.safetensors` ({facts['size_bytes'] / 1e6:.1f} MB, fp16; sha256 `{facts['sha256'][:16]}...`) |",
        f"| network | {facts['network']} ({facts['parameters'] / 1e6:.2f} M parameters{' in both stages' if ae else ''}) |",
        *([f"| autoencoder | {_autoencoder_row(ae)} |"] if ae else []),
        f"| data | {facts['data']} |",
        f"| preprocessing | {facts['preprocessing']} |",
        *([f"| input profile | {facts['input_profile']} |"] if facts.get("input_profile") else []),
        f"| diffusion | {facts['diffusion']} |",
        f"| training | {facts['steps']} steps{' (diffusion stage)' if ae else ''}, batch {facts['batch_size']}, lr {facts['lr']:g} (warm-up + cosine), EMA {facts['ema_decay']} |",
        f"| wall time | {_wall_time_row(facts)} |",
        f"| final loss | {facts['final_loss']:.4f} (mean of the last 10 logged values) |",
        f"| fp16 export | {fp16_text} |",
        f"| trained | {facts['trained_on']}, config `{facts['config']}` |",
        *([f"| note | {facts['note']} |"] if facts.get("note") else []),
        "",
        f"![loss curve]({n}_loss.png)",
        "",
        *_samples_lines(facts),
        "Retrain and re-export:",
        "",
        "```",
        *_retrain_lines(facts),
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
        "deformations and intensity changes (see sample_data/README.md and "
        "pipelines/make_sample_data.py). It has seen no real patient anatomy, scanner or "
        "contrast variation; use it to learn the tool and as a starting point, and train on your "
        "own data for research results (docs/own_data.md).",
        "",
    ]
    return "\n".join(lines)


def card_metrics(a: argparse.Namespace) -> list[dict]:
    """The card's metrics sections: each ``--metrics`` JSON, then the demo's results."""
    return [json.loads(p.read_text(encoding="utf-8")) for p in a.metrics] + (
        [demo_card_metrics(a.demo_metrics)] if a.demo_metrics else [])


def rewrite_card(a: argparse.Namespace) -> int:
    """``--card-only``: name, description, metrics, note and samples of the existing card
    rewritten; weights untouched."""
    from medidiff.models.checkpoint import file_sha256
    from medidiff.io import write_json_atomic, write_text_atomic
    from medidiff.models.pretrained import MODELS

    facts_path = a.out / f"{a.name}.json"
    if not facts_path.is_file():
        raise SystemExit(f"{facts_path}: no card facts to rewrite; export {a.name} without --card-only")
    facts = json.loads(facts_path.read_text(encoding="utf-8"))
    weights = a.out / f"{a.name}.safetensors"
    if file_sha256(weights) != facts.get("sha256"):
        raise SystemExit(f"{weights} is not the file its card describes (sha256 differs); "
                         "export it again without --card-only")
    facts.setdefault("run", f"runs/{facts.get('name', a.name)}")  # a renamed model keeps its run
    facts["name"], facts["description"] = a.name, MODELS[a.name]
    from medidiff.anomaly.postprocess import TUNED_POSTPROCESS_KEY
    from medidiff.models.checkpoint import checkpoint_extra

    tuned = checkpoint_extra(weights).get(TUNED_POSTPROCESS_KEY)
    if tuned:  # stored in the file at export: the retrain command repeats it
        facts["anomaly_postprocess"] = tuned
    if a.metrics or a.demo_metrics:
        facts["metrics"] = card_metrics(a)
    if a.note:
        facts["note"] = a.note
    if a.samples > 0:
        facts["samples"] = samples_png(weights, a.out / f"{a.name}_samples.png", a.samples)
    write_json_atomic(facts_path, facts)
    write_text_atomic(a.out / f"{a.name}.md", card_markdown(facts))
    print(f"card {a.out / (a.name + '.md')} rewritten; weights unchanged (sha256 {facts['sha256'][:12]})")
    return 0


def training_profile(ckpt: object) -> dict:
    """The input profile of a checkpoint's training scans: its config's datalist (relative
    to ``configs/``, as the configs write it) and split, measured with its preprocessing."""
    from medidiff.data.datalist import load_datalist
    from medidiff.data.preprocessing import Preprocessing
    from medidiff.data.profile import profile_entries

    data = ckpt.config.get("data") or {}
    datalist = Path(str(data.get("datalist", "")))
    if not datalist.is_absolute():
        datalist = ROOT / "configs" / datalist
    entries = load_datalist(str(datalist), split=data.get("split"))
    profile = profile_entries(entries, Preprocessing.from_dict(ckpt.preprocessing))
    if profile is None:
        raise SystemExit(f"{datalist}: no training scan could be read for the input profile")
    return profile.to_dict()


def profile_summary(profile: dict) -> str:
    """The card's line on the input profile."""
    f = profile["features"]

    def r(key: str, fmt: str) -> str:
        lo, _, hi = f[key]
        return f"{format(lo, fmt)}-{format(hi, fmt)}"

    return (f"measured on {profile['num_scans']} training scans ({profile['modality']}): foreground "
            f"{r('foreground_ml', '.0f')} ml, extent {r('extent_x_mm', '.0f')} x {r('extent_y_mm', '.0f')} x "
            f"{r('extent_z_mm', '.0f')} mm, background {r('background_fraction', '.2f')} of the volume, "
            f"median normalised intensity {r('intensity_p50', '.2f')}, voxels <= "
            f"{f['coarsest_voxel_mm'][2]:g} mm; 'anomaly' and 'calibrate' warn when an input is out "
            "of it (--strict refuses)")


def add_input_profile(a: argparse.Namespace) -> int:
    """``--add-input-profile``: the shipped file gets its training scans' input profile;
    weights bit-identical, the card's sha256 and size updated."""
    from medidiff.io import write_json_atomic, write_text_atomic
    from medidiff.models.checkpoint import file_sha256, load_inference, replace_extra, tensors_sha256

    weights = a.out / f"{a.name}.safetensors"
    facts_path = a.out / f"{a.name}.json"
    facts = json.loads(facts_path.read_text(encoding="utf-8")) if facts_path.is_file() else None
    if facts is not None and file_sha256(weights) != facts.get("sha256"):
        raise SystemExit(f"{weights} is not the file its card describes (sha256 differs)")
    ckpt = load_inference(weights)
    before = tensors_sha256(weights)
    profile = training_profile(ckpt)
    replace_extra(weights, {**ckpt.extra, "input_profile": profile})
    if tensors_sha256(weights) != before:  # pragma: no cover - replace_extra copies the bytes
        raise SystemExit(f"{weights}: the tensors changed while adding the profile")
    if facts is not None:
        facts.update(sha256=file_sha256(weights), size_bytes=weights.stat().st_size,
                     tensors_sha256=before, input_profile=profile_summary(profile))
        write_json_atomic(facts_path, facts)
        write_text_atomic(a.out / f"{a.name}.md", card_markdown(facts))
    print(f"{weights}: input profile of {profile['num_scans']} training scans added; tensors "
          f"unchanged (tensors sha256 {before[:12]}), file sha256 now {file_sha256(weights)[:12]}")
    return 0


def _shown(path: Path) -> str:
    """A path as the card shows it: relative to the repository when inside it."""
    try:
        return Path(path).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def _final_loss(rows: list[dict[str, float]]) -> float:
    last = [r["loss"] for r in rows[-10:] if "loss" in r]
    return sum(last) / max(1, len(last))


def _run_rows(run: Path, step: int | None) -> tuple[list[dict[str, float]], int]:
    """The run's metrics.csv rows up to ``step`` (the exported weights' step) and that step."""
    rows = read_metrics(run / "metrics.csv")
    step = int(step if step is not None else (rows[-1]["step"] if rows else 0))
    return [r for r in rows if r["step"] <= step], step


def diffusion_text(cfg: object) -> str:
    """The diffusion process in one line (a rectified-flow model has no beta schedule)."""
    d = cfg.diffusion
    if d.prediction_type == "flow":
        return (f"rectified flow (Liu et al. 2023): flow prediction (the velocity x_0 - eps on the "
                f"straight path x_s = (1 - s) x_0 + s eps), {d.noise} noise, T = "
                f"{d.num_train_timesteps}, {d.flow_time_sampling} training times; sampled with euler")
    return (f"{d.num_train_timesteps} steps, {d.schedule} ({d.beta_start:g} .. {d.beta_end:g}), "
            f"{d.prediction_type} prediction, {d.noise} noise")


def autoencoder_facts(ckpt: object, ae_run: Path | None, ae_config: str | None) -> dict:
    """The autoencoder stage of a latent checkpoint: architecture and latent record from the
    file; steps, wall time, loss, batch and lr from its training run when given.

    Raises:
        SystemExit: the run's ``model.safetensors`` is not the autoencoder the file holds.
    """
    from medidiff.models.autoencoder import (
        AUTOENCODER_PRESETS,
        VQ_AUTOENCODER_PRESETS,
        downsample_factor,
        latent_channels,
    )
    from medidiff.models.checkpoint import load_inference

    kw = ckpt.model_kwargs["autoencoder"]
    kind = str(ckpt.model_kwargs.get("autoencoder_kind", "kl"))
    latent = ckpt.extra.get("latent") or {}
    record = latent.get("autoencoder") or {}
    presets = VQ_AUTOENCODER_PRESETS if kind == "vq" else AUTOENCODER_PRESETS
    preset = next((name for name, p in presets.items()
                   if list(p.channels) == list(kw["channels"]) and
                   all(kw.get(k) == v for k, v in vars(p).items() if k != "channels")), "custom")
    facts = {
        "kind": kind, "preset": preset, "channels": list(kw["channels"]),
        "latent_channels": latent_channels(kw),
        "factor": int(latent.get("factor", downsample_factor(kw))),
        "latent_shape": list(latent.get("latent_shape", [])), "scale_factor": float(latent["scale_factor"]),
        "parameters": int(sum(v.numel() for k, v in ckpt.state_dict.items() if k.startswith("autoencoder."))),
        "steps": record.get("step"), "sha256": record.get("sha256"),
        "wall_time_s": None, "final_loss": None, "config": ae_config, "run": None,
    }
    if ae_run is None:
        return facts
    ae = load_inference(ae_run / "model.safetensors")
    if record.get("sha256") and ae.sha256 != record["sha256"]:
        raise SystemExit(f"--autoencoder-run {ae_run}: its model.safetensors (sha256 {ae.sha256[:12]}) is not "
                         f"the autoencoder this latent model was trained on (sha256 {record['sha256'][:12]})")
    rows, step = _run_rows(ae_run, ae.extra.get("step"))
    cfg = ae.config
    if ae_config is None and cfg.get("name") and (ROOT / "configs" / f"{cfg['name']}.yaml").is_file():
        ae_config = f"configs/{cfg['name']}.yaml"
    facts.update({
        "preset": (cfg.get("autoencoder") or {}).get("preset", preset), "steps": step,
        "wall_time_s": round(wall_time(rows), 1), "final_loss": _final_loss(rows),
        "batch_size": (cfg.get("train") or {}).get("batch_size"), "lr": (cfg.get("train") or {}).get("lr"),
        "config": ae_config, "run": _shown(ae_run),
    })
    return facts


def main(argv: list[str] | None = None) -> int:
    from medidiff.models.pretrained import MODELS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=None, help="training run folder (not with --card-only)")
    p.add_argument("--name", required=True, choices=sorted(MODELS))
    p.add_argument("--config", default=None, help="the config file the run used (recorded)")
    p.add_argument("--autoencoder-run", type=Path, default=None,
                   help="a latent model's autoencoder training run: its steps, wall time and loss "
                   "go into the card (its model.safetensors must be the one the model holds)")
    p.add_argument("--autoencoder-config", default=None,
                   help="the autoencoder run's config file (default: configs/<its name>.yaml when present)")
    p.add_argument("--machine", default=None, help="where it trained (default: this machine, described)")
    p.add_argument("--metrics", type=Path, action="append", default=[],
                   help="JSON results to put in the card (repeatable)")
    p.add_argument("--demo-metrics", type=Path, default=None,
                   help="a `medidiff demo` metrics.json: its anomaly results go into the card")
    p.add_argument("--note", default="", help="a sentence on how the run went (stopped early, resumed, ...)")
    p.add_argument("--anomaly-postprocess", nargs="+", default=None, metavar="KEY=N",
                   help="filter sizes tuned for this model on validation scans (median_size=N, "
                   "erode=N), stored in the file as the defaults of anomaly scoring")
    p.add_argument("--samples", type=int, default=4,
                   help="samples in <name>_samples.png (seeds 0.., the model's default sampler and "
                   "steps; 0: none)")
    p.add_argument("--out", type=Path, default=ROOT / "medidiff" / "weights")
    p.add_argument("--add-input-profile", action="store_true",
                   help="add the input profile of the model's training scans to the shipped "
                   "file's metadata (weights bit-identical) and update its card")
    p.add_argument("--card-only", action="store_true",
                   help="keep the shipped weights (and their sha256, which thresholds are tied "
                   "to); rewrite only the card: name and description, metrics (--metrics/"
                   "--demo-metrics), note and samples")
    a = p.parse_args(argv)
    if a.samples < 0:
        p.error("--samples must be >= 0")
    if a.card_only:
        return rewrite_card(a)
    if a.add_input_profile:
        return add_input_profile(a)
    if a.run is None or a.config is None:
        p.error("--run and --config are required (unless --card-only)")

    import torch

    from medidiff.models.checkpoint import file_sha256, load_inference, save_inference, tensors_sha256
    from medidiff.config import Config
    from medidiff.io import write_json_atomic, write_text_atomic

    src = a.run / "model.safetensors"
    ckpt = load_inference(src)
    latent = ckpt.network == "latent_diffusion"
    if a.autoencoder_run is not None and not latent:
        raise SystemExit(f"--autoencoder-run: {src} is a {ckpt.network} model, not a latent model")
    cfg = Config.from_dict(ckpt.config)
    a.out.mkdir(parents=True, exist_ok=True)
    dst = a.out / f"{a.name}.safetensors"
    extra = dict(ckpt.extra)
    if not extra.get("input_profile"):  # a run from before profiles were recorded
        extra["input_profile"] = training_profile(ckpt)
    if a.anomaly_postprocess:
        from medidiff.anomaly.postprocess import TUNED_POSTPROCESS_KEY, tuned_postprocess

        pairs = dict(item.split("=", 1) for item in a.anomaly_postprocess if "=" in item)
        try:
            tuned = {k: int(v) for k, v in pairs.items()}
            extra[TUNED_POSTPROCESS_KEY] = tuned
            tuned_postprocess(extra)
        except Exception as exc:  # noqa: BLE001 - one line for any bad value
            raise SystemExit(f"--anomaly-postprocess: {exc}") from None
    save_inference(dst, ckpt.state_dict, model_kwargs=ckpt.model_kwargs, config=ckpt.config,
                   preprocessing=ckpt.preprocessing, extra=extra, half=True,
                   network=ckpt.network)
    size = dst.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{dst}: {size / 1e6:.1f} MB exceeds the 20 MB limit for a shipped model")
    errors = fp16_errors(src, dst)

    rows, step = _run_rows(a.run, ckpt.extra.get("step"))
    prep = ckpt.preprocessing
    t, m = cfg.train, cfg.model
    kw = ckpt.model_kwargs["unet"] if latent else ckpt.model_kwargs
    params = sum(v.numel() for v in ckpt.state_dict.values())
    machine = a.machine or (
        f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, {platform.system()}"
    )
    network = (
        f"MONAI DiffusionModelUNet {kw['spatial_dims']}D, preset '{m.preset}', channels "
        f"{tuple(kw['channels'])}, attention {tuple(kw['attention_levels'])}"
    )
    ae = autoencoder_facts(ckpt, a.autoencoder_run, a.autoencoder_config) if latent else None
    diffusion_wall = round(wall_time(rows), 1)
    if ae:
        shape = " x ".join(str(v) for v in ae["latent_shape"])
        network = f"latent diffusion: {network}, on {shape} latents of the autoencoder below"
    facts = {
        "name": a.name,
        "description": MODELS[a.name],
        "config": a.config,
        "run": _shown(a.run),
        "stage": "latent" if latent else "pixel",
        "data": f"sample_data '{cfg.data.split}' split (24 healthy T1 volumes, 2 mm)",
        "preprocessing": (
            f"{prep.get('modality')} resampled to {' x '.join(f'{s:g}' for s in prep['spacing'])} mm, "
            f"RAS grid {' x '.join(str(s) for s in prep['shape'])}, intensities to [0, 1] by the "
            f"{prep.get('lower_percentile', 1):g}-{prep.get('upper_percentile', 99):g} percentiles"
        ),
        "network": network,
        "diffusion": diffusion_text(cfg),
        "prediction_type": cfg.diffusion.prediction_type,
        **({"anomaly_postprocess": extra["anomaly_postprocess"]} if extra.get("anomaly_postprocess") else {}),
        "parameters": int(params),
        "steps": step,
        "batch_size": t.batch_size,
        "lr": t.lr,
        "ema_decay": t.ema_decay,
        # a latent model: both stages (the autoencoder's when its run is given)
        "wall_time_s": round(diffusion_wall + ((ae or {}).get("wall_time_s") or 0.0), 1),
        "machine": machine,
        "final_loss": _final_loss(rows),
        "fp16_max_abs_error": max(errors.values()),
        "fp16_errors": errors,
        "trained_on": _dt.date.today().isoformat(),
        "sha256": file_sha256(dst),
        "size_bytes": size,
        "tensors_sha256": tensors_sha256(dst),
        "input_profile": profile_summary(extra["input_profile"]),
        "metrics": card_metrics(a),
        "note": a.note,
    }
    if ae:
        facts["autoencoder"] = ae
        facts["diffusion_wall_time_s"] = diffusion_wall
    loss_curve_png(a.run / "metrics.csv", a.out / f"{a.name}_loss.png")
    if a.samples > 0:
        facts["samples"] = samples_png(dst, a.out / f"{a.name}_samples.png", a.samples)
    write_json_atomic(a.out / f"{a.name}.json", facts)
    write_text_atomic(a.out / f"{a.name}.md", card_markdown(facts))
    print(f"{dst} ({size / 1e6:.2f} MB, step {step}, fp16 max abs error {facts['fp16_max_abs_error']:.2e}); "
          f"card {a.out / (a.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
