"""Peak memory of one training step of a latent-diffusion config, measured on the CPU, with
an estimate for a CUDA GPU under bf16 autocast.

For each config (with ``--set`` overrides, or one of the GPU presets of
docs/latent_diffusion.md with ``--preset``) this builds the networks the config trains and
runs two training steps (forward, backward, AdamW step, EMA update; the discriminator step
too when ``autoencoder.adversarial_weight > 0``) at fp32 on the CPU, each measurement in a
fresh subprocess whose peak resident memory (``ru_maxrss``) minus its resident memory after
the imports is the figure. For the latent stage it also measures the tiled encoding and
decoding of one ``autoencoder.tile`` window (no gradients), which bounds the memory of
caching the latents and of decoding samples.

The configured input (batch x patch for the autoencoder stage, batch x whole latent for the
latent stage) is usually too large for this machine, so every row is measured at batch 1 on
two reduced inputs of the same aspect (the larger at most ``--probe-voxels`` voxels) and
extrapolated linearly in batch x voxels:

    peak(B, V) = fixed + per_voxel * B * V

``fixed`` is the networks, their gradients, the AdamW moments and the EMA copy (and what
the runtime keeps); ``per_voxel * B * V`` the activations and temporaries of the step. This
holds for convolutions, normalisation and memory-efficient attention, whose memory is
linear in the number of voxels; dense attention is quadratic, so the U-Nets' attention runs
through ``scaled_dot_product_attention`` here, as medidiff switches it on on CUDA.

The CUDA column is an estimate, not a measurement:

    cuda_bf16 = 4 B x (trainable params x 5 [weights, grads, AdamW m and v, EMA]
                       + frozen params + discriminator params x 4)
                + 0.5 x activations (fp32, as measured) + 1 GB (CUDA context, workspaces)

bf16 autocast halves the activations of convolutions and attention, but PyTorch's autocast
runs GroupNorm in fp32, so real activations lie between 0.5x and 1x the fp32 figure; the
presets keep this estimate at or below 70 % of the GPU's memory, and each would still fit
with its activations at 1x.

Examples:
    OMP_NUM_THREADS=1 python pipelines/estimate_memory.py configs/brain_mri_1mm_latent.yaml
    python pipelines/estimate_memory.py configs/ct_autoencoder.yaml --set train.batch_size=2
    python pipelines/estimate_memory.py configs/brain_mri_1mm_autoencoder.yaml --preset 24
    python pipelines/estimate_memory.py --all-presets      # every config x preset (slow)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The autoencoder stage's presets, the same for brain MRI and CT (patches of equal size).
_AUTOENCODER_PRESETS: dict[int, list[str]] = {
    24: ["data.patch_size=[112,112,112]", "train.batch_size=1", "train.amp=true"],
    48: ["data.patch_size=[144,144,144]", "train.batch_size=1", "train.amp=true"],
    80: ["data.patch_size=[160,160,160]", "train.batch_size=1", "train.amp=true"],
}

#: The GPU memory presets of docs/latent_diffusion.md: config file -> GPU GB -> overrides.
#: The config files themselves hold the 48 GB values.
PRESETS: dict[str, dict[int, list[str]]] = {
    "brain_mri_1mm_autoencoder.yaml": _AUTOENCODER_PRESETS,
    "brain_mri_1mm_latent.yaml": {
        24: ["model.channels=[64,128,256,512]", "train.batch_size=8", "autoencoder.tile=[96,96,96]",
             "train.amp=true"],
        48: ["model.channels=[128,256,256,512]", "train.batch_size=8", "autoencoder.tile=[128,128,128]",
             "train.amp=true"],
        80: ["model.channels=[128,256,256,512]", "train.batch_size=16", "autoencoder.tile=[160,160,160]",
             "train.amp=true"],
    },
    "ct_autoencoder.yaml": _AUTOENCODER_PRESETS,
    "ct_latent.yaml": {
        24: ["model.channels=[64,128,256,256]", "train.batch_size=1", "autoencoder.tile=[96,96,96]",
             "train.amp=true"],
        48: ["model.channels=[64,128,256,512]", "train.batch_size=2", "autoencoder.tile=[128,128,128]",
             "train.amp=true"],
        80: ["model.channels=[64,128,256,512]", "train.batch_size=3", "autoencoder.tile=[160,160,160]",
             "train.amp=true"],
    },
}

#: bf16 autocast's share of the fp32 activation memory assumed by the CUDA estimate.
BF16_ACTIVATION_RATIO = 0.5
#: CUDA context, cuDNN workspaces and allocator slack added to the CUDA estimate (GB).
CUDA_OVERHEAD_GB = 1.0
#: Presets keep the CUDA estimate at or below this share of the GPU's memory.
HEADROOM = 0.7
GB = 1024**3


# ----------------------------------------------------------------------------- one measurement
def _worker(spec: dict) -> dict:
    """Run one measurement described by ``spec`` in this (fresh) process; return its record."""
    import torch

    torch.set_num_threads(1)
    from medidiff.models.autoencoder import build_autoencoder

    torch.manual_seed(0)
    # imports done: what follows is the measurement
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    kind = spec["kind"]
    shape = [int(s) for s in spec["shape"]]
    if kind in ("encode", "decode"):
        ae = build_autoencoder(spec["autoencoder"]).eval()
        for p in ae.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            if kind == "encode":
                out = ae.encode(torch.rand(1, 1, *shape))[0]
            else:
                out = ae.decode(torch.randn(1, int(spec["autoencoder"]["latent_channels"]), *shape))
        del out
        params = {"trainable": 0, "frozen": sum(p.numel() for p in ae.parameters()), "discriminator": 0}
    elif kind == "autoencoder":
        params = _autoencoder_steps(spec, shape)
    elif kind == "latent":
        params = _latent_steps(spec, shape)
    else:
        raise ValueError(f"unknown measurement kind {kind!r}")
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_bytes": (peak_kb - base_kb) * 1024, "seconds": time.perf_counter() - t0, **params}


def _adamw(params):
    import torch

    params = list(params)
    try:  # as medidiff's trainer: the fused kernel where this torch build has one
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-4)


def _autoencoder_steps(spec: dict, shape: list[int]) -> dict:
    import torch

    from medidiff.models.autoencoder import build_autoencoder
    from medidiff.training.autoencoder import (
        AutoencoderLossWeights,
        build_discriminator,
        discriminator_loss,
        generator_loss,
    )
    from medidiff.training.ema import EMA

    ae = build_autoencoder(spec["autoencoder"]).train()
    opt = _adamw(ae.parameters())
    ema = EMA(ae, 0.999)
    disc = None
    d_params = 0
    if spec.get("discriminator"):
        d = spec["discriminator"]
        disc = build_discriminator(3, channels=d["channels"], num_layers=d["layers"])
        d_opt = _adamw(disc.parameters())
        d_params = sum(p.numel() for p in disc.parameters())
    weights = AutoencoderLossWeights(kl=1e-6, adversarial=0.01 if disc is not None else 0.0)
    x = torch.rand(1, 1, *shape)
    for step in range(2):  # the second step holds the AdamW moments too
        recon, z_mu, z_sigma = ae(x)
        loss, _ = generator_loss(x, recon, z_mu, z_sigma, weights, step, disc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(ae)
        if disc is not None:
            d_opt.zero_grad(set_to_none=True)
            discriminator_loss(disc, x, recon.detach()).backward()
            d_opt.step()
        del recon, z_mu, z_sigma, loss
    return {"trainable": sum(p.numel() for p in ae.parameters()), "frozen": 0, "discriminator": d_params}


def _latent_steps(spec: dict, shape: list[int]) -> dict:
    import torch
    import torch.nn.functional as F

    from medidiff.models.autoencoder import build_autoencoder
    from medidiff.models.unet import build_model_from_kwargs
    from medidiff.training.ema import EMA

    ae = build_autoencoder(spec["autoencoder"]).eval()  # frozen, on the device while training
    for p in ae.parameters():
        p.requires_grad_(False)
    unet = build_model_from_kwargs(spec["unet"]).train()
    for module in unet.modules():  # memory-efficient attention, as medidiff uses on CUDA
        if hasattr(module, "use_flash_attention"):
            module.use_flash_attention = True
    opt = _adamw(unet.parameters())
    ema = EMA(unet, 0.999)
    channels = int(spec["unet"]["in_channels"])
    x0 = torch.randn(1, channels, *shape)
    for _ in range(2):
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (1,))
        s = (t.float() / 1000).view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise  # the objective does not change the memory
        loss = F.mse_loss(unet(x_t, timesteps=t).float(), (noise - x0).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(unet)
        del loss, x_t
    return {"trainable": sum(p.numel() for p in unet.parameters()),
            "frozen": sum(p.numel() for p in ae.parameters()), "discriminator": 0}


_MEASURED: dict[str, dict] = {}
_CACHE_FILE: list[Path] = []


def _measure(spec: dict, timeout: float) -> dict:
    """One measurement in a fresh subprocess; the same networks and input are measured once
    per run (and once per ``--cache`` file)."""
    key = json.dumps({k: v for k, v in spec.items() if k != "batch"}, sort_keys=True)
    if key not in _MEASURED:
        _MEASURED[key] = _measure_now(spec, timeout)
        if _CACHE_FILE:
            _CACHE_FILE[0].write_text(json.dumps(_MEASURED, indent=1), encoding="utf-8")
    return _MEASURED[key]


def _measure_now(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"measurement {spec['kind']} {spec['shape']} ran past {timeout:.0f} s") from None
    if out.returncode:
        tail = (out.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise RuntimeError(f"measurement {spec['kind']} {spec['shape']} failed: {tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- what a config trains
@dataclass(frozen=True)
class Row:
    """One estimated quantity: a training step or one tile of encoding/decoding."""

    config: str
    preset: str
    stage: str
    input_shape: tuple[int, ...]  # (C, X, Y, Z) per sample
    batch: int
    params: int
    measured_at: tuple[tuple[int, ...], tuple[int, ...]]
    fixed_gb: float
    activations_gb: float  # fp32, at the configured batch and shape
    cpu_fp32_gb: float
    cuda_bf16_gb: float
    state_gb: float
    seconds: float


def _specs(cfg) -> list[dict]:
    """The measurements a config needs: (kind, networks, per-sample shape, batch)."""
    from medidiff.models.autoencoder import autoencoder_kwargs, downsample_factor, latent_shape
    from medidiff.models.unet import model_kwargs, spatial_multiple

    a, m = cfg.autoencoder, cfg.model
    overrides = {k: getattr(a, k) for k in ("channels", "latent_channels", "num_res_blocks", "norm_num_groups")
                 if getattr(a, k) is not None}
    ae = autoencoder_kwargs(m.spatial_dims, a.preset, **overrides)
    f = downsample_factor(ae)
    grid = list(cfg.data.preprocessing.get("shape", (96, 112, 96)))
    out = []
    if cfg.stage == "autoencoder":
        patch = list(cfg.data.patch_size or grid)
        disc = ({"channels": a.discriminator_channels, "layers": a.discriminator_layers}
                if a.adversarial_weight > 0 else None)
        out.append({"kind": "autoencoder", "autoencoder": ae, "discriminator": disc, "shape": patch,
                    "channels": 1, "batch": cfg.train.batch_size, "multiple": f})
    elif cfg.stage == "latent":
        lat = latent_shape(ae, grid)
        unet_over = {k: getattr(m, k) for k in ("channels", "attention_levels", "num_res_blocks",
                                                 "num_head_channels", "norm_num_groups")
                     if getattr(m, k) is not None}
        unet = model_kwargs(m.spatial_dims, m.preset, in_channels=lat[0], out_channels=lat[0], **unet_over)
        mult = spatial_multiple(unet)
        bad = [s for s in lat[1:] if s % mult]
        if bad:
            from medidiff.errors import ConfigError

            raise ConfigError(f"latent grid {lat[1:]} is not divisible by the U-Net's multiple {mult}")
        out.append({"kind": "latent", "autoencoder": ae, "unet": unet, "shape": list(lat[1:]),
                    "channels": lat[0], "batch": cfg.train.batch_size, "multiple": mult})
        if a.tile is not None:
            tile = list(a.tile) * 3 if len(a.tile) == 1 else list(a.tile)
            tile = [min(t, g) // f * f for t, g in zip(tile, grid)]
            out.append({"kind": "encode", "autoencoder": ae, "shape": tile, "channels": 1, "batch": 1,
                        "multiple": f})
            out.append({"kind": "decode", "autoencoder": ae, "shape": [t // f for t in tile],
                        "channels": ae["latent_channels"], "batch": 1, "multiple": 1, "factor": f})
    return out


def _probe_shapes(shape: list[int], multiple: int, max_voxels: int) -> tuple[list[int], list[int]]:
    """Two reduced shapes of ``shape``'s aspect: the larger at most ``max_voxels`` voxels (or
    ``shape`` itself), the smaller about half of it; every axis a multiple of ``multiple``."""
    full = math.prod(shape)

    def scaled(s: float) -> list[int]:
        return [max(multiple, round(x * s / multiple) * multiple) for x in shape]

    big = list(shape) if full <= max_voxels else scaled((max_voxels / full) ** (1 / 3))
    while math.prod(big) > max_voxels and math.prod(big) > multiple**3:
        big = [max(multiple, b - multiple) if b == max(big) else b for b in big]
    small = scaled((math.prod(big) / 2 / full) ** (1 / 3))
    if math.prod(small) >= math.prod(big):
        small = [max(multiple, b - multiple) if b == max(big) else b for b in big]
    return small, big


def estimate(name: str, cfg, *, preset: str = "-", probe_voxels: dict[str, int], timeout: float,
             log=print) -> list[Row]:
    """The rows of one config (each from two subprocess measurements)."""
    rows = []
    for spec in _specs(cfg):
        if spec["kind"] == "decode":  # the latent of an encoder probe
            limit = probe_voxels["encode"] // spec["factor"] ** 3
        else:
            limit = probe_voxels[spec["kind"]]
        small, big = _probe_shapes(spec["shape"], spec["multiple"], limit)
        results = []
        for probe in (small, big):
            log(f"  {name}: {spec['kind']} at 1 x {'x'.join(map(str, probe))} ...")
            results.append(_measure({**spec, "shape": probe}, timeout))
        v1, v2 = math.prod(small), math.prod(big)
        p1, p2 = results[0]["peak_bytes"], results[1]["peak_bytes"]
        per_voxel = max(0.0, (p2 - p1) / (v2 - v1))
        fixed = max(0.0, p2 - per_voxel * v2)
        b, v = spec["batch"], math.prod(spec["shape"])
        act = per_voxel * b * v
        r = results[1]
        ratio = BF16_ACTIVATION_RATIO
        if spec["kind"] in ("encode", "decode"):  # medidiff encodes and decodes at fp32
            state, ratio = 4 * r["frozen"], 1.0
        else:
            state = 4 * (5 * r["trainable"] + r["frozen"] + 4 * r["discriminator"])
        stage = {"autoencoder": "autoencoder train step", "latent": "latent train step",
                 "encode": "encode 1 tile", "decode": "decode 1 tile"}[spec["kind"]]
        rows.append(Row(
            config=name, preset=preset, stage=stage, input_shape=(spec["channels"], *spec["shape"]), batch=b,
            params=r["trainable"] + r["frozen"] + r["discriminator"],
            measured_at=(tuple(small), tuple(big)), fixed_gb=fixed / GB, activations_gb=act / GB,
            cpu_fp32_gb=(fixed + act) / GB,
            cuda_bf16_gb=(state + ratio * act) / GB + CUDA_OVERHEAD_GB,
            state_gb=state / GB, seconds=sum(x["seconds"] for x in results),
        ))
    return rows


def _table(rows: list[Row]) -> str:
    lines = [
        ("| config | preset | stage | input (C x X x Y x Z) | batch | params (M, all networks) | measured at (batch 1) "
         "| peak GB, fp32 CPU (extrapolated) | CUDA bf16 GB (estimate) |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shape = "x".join(map(str, r.input_shape))
        probes = " and ".join("x".join(map(str, p)) for p in r.measured_at)
        lines.append(
            f"| {r.config} | {r.preset} | {r.stage} | {shape} | {r.batch} "
            f"| {r.params / 1e6:.1f} | {probes} | {r.cpu_fp32_gb:.1f} | {r.cuda_bf16_gb:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="estimate_memory.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("configs", nargs="*", help="YAML configs (stage autoencoder or latent)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), as for medidiff train")
    p.add_argument("--preset", type=int, choices=sorted({g for d in PRESETS.values() for g in d}),
                   help="apply the GPU memory preset (GB) of docs/latent_diffusion.md before --set")
    p.add_argument("--all-presets", action="store_true",
                   help="every config of the presets table at every preset (configs/ of this checkout)")
    p.add_argument("--probe-voxels", type=int, default=65_536,
                   help="largest input measured for a training step, in voxels per sample "
                        "(default 65536, e.g. 40 x 40 x 40; an encoder tile: 4x that)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per measurement (default 300)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--cache", help="JSON file of measurements to reuse and extend (same machine only)")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        print(json.dumps(_worker(json.loads(args._worker))))
        return 0

    from medidiff.config import Config
    from medidiff.errors import MedidiffError

    if args.cache:
        _CACHE_FILE.append(Path(args.cache))
        if _CACHE_FILE[0].exists():
            _MEASURED.update(json.loads(_CACHE_FILE[0].read_text(encoding="utf-8")))

    jobs: list[tuple[str, Path, list[str], str]] = []
    if args.all_presets:
        for fname, presets in PRESETS.items():
            for gb, over in presets.items():
                jobs.append((fname, ROOT / "configs" / fname, over + args.overrides, f"{gb} GB"))
    for path in args.configs:
        path = Path(path)
        over = list(args.overrides)
        label = "custom" if over else "as in file"
        if args.preset is not None:
            if path.name not in PRESETS:
                p.error(f"--preset: no presets for {path.name}; known: {', '.join(PRESETS)}")
            over = PRESETS[path.name][args.preset] + over
            label = f"{args.preset} GB" + (" + --set" if args.overrides else "")
        jobs.append((path.name, path, over, label))
    if not jobs:
        p.error("give one or more configs, or --all-presets")

    probe = {"autoencoder": args.probe_voxels, "latent": args.probe_voxels,
             "encode": 4 * args.probe_voxels}
    rows: list[Row] = []
    status = 0
    for name, path, over, label in jobs:
        try:
            cfg = Config.from_yaml(path, over)
            rows.extend(estimate(name, cfg, preset=label, probe_voxels=probe, timeout=args.timeout,
                                 log=lambda m: print(m, file=sys.stderr, flush=True)))
        except (MedidiffError, RuntimeError) as exc:
            print(f"{name} ({label}): {exc}", file=sys.stderr)
            status = 1
    print(f"Peak memory of one training step (forward, backward, AdamW, EMA), per config. Each row is "
          f"measured on the CPU at fp32, batch 1, on two reduced inputs ('measured at'), one fresh "
          f"process each (OMP_NUM_THREADS=1, ru_maxrss minus the memory after imports), and "
          f"extrapolated linearly in batch x voxels to the configured input. The CUDA column is an "
          f"estimate, not a measurement: 4 B x (5 x trainable + frozen + 4 x discriminator params) "
          f"+ {BF16_ACTIVATION_RATIO} x the fp32 activations + {CUDA_OVERHEAD_GB:.0f} GB; autocast "
          f"keeps GroupNorm in fp32, so keep it at or below {HEADROOM:.0%} of the GPU's memory.\n")
    print(_table(rows))
    checked = [r for r in rows if r.preset.endswith(" GB")]
    over = [r for r in checked if r.cuda_bf16_gb > HEADROOM * float(r.preset.split()[0])]
    for r in over:
        print(f"\n{r.config} at {r.preset}: the {r.stage} estimate {r.cuda_bf16_gb:.1f} GB is above "
              f"{HEADROOM:.0%} of {r.preset}")
    if checked and not over:
        print(f"\nEvery preset's estimate is within {HEADROOM:.0%} of its GPU's memory.")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=2), encoding="utf-8")
    return status


if __name__ == "__main__":
    sys.exit(main())
