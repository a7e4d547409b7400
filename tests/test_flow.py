"""Rectified flow (medidiff.diffusion.flow): path, target, time grids, Euler sampler."""

from __future__ import annotations

import pytest
import torch

from medidiff.diffusion.flow import (
    flow_euler,
    flow_interpolate,
    flow_target,
    flow_times,
    flow_x0,
    sample_flow_time,
    shift_time,
)

T = 1000


def _exact_velocity(c: torch.Tensor):
    """The true velocity when all data sit at ``c``: u(x_s, s) = (c - x_s) / s, with the
    network's timestep t = s T - 1."""

    def fn(x, t):
        s = ((t + 1) / T).reshape(-1, *([1] * (x.ndim - 1)))
        return (c - x) / s

    return fn


@pytest.mark.parametrize("steps", [1, 3, 30])
def test_euler_is_exact_on_straight_paths(steps):
    g = torch.Generator().manual_seed(0)
    c = torch.rand(2, 1, 6, 5, generator=g)
    noise = torch.randn(2, 1, 6, 5, generator=g)
    out = flow_euler(_exact_velocity(c), noise, flow_times(steps), num_train_timesteps=T)
    assert torch.allclose(out, c, atol=1e-5)


def test_partial_reconstruction_from_mid_path():
    g = torch.Generator().manual_seed(1)
    c = torch.rand(1, 1, 4, 4, 4, generator=g)
    eps = torch.randn(c.shape, generator=g)
    s0 = torch.tensor([0.3])
    x_s = flow_interpolate(c, eps, s0)
    out = flow_euler(_exact_velocity(c), x_s, flow_times(2, start=0.3), num_train_timesteps=T)
    assert torch.allclose(out, c, atol=1e-5)
    # one-step x0 estimate from the true velocity
    u = flow_target(c, eps)
    assert torch.allclose(flow_x0(x_s, s0, u), c, atol=1e-6)


def test_path_endpoints_and_target():
    x0, eps = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2)
    s = torch.tensor([0.0, 0.5, 1.0])
    x = flow_interpolate(x0, eps, s)
    assert x[0].eq(0).all() and x[1].eq(0.5).all() and x[2].eq(1).all()
    assert flow_target(x0, eps).eq(-1).all()


def test_time_grids_and_shift():
    grid = flow_times(4)
    assert grid.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    shifted = flow_times(4, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert (shifted[1:-1] > grid[1:-1]).all()  # more steps near the noise end
    assert torch.all(shifted[:-1] > shifted[1:])
    assert shift_time(torch.tensor(0.5), 1.0) == 0.5
    with pytest.raises(ValueError):
        flow_times(0)
    with pytest.raises(ValueError):
        flow_times(4, start=1.5)


def test_training_time_sampling():
    g = torch.Generator().manual_seed(0)
    for method in ("uniform", "logit-normal"):
        s = sample_flow_time(4000, method=method, generator=g)
        assert s.min() > 0 and s.max() < 1
        assert abs(s.mean().item() - 0.5) < 0.03
    ln = sample_flow_time(4000, method="logit-normal", generator=g)
    un = sample_flow_time(4000, method="uniform", generator=g)
    assert ln.std() < un.std()  # logit-normal concentrates on the middle of the path
    with pytest.raises(ValueError, match="unknown flow time sampling"):
        sample_flow_time(2, method="beta")
