"""Rectified flow: a straight-path objective and its Euler sampler (few-step generation).

Rectified flow (Liu et al. 2023, https://arxiv.org/abs/2209.03003; as used by Esser et al.
2024 for SD3, https://arxiv.org/abs/2403.03206, by MAISI-v2 for CT and by REFLECT for
one-step anomaly reconstruction) joins data and noise by a straight line

    x_s = (1 - s) x_0 + s eps,        s in [0, 1],  eps ~ N(0, I)

and trains the network to predict the constant velocity along it, pointing to the data:

    u = x_0 - eps,        loss = || u - u_theta(x_s, s) ||^2.

Sampling integrates dx/ds = -u_theta from s = 1 (pure noise) to s = 0 with Euler steps,
x_{s'} = x_s + (s - s') u_theta(x_s, s); the x_0 estimate at any point is
x_s + s u_theta(x_s, s), so one step from a partially noised scan (REFLECT) already gives
a reconstruction. The velocity has the sign of MONAI's
:class:`~monai.networks.schedulers.RFlowScheduler` (pointing from noise to data).

Time convention (so that medidiff's integer-timestep sampling loop drives flow models
unchanged): the loop's timestep ``t`` in ``{0 .. T-1}`` (T = ``num_train_timesteps``) is the
flow time ``s = (t + 1) / T`` (:func:`flow_time`), and ``t = -1`` is ``s = 0``, clean data;
so ``t = T - 1`` is pure noise, as for the diffusion samplers. The network's timestep input
is ``s T - 1`` (:func:`flow_timestep`): a float during training, where s is drawn
continuously by :func:`sample_flow_time`, and exactly the loop's integer ``t`` at sampling.

Large inputs keep more signal at a given s, so the time grid can be shifted towards the
noise end (Esser et al. 2024, Sec. 5.3.2): s' = a s / (1 + (a - 1) s) with
a = (numel / base_numel) ** (1 / spatial_dims); :func:`shift_time` does this.

Example:
    >>> import torch
    >>> x0 = torch.zeros(1, 1, 8, 8); eps = torch.ones_like(x0)
    >>> s = torch.tensor([0.25])
    >>> flow_interpolate(x0, eps, s).mean().item(), flow_target(x0, eps).mean().item()
    (0.25, -1.0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "flow_interpolate",
    "flow_time",
    "flow_timestep",
    "flow_target",
    "sample_flow_time",
    "shift_time",
    "flow_times",
    "flow_x0",
    "flow_euler",
]

VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""``u_theta(x_s, timesteps)`` with ``timesteps = flow_timestep(s, T)``, shape ``(B,)``."""


def flow_time(t: float | Tensor, num_train_timesteps: int) -> Tensor:
    """The flow time ``s = (t + 1) / T`` of the loop's timestep ``t`` (``t = -1``: s = 0).

    Returns a float64 tensor shaped like ``t`` (0-d for a number).
    """
    t = torch.as_tensor(t).to(torch.float64)
    return (t + 1.0) / num_train_timesteps


def flow_timestep(s: Tensor, num_train_timesteps: int) -> Tensor:
    """The network's timestep input ``s T - 1`` at flow time ``s`` (inverse of :func:`flow_time`)."""
    return s * num_train_timesteps - 1.0


def _expand(s: Tensor, like: Tensor) -> Tensor:
    return s.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def flow_interpolate(x0: Tensor, eps: Tensor, s: Tensor) -> Tensor:
    """``x_s = (1 - s) x_0 + s eps``; ``s`` is ``(B,)`` in [0, 1]."""
    s = _expand(s, x0)
    return (1.0 - s) * x0 + s * eps


def flow_target(x0: Tensor, eps: Tensor) -> Tensor:
    """The velocity ``u = x_0 - eps`` the network learns."""
    return x0 - eps


def sample_flow_time(
    batch: int, *, method: str = "logit-normal", generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Training times ``s`` in (0, 1): ``uniform`` or ``logit-normal`` (sigmoid of N(0, 1);
    Esser et al. 2024 found it better than uniform: it weights the middle of the path)."""
    if method == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    if method == "logit-normal":
        return torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    raise ValueError(f"unknown flow time sampling {method!r}; use 'uniform' or 'logit-normal'")


def shift_time(s: Tensor, shift: float) -> Tensor:
    """``a s / (1 + (a - 1) s)``: ``a > 1`` spends more of the grid near the noise end."""
    if shift <= 0:
        raise ValueError(f"time shift must be > 0; got {shift}")
    return shift * s / (1.0 + (shift - 1.0) * s)


def flow_times(num_steps: int, start: float = 1.0, shift: float = 1.0) -> Tensor:
    """``num_steps + 1`` decreasing times from ``start`` to 0 (float64), optionally shifted."""
    if num_steps < 1:
        raise ValueError(f"rectified flow needs at least one step; got {num_steps}")
    if not 0.0 < start <= 1.0:
        raise ValueError(f"start time must lie in (0, 1]; got {start}")
    grid = torch.linspace(start, 0.0, num_steps + 1, dtype=torch.float64)
    return shift_time(grid, shift) if shift != 1.0 else grid


def flow_x0(x_s: Tensor, s: Tensor, velocity: Tensor) -> Tensor:
    """The x_0 estimate ``x_s + s u`` at time ``s`` (``(B,)``)."""
    return x_s + _expand(s, x_s) * velocity


def flow_euler(
    velocity_fn: VelocityFn,
    x_start: Tensor,
    times: Sequence[float] | Tensor,
    *,
    num_train_timesteps: int = 1000,
) -> Tensor:
    """Integrate from ``times[0]`` to ``times[-1]`` with Euler steps.

    Args:
        velocity_fn: the network, ``u_theta(x_s, flow_timestep(s, num_train_timesteps))``.
        x_start: ``x`` at ``times[0]``: pure noise for sampling, or a partially noised scan
            (``flow_interpolate(x0, eps, s0)``) for reconstruction.
        times: decreasing times (see :func:`flow_times`); ``len(times) - 1`` network
            evaluations.
        num_train_timesteps: the timestep scale the network was trained with.

    Returns:
        ``x`` at ``times[-1]`` (the sample when that is 0).
    """
    times = torch.as_tensor(times, dtype=torch.float64)
    x = x_start
    b = x.shape[0]
    for s, s_next in zip(times[:-1].tolist(), times[1:].tolist()):
        t = torch.full((b,), s * num_train_timesteps - 1.0, device=x.device, dtype=x.dtype)
        u = velocity_fn(x, t)
        x = x + (s - s_next) * u.to(x.dtype)
    return x
