"""Training throughput: medidiff's Trainer against a plain loop written like MONAI's tutorial.

The reference is the loop of MONAI's 2D DDPM tutorial (generative/2d_ddpm): Adam,
``DiffusionInferer`` with a ``DDPMScheduler``, ``torch.randn_like`` noise, MSE on epsilon,
autocast + GradScaler (no-ops on the CPU). medidiff's Trainer does more per step (AdamW,
LR schedule, gradient clipping, EMA update, NaN guard, per-step seeded noise), so a ratio
>= 1.0 means the engine adds no overhead.

Both use the same network (a preset of medidiff.models.unet), batch size and in-memory data;
rounds alternate in ABBA order so drifts in machine load and warm caches hit both. Prints a table and the ratio.

Usage:
    python pipelines/benchmark_training.py                        # CPU, small preset, 64x80
    python pipelines/benchmark_training.py --rounds 4 --steps 5 --threads 2
    python pipelines/benchmark_training.py --device cuda --preset base --size 64 64 --batch 32
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F


def plain_tutorial_loop(model, batches, device, steps: int) -> float:
    """MONAI tutorial-style training; returns seconds for ``steps`` steps."""
    from monai.inferers import DiffusionInferer
    from monai.networks.schedulers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    inferer = DiffusionInferer(scheduler)
    optimizer = torch.optim.Adam(params=model.parameters(), lr=2.5e-5)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    it = iter(batches)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        images = next(it)["image"].to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=use_amp):
            noise = torch.randn_like(images).to(device)
            timesteps = torch.randint(0, inferer.scheduler.num_train_timesteps, (images.shape[0],),
                                      device=images.device).long()
            noise_pred = inferer(inputs=images, diffusion_model=model, noise=noise, timesteps=timesteps)
            loss = F.mse_loss(noise_pred.float(), noise.float())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    _sync(device)
    return time.perf_counter() - t0


def trainer_loop(trainer, steps: int) -> float:
    """medidiff's Trainer steps on its own resumable data path; seconds for ``steps``."""
    batches = trainer._batches(trainer.step)
    _sync(trainer.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches))
    _sync(trainer.device)
    return time.perf_counter() - t0


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cycle(data, batch_size, seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(data), generator=g).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield {"image": torch.stack([data[j] for j in order[i:i + batch_size]])}


def main(argv: list[str] | None = None) -> int:
    from medidiff.config import Config
    from medidiff.runtime.distributed import resolve_device
    from medidiff.models.unet import build_model_from_kwargs, count_parameters
    from medidiff.training.trainer import Trainer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--size", type=int, nargs=2, default=[64, 80], metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="A/B rounds")
    p.add_argument("--steps", type=int, default=4, help="timed steps per round and side")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true", help="AMP in the Trainer (CUDA only)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    data = [torch.rand(1, *args.size) for _ in range(4 * args.batch)]
    cfg = Config.from_dict({
        "model": {"spatial_dims": 2, "preset": args.preset},
        "train": {"batch_size": args.batch, "max_steps": 10**6, "checkpoint_every": 0, "preview_every": 0,
                  "amp": bool(args.amp), "warmup_steps": 10},
    })
    trainer = Trainer(cfg, tempfile.mkdtemp(), dataset=data, device=str(device), progress=False)
    plain_model = build_model_from_kwargs(trainer.model_kwargs).to(device)
    plain_model.load_state_dict(trainer.model.state_dict())
    if device.type == "cuda" and cfg.train.channels_last:
        plain_model = plain_model.to(memory_format=torch.channels_last)
    plain_batches = _cycle(data, args.batch, 0)
    # warm-up both (allocator, oneDNN/cuDNN kernel selection)
    trainer_loop(trainer, 1)
    plain_tutorial_loop(plain_model, plain_batches, device, 1)
    a_times, b_times = [], []
    for r in range(args.rounds):
        # ABBA order so neither side always runs first (warm caches, load drifts)
        if r % 2 == 0:
            a_times.append(trainer_loop(trainer, args.steps) / args.steps)
            b_times.append(plain_tutorial_loop(plain_model, plain_batches, device, args.steps) / args.steps)
        else:
            b_times.append(plain_tutorial_loop(plain_model, plain_batches, device, args.steps) / args.steps)
            a_times.append(trainer_loop(trainer, args.steps) / args.steps)
        print(f"round {r + 1}/{args.rounds}: trainer {a_times[-1]:.3f} s/step, plain {b_times[-1]:.3f} s/step",
              flush=True)
    a, b = statistics.median(a_times), statistics.median(b_times)
    n_params = count_parameters(trainer.model)
    print()
    print(f"device: {device}, threads: {torch.get_num_threads()}, preset {args.preset} "
          f"({n_params / 1e6:.2f} M parameters), input {args.batch}x1x{args.size[0]}x{args.size[1]}, "
          f"{args.rounds} rounds x {args.steps} steps, median")
    print("| loop | s/step | steps/s |")
    print("| --- | --- | --- |")
    print(f"| medidiff Trainer (fused AdamW, clip, EMA, LR schedule) | {a:.3f} | {1 / a:.3f} |")
    print(f"| plain MONAI-tutorial loop (Adam) | {b:.3f} | {1 / b:.3f} |")
    print(f"\nratio (Trainer steps/s over plain steps/s): {b / a:.3f}")
    if device.type == "cuda":
        # forward+backward ~ 3x forward FLOPs; forward FLOPs measured by torch's counter
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.rand(args.batch, 1, *args.size, device=device)
        t = torch.randint(0, 1000, (args.batch,), device=device)
        with FlopCounterMode(display=False) as fc:
            trainer.model(x, timesteps=t).sum().backward()
        print(f"achieved: {fc.get_total_flops() / a / 1e12:.2f} TFLOP/s (Trainer)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
