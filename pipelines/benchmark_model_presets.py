"""Benchmark one training step of medidiff's U-Net presets on this machine.

A step is what the Trainer does per batch: forward eps_theta(x_t, t), MSE against a target
of the same shape, backward, AdamW update. Prints a table of parameter counts and seconds
per step (median and minimum over the timed steps, after one warm-up step). Steps of all
configurations are interleaved, so on a shared machine the minimum is the best estimate
of the uncontended time.

Usage:
    python pipelines/benchmark_model_presets.py                       # 2D small, 64 and 96
    python pipelines/benchmark_model_presets.py --presets tiny small --sizes 64 96 \
        --batch 16 --steps 5 --threads 2 --candidates
    python pipelines/benchmark_model_presets.py --spatial-dims 3 --presets tiny small \
        --sizes 32 --batch 2

``--candidates`` adds the alternative "small" architectures that were weighed when the
preset was chosen, so the choice can be re-checked on other hardware. ``--flash`` also
times each model with PyTorch's scaled_dot_product_attention switched on (medidiff uses it
only on CUDA).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from medidiff.models.unet import build_model, count_parameters

# Alternatives to the 2D "small" preset: name -> build_model overrides.
CANDIDATES_2D: dict[str, dict] = {
    "c64x3-hc32 (MONAI-tutorial-like)": dict(
        channels=(32, 64, 64), attention_levels=(False, False, True), num_head_channels=32
    ),
    "c32-64-96-hc32": dict(
        channels=(32, 64, 96), attention_levels=(False, False, True), num_head_channels=32
    ),
    "c32-64-128": dict(channels=(32, 64, 128), attention_levels=(False, False, True)),
    "c64x3-rb2": dict(num_res_blocks=2),
    "c32-64-128-128": dict(
        channels=(32, 64, 128, 128), attention_levels=(False, False, False, True)
    ),
}


class StepTimer:
    """One model, one input shape, one attention mode: times single training steps.

    Steps of all configurations are interleaved round by round (see ``main``), so load from
    other processes on a shared machine spreads over all of them instead of skewing one.
    """

    def __init__(self, model: torch.nn.Module, shape: tuple[int, ...], flash: bool, device: str):
        self.model, self.flash, self.device = model, flash, device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.x_t = torch.randn(shape, device=device)
        self.target = torch.randn(shape, device=device)
        self.timesteps = torch.randint(0, 1000, (shape[0],), device=device)
        self.times: list[float] = []

    def step(self, record: bool = True) -> None:
        set_flash(self.model, self.flash)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        # eps_theta(x_t, t) against a target of the same shape, as in DDPM training.
        loss = torch.nn.functional.mse_loss(self.model(self.x_t, self.timesteps), self.target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        if record:
            self.times.append(time.perf_counter() - start)


def set_flash(model: torch.nn.Module, on: bool) -> None:
    """Toggle MONAI's attention blocks between dense and scaled_dot_product_attention."""
    for module in model.modules():
        if hasattr(module, "use_flash_attention"):
            module.use_flash_attention = on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spatial-dims", type=int, default=2, choices=(2, 3))
    parser.add_argument("--presets", nargs="*", default=["small"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--candidates", action="store_true")
    parser.add_argument("--flash", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    models: dict[str, dict] = {name: {"preset": name} for name in args.presets}
    if args.candidates and args.spatial_dims == 2:
        models.update({name: {"preset": "small", **kw} for name, kw in CANDIDATES_2D.items()})

    print(
        f"device={args.device} threads={torch.get_num_threads()} batch={args.batch} "
        f"steps={args.steps} torch={torch.__version__}"
    )
    header = (
        f"{'model':34s} {'params':>8s} {'size':>6s} {'attn':>6s} {'median s':>9s} {'min s':>7s}"
    )
    print(header)
    print("-" * len(header))
    timers: list[tuple[str, int, int, StepTimer]] = []
    for name, spec in models.items():
        spec = dict(spec)
        preset = spec.pop("preset")
        model = build_model(args.spatial_dims, preset, **spec).to(args.device)
        for size in args.sizes:
            shape = (args.batch, 1) + (size,) * args.spatial_dims
            for flash in (False, True) if args.flash else (False,):
                timer = StepTimer(model, shape, flash, args.device)
                timers.append((name, count_parameters(model), size, timer))
    for *_, timer in timers:
        timer.step(record=False)  # warm-up: allocator, optimizer state
    for _ in range(args.steps):
        for *_, timer in timers:
            timer.step()
    for name, n_params, size, timer in timers:
        print(
            f"{name:34s} {n_params / 1e6:7.2f}M {size:6d} "
            f"{'sdpa' if timer.flash else 'dense':>6s} "
            f"{statistics.median(timer.times):9.2f} {min(timer.times):7.2f}",
            flush=True,
        )

if __name__ == "__main__":
    main()
