"""Tests for medidiff.diffusion (schedules, prediction, samplers, sampling, guidance): schedules, forward process, prediction types, samplers.

References: closed forms (q(x_t | x_0), the Gaussian-data probability-flow ODE), MONAI's own
schedulers (``monai.networks.schedulers``) step for step, and an independent VE-form
DPM-Solver++(2M) written below.
"""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from medidiff.diffusion import (
    NoiseSchedule,
    alpha_bar_at,
    ddim_step,
    ddpm_step,
    denoise,
    dpm_solver_2m_step,
    extract,
    guided_model_fn,
    inference_timesteps,
    partial_reconstruction,
    predict_eps,
    predict_x0,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    resolve_null_label,
    sample,
    training_target,
)
from medidiff.errors import ConfigError
from medidiff.diffusion.noise import NoiseSpec, sample_noise

SCHEDULE_NAMES = ["linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"]
PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.create("linear_beta", 1000)


def oracle(schedule: NoiseSchedule, x0: torch.Tensor, prediction_type: str = "epsilon"):
    """A model that knows x_0: returns the exact output of ``prediction_type`` for any x_t."""

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = predict_eps(schedule, x0, x_t, t, prediction_type="sample")
        return training_target(schedule, x0, t, eps, prediction_type=prediction_type)

    return model_fn


def tiny_unet(spatial_dims: int = 2, **kwargs) -> DiffusionModelUNet:
    torch.manual_seed(0)
    net = DiffusionModelUNet(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=1,
        channels=(8, 8),
        attention_levels=(False, False),
        num_res_blocks=1,
        norm_num_groups=8,
        **kwargs,
    )
    return net.eval()


def monai_with_our_schedule(monai_scheduler, schedule: NoiseSchedule):
    """Give a MONAI scheduler our float64 constants, so a comparison tests the step maths."""
    monai_scheduler.betas = schedule.betas.clone()
    monai_scheduler.alphas = schedule.alphas.clone()
    monai_scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    monai_scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(monai_scheduler, "final_alpha_cumprod"):
        monai_scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return monai_scheduler


def seeded_randn(shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    """The noise MONAI's step draws from ``torch.Generator().manual_seed(seed)``."""
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_schedules_match_monai(name):
    ours = NoiseSchedule.create(name, num_train_timesteps=1000)
    theirs = DDPMScheduler(num_train_timesteps=1000, schedule=name)
    assert ours.betas.dtype == torch.float64
    # MONAI computes in float32 (1 - ratio loses digits for cosine's first betas).
    torch.testing.assert_close(ours.betas.float(), theirs.betas, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(ours.alphas, 1 - ours.betas)


def test_schedule_closed_forms():
    linear = NoiseSchedule.create("linear_beta", 10, 0.1, 0.2)
    assert linear.betas[0].item() == pytest.approx(0.1)
    assert linear.betas[-1].item() == pytest.approx(0.2)
    assert linear.alphas_cumprod[1].item() == pytest.approx(0.9 * (1 - 0.1 - 0.1 / 9))
    scaled = NoiseSchedule.create("scaled_linear_beta", 3, 0.01, 0.09)
    torch.testing.assert_close(scaled.betas, torch.tensor([0.01, 0.04, 0.09], dtype=torch.float64))
    cosine = NoiseSchedule.create("cosine", 1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    assert cosine.alphas_cumprod[499].item() == pytest.approx(f(500) / f(0), rel=1e-9)
    assert cosine.betas.max().item() == pytest.approx(0.999)  # clipped at t = T


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "quadratic"},
        {"name": "linear_beta", "num_train_timesteps": 1},
        {"name": "linear_beta", "num_train_timesteps": 10.0},
        {"name": "linear_beta", "beta_start": 0.02, "beta_end": 1e-4},
        {"name": "scaled_linear_beta", "beta_end": 1.5},
        {"name": "cosine", "cosine_s": -0.1},
    ],
)
def test_bad_schedule_raises_config_error(kwargs):
    with pytest.raises(ConfigError):
        NoiseSchedule.create(**kwargs)


def test_schedule_to_casts_once_and_config_round_trips(schedule):
    moved = schedule.to("cpu")
    assert moved.dtype == torch.float32 and moved.device.type == "cpu"
    assert schedule.dtype == torch.float64  # the original is untouched
    assert moved.to("cpu") is moved  # nothing to do: no copy
    torch.testing.assert_close(moved.alphas_cumprod, schedule.alphas_cumprod.float())
    rebuilt = NoiseSchedule.create(**NoiseSchedule.create("cosine", 50).config())
    assert rebuilt.name == "cosine" and rebuilt.num_train_timesteps == 50
    torch.testing.assert_close(rebuilt.betas, NoiseSchedule.create("cosine", 50).betas)
    assert "linear_beta" in repr(schedule)


@pytest.mark.parametrize("ndim", [4, 5])
def test_extract_broadcasts_to_any_rank(schedule, ndim):
    like = torch.zeros((3, 2) + (4,) * (ndim - 2), dtype=torch.float32)
    t = torch.tensor([0, 10, 999])
    out = extract(schedule.alphas_cumprod, t, like)
    assert out.shape == (3,) + (1,) * (ndim - 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), schedule.alphas_cumprod[t].float())
    assert (out * like).shape == like.shape


def test_alpha_bar_is_one_at_minus_one(schedule):
    values = alpha_bar_at(schedule, torch.tensor([-1, 0, 999]))
    assert values[0].item() == 1.0
    assert values[1].item() == pytest.approx(1 - 1e-4)


# ---------------------------------------------------------------------------------------------
# Forward process
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear_beta", "cosine"])
@pytest.mark.parametrize("t", [0, 300, 999])
def test_q_sample_matches_closed_form_statistics(name, t):
    schedule = NoiseSchedule.create(name)
    x0 = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(1, 1, 4, 4)
    n = 20000
    noise = torch.randn(
        (n, 1, 4, 4), dtype=torch.float64, generator=torch.Generator().manual_seed(t)
    )
    x_t = q_sample(schedule, x0.expand(n, -1, -1, -1), t, noise)
    alpha_bar = schedule.alphas_cumprod[t].item()
    mean_error = (x_t.mean(0) - math.sqrt(alpha_bar) * x0[0]).abs().max().item()
    assert mean_error < 5 * math.sqrt((1 - alpha_bar) / n)
    var_error = (x_t.var(0) - (1 - alpha_bar)).abs().max().item()
    assert var_error < 5 * (1 - alpha_bar) * math.sqrt(2 / n)
    closed = q_mean_variance(schedule, x0, t)
    torch.testing.assert_close(closed.mean, math.sqrt(alpha_bar) * x0)
    assert closed.variance.shape == (1, 1, 1, 1)
    assert closed.variance.item() == pytest.approx(1 - alpha_bar)


def test_q_sample_matches_monai_add_noise(schedule):
    theirs = monai_with_our_schedule(DDPMScheduler(), schedule)
    x0, noise = seeded_randn((3, 1, 8, 8, 8), 0), seeded_randn((3, 1, 8, 8, 8), 1)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(q_sample(schedule, x0, t, noise), theirs.add_noise(x0, noise, t))


def test_q_sample_takes_any_noise(schedule):
    x0 = torch.ones(2, 1, 16, 16)
    simplex = torch.zeros_like(x0).normal_()
    expected = (
        schedule.alphas_cumprod[100].sqrt() * x0
        + (1 - schedule.alphas_cumprod[100]).sqrt() * simplex
    )
    torch.testing.assert_close(q_sample(schedule, x0, 100, simplex), expected.float())


def test_posterior_is_ho_et_al_at_t_minus_one(schedule):
    x0, x_t = seeded_randn((2, 1, 4, 4), 0), seeded_randn((2, 1, 4, 4), 1)
    t = 500
    ab, ab_prev = schedule.alphas_cumprod[t], schedule.alphas_cumprod[t - 1]
    beta, alpha = schedule.betas[t], schedule.alphas[t]
    posterior = q_posterior_mean_variance(schedule, x0, x_t, t, t - 1)
    mean = ab_prev.sqrt() * beta / (1 - ab) * x0 + alpha.sqrt() * (1 - ab_prev) / (1 - ab) * x_t
    torch.testing.assert_close(posterior.mean, mean)
    assert posterior.variance.flatten()[0].item() == pytest.approx(
        ((1 - ab_prev) / (1 - ab) * beta).item()
    )
    final = q_posterior_mean_variance(schedule, x0, x_t, 0, -1)
    torch.testing.assert_close(final.mean, x0)
    assert final.variance.abs().max().item() < 1e-12


# ---------------------------------------------------------------------------------------------
# Prediction types
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_prediction_conversions_round_trip(schedule, prediction_type):
    x0, eps = seeded_randn((4, 2, 6, 6), 0), seeded_randn((4, 2, 6, 6), 1)
    t = torch.tensor([0, 1, 500, 999])
    x_t = q_sample(schedule, x0, t, eps)
    target = training_target(schedule, x0, t, eps, prediction_type=prediction_type)
    got_x0 = predict_x0(schedule, target, x_t, t, prediction_type=prediction_type)
    got_eps = predict_eps(schedule, target, x_t, t, prediction_type=prediction_type)
    torch.testing.assert_close(got_x0, x0, atol=1e-9, rtol=0)
    torch.testing.assert_close(got_eps, eps, atol=1e-9, rtol=0)


def test_v_target_matches_monai_velocity(schedule):
    theirs = monai_with_our_schedule(DDPMScheduler(), schedule)
    x0, eps = seeded_randn((3, 1, 5, 5), 0), seeded_randn((3, 1, 5, 5), 1)
    t = torch.tensor([3, 400, 998])
    ours = training_target(schedule, x0, t, eps, prediction_type="v_prediction")
    torch.testing.assert_close(ours, theirs.get_velocity(x0, eps, t))


def test_unknown_prediction_type_raises(schedule):
    with pytest.raises(ConfigError, match="prediction_type"):
        training_target(
            schedule, torch.zeros(1, 1, 2, 2), 0, torch.zeros(1, 1, 2, 2), prediction_type="noise"
        )


# ---------------------------------------------------------------------------------------------
# Timesteps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize(
    "start_t, num_steps", [(999, 50), (999, 1000), (999, 1), (249, 10), (0, 1), (250, 251), (7, 3)]
)
def test_inference_timesteps_start_exactly_and_decrease(spacing, start_t, num_steps):
    steps = inference_timesteps(start_t, num_steps, spacing)
    assert steps.dtype == torch.long
    assert steps.shape == (num_steps,)
    assert steps[0].item() == start_t
    assert bool((steps[1:] < steps[:-1]).all())
    assert steps[-1].item() >= 0


def test_trailing_spacing_values():
    steps = inference_timesteps(999, 50)
    assert steps[0].item() == 999 and steps[1].item() == 979 and steps[-1].item() == 19
    assert inference_timesteps(4, 5).tolist() == [4, 3, 2, 1, 0]
    assert inference_timesteps(999, 10, "linspace")[-1].item() == 0


def test_inference_timesteps_exhaustive_small_ranges():
    for start_t in range(60):
        for num_steps in range(1, start_t + 2):
            for spacing in ("trailing", "linspace"):
                steps = inference_timesteps(start_t, num_steps, spacing)
                assert steps[0] == start_t and len(steps) == num_steps
                assert bool((steps[1:] < steps[:-1]).all()) and steps[-1] >= 0


@pytest.mark.parametrize(
    "args", [(999, 50, "leading"), (10, 12, "trailing"), (10, 0, "trailing"), (-1, 1, "trailing")]
)
def test_bad_inference_timesteps_raise(args):
    with pytest.raises(ConfigError):
        inference_timesteps(*args)


# ---------------------------------------------------------------------------------------------
# Single steps against MONAI
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("t", [999, 500, 1, 0])
def test_ddpm_step_equals_monai(schedule, t, prediction_type, clip):
    theirs = monai_with_our_schedule(
        DDPMScheduler(prediction_type=prediction_type, clip_sample=clip), schedule
    )
    x_t, output = seeded_randn((2, 1, 8, 8), 10) * 1.5, seeded_randn((2, 1, 8, 8), 11)
    ref_prev, ref_x0 = theirs.step(output, t, x_t, generator=torch.Generator().manual_seed(3))
    ours = ddpm_step(
        schedule,
        output,
        x_t,
        t,
        t - 1,
        noise=seeded_randn((2, 1, 8, 8), 3),
        prediction_type=prediction_type,
        clip_range=(-1.0, 1.0) if clip else None,
    )
    torch.testing.assert_close(ours.prev_sample, ref_prev, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ours.pred_x0, ref_x0, atol=1e-10, rtol=1e-10)


def test_ddpm_step_equals_monai_in_float32():
    """With MONAI's own float32 constants, at a timestep where float32 is well conditioned."""
    theirs = DDPMScheduler(clip_sample=False)
    ours = NoiseSchedule.create("linear_beta").to("cpu")
    x_t, output = (
        seeded_randn((2, 1, 8, 8), 0, torch.float32),
        seeded_randn((2, 1, 8, 8), 1, torch.float32),
    )
    ref_prev, _ = theirs.step(output, 600, x_t, generator=torch.Generator().manual_seed(2))
    got = ddpm_step(ours, output, x_t, 600, 599, noise=seeded_randn((2, 1, 8, 8), 2, torch.float32))
    torch.testing.assert_close(got.prev_sample, ref_prev, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize(
    "t, eta", [(999, 0.0), (500, 0.0), (99, 0.0), (40, 0.0), (999, 0.5), (500, 1.0)]
)
def test_ddim_step_equals_monai(schedule, t, eta, prediction_type):
    theirs = monai_with_our_schedule(
        DDIMScheduler(prediction_type=prediction_type, clip_sample=False), schedule
    )
    theirs.set_timesteps(10)  # MONAI steps to t - 1000 // 10 (clean data when negative)
    t_prev = t - 100 if t >= 100 else -1
    x_t, output = seeded_randn((2, 1, 6, 6, 6), 20), seeded_randn((2, 1, 6, 6, 6), 21)
    ref_prev, ref_x0 = theirs.step(
        output, t, x_t, eta=eta, generator=torch.Generator().manual_seed(4)
    )
    ours = ddim_step(
        schedule,
        output,
        x_t,
        t,
        t_prev,
        eta=eta,
        noise=seeded_randn((2, 1, 6, 6, 6), 4),
        prediction_type=prediction_type,
    )
    torch.testing.assert_close(ours.prev_sample, ref_prev, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ours.pred_x0, ref_x0, atol=1e-10, rtol=1e-10)


def test_strided_ddpm_step_is_ddim_with_eta_one(schedule):
    theirs = monai_with_our_schedule(DDIMScheduler(clip_sample=False), schedule)
    theirs.set_timesteps(20)  # t -> t - 50
    x_t, output = seeded_randn((2, 1, 8, 8), 30), seeded_randn((2, 1, 8, 8), 31)
    ref_prev, _ = theirs.step(output, 700, x_t, eta=1.0, generator=torch.Generator().manual_seed(5))
    ours = ddpm_step(schedule, output, x_t, 700, 650, noise=seeded_randn((2, 1, 8, 8), 5))
    torch.testing.assert_close(ours.prev_sample, ref_prev, atol=1e-10, rtol=1e-10)


def test_first_order_dpm_solver_step_is_ddim(schedule):
    x_t, output = seeded_randn((2, 1, 8, 8), 40), seeded_randn((2, 1, 8, 8), 41)
    for t, t_prev in [(999, 800), (300, 120), (40, -1)]:
        dpm = dpm_solver_2m_step(schedule, output, x_t, t, t_prev)
        ddim = ddim_step(schedule, output, x_t, t, t_prev)
        torch.testing.assert_close(dpm.prev_sample, ddim.prev_sample, atol=1e-10, rtol=1e-10)


def test_steps_need_noise_when_stochastic(schedule):
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="noise"):
        ddpm_step(schedule, x, x, 10, 9)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(schedule, x, x, 10, 5, eta=0.5)
    ddpm_step(schedule, x, x, 0, -1)  # the last step is deterministic


# ---------------------------------------------------------------------------------------------
# Whole samplers: exactness with an oracle, accuracy on Gaussian data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize(
    "sampler, steps", [("ddim", 7), ("dpm++2m", 7), ("x0", None), ("ddpm", None), ("ddpm", 4)]
)
def test_oracle_model_recovers_x0(schedule, sampler, steps, prediction_type):
    x0 = torch.rand((2, 1, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1
    result = partial_reconstruction(
        oracle(schedule, x0, prediction_type),
        schedule,
        x0,
        60,
        sampler=sampler,
        steps=steps,
        seeds=[1, 2],
        prediction_type=prediction_type,
    )
    torch.testing.assert_close(result.reconstruction, x0, atol=1e-4, rtol=0)
    torch.testing.assert_close(result.pred_x0, x0, atol=1e-4, rtol=0)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "ddpm"])
def test_sample_with_oracle_lands_on_x0(schedule, sampler, spatial_dims):
    x0 = torch.full((2, 1) + (6,) * spatial_dims, 0.25)
    result = sample(
        oracle(schedule, x0), schedule, x0.shape, sampler=sampler, steps=5, seeds=[3, 4]
    )
    assert result.sample.shape == x0.shape
    assert result.nfe == 5 and len(result.timesteps) == 5 and result.timesteps[0] == 999
    torch.testing.assert_close(result.sample, x0, atol=1e-4, rtol=0)



def test_sample_callback_sees_every_step(schedule):
    """The callback gets each visited t with the state that entered the step and x_0 estimate."""
    x0 = torch.full((1, 1, 6, 6), 0.25)
    seen = []
    result = sample(
        oracle(schedule, x0), schedule, x0.shape, sampler="ddim", steps=4, seeds=[7],
        callback=lambda t, x_t, p: seen.append((t, x_t.clone(), p.clone())),
    )
    assert [t for t, _, _ in seen] == list(result.timesteps) and len(seen) == result.nfe == 4
    first_noise = sample_noise(NoiseSpec(), (1, 1, 6, 6), seeds=[7])
    torch.testing.assert_close(seen[0][1], first_noise)  # x_{T-1} is the seeded noise
    for _, _, pred in seen:  # the oracle's x_0 estimate is exact at every step
        torch.testing.assert_close(pred, x0, atol=1e-4, rtol=0)
    assert not torch.equal(seen[1][1], seen[0][1])  # states change along the way


GAUSS_MU, GAUSS_SD = 0.5, 0.2


def gaussian_data_eps_model(schedule: NoiseSchedule):
    """The exact eps_theta for data x_0 ~ N(mu, sd^2) i.i.d.: E[eps | x_t]."""

    def model_fn(x_t, t):
        ab = extract(schedule.alphas_cumprod, t, x_t)
        return (1 - ab).sqrt() * (x_t - ab.sqrt() * GAUSS_MU) / (ab * GAUSS_SD**2 + 1 - ab)

    return model_fn


def probability_flow_solution(schedule: NoiseSchedule, x_T: torch.Tensor) -> torch.Tensor:
    """The ODE keeps the standardised value (x_t - alpha mu) / std_t, so x_0 is its image."""
    ab = schedule.alphas_cumprod[-1]
    return GAUSS_MU + GAUSS_SD * (x_T - ab.sqrt() * GAUSS_MU) / (ab * GAUSS_SD**2 + 1 - ab).sqrt()


def test_samplers_converge_to_the_probability_flow_solution(schedule):
    x_T = seeded_randn((2, 1, 8, 8), 50)
    exact = probability_flow_solution(schedule, x_T)
    model = gaussian_data_eps_model(schedule)

    def error(sampler, steps):
        out = denoise(model, schedule, x_T, 999, sampler=sampler, steps=steps, seeds=[0, 1])
        return (out.reconstruction - exact).abs().max().item()

    ddim_100, dpm_100 = error("ddim", 100), error("dpm++2m", 100)
    ddim_1000, dpm_1000 = error("ddim", 1000), error("dpm++2m", 1000)
    assert ddim_1000 < ddim_100 / 5  # first order: about 10x for 10x steps
    assert dpm_100 < ddim_100 / 3  # second order beats first order at the same cost
    assert dpm_1000 < 1e-3


def reference_dpm_solver_2m_ve(denoiser, schedule, x_T, timesteps):
    """DPM-Solver++(2M) in variance-exploding form (as k-diffusion writes it), independent of
    medidiff's VP form: sigma = sqrt((1 - alpha_bar) / alpha_bar), x_ve = x / sqrt(alpha_bar)."""
    abs_ = [schedule.alphas_cumprod[t].item() for t in timesteps] + [1.0]
    sigmas = [math.sqrt((1 - a) / a) for a in abs_]
    x = x_T / math.sqrt(abs_[0])
    old = None
    for i, t in enumerate(timesteps):
        denoised = denoiser(x * math.sqrt(abs_[i]), torch.full((x.shape[0],), t))
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sigmas[i] / sigmas[i + 1])
            d = denoised
            if old is not None:
                r = math.log(sigmas[i - 1] / sigmas[i]) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * d
        old = denoised
    return x


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_dpm_solver_matches_an_independent_ve_reference(schedule, spacing):
    eps_model = gaussian_data_eps_model(schedule)

    def denoiser(x, t):
        return predict_x0(schedule, eps_model(x, t), x, t)

    x_T = seeded_randn((2, 1, 4, 4), 60)
    timesteps = inference_timesteps(999, 8, spacing)
    expected = reference_dpm_solver_2m_ve(denoiser, schedule, x_T, timesteps.tolist())
    ours = denoise(
        eps_model, schedule, x_T, 999, sampler="dpm++2m", steps=8, spacing=spacing, seeds=[0, 1]
    )
    torch.testing.assert_close(ours.reconstruction, expected, atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# nfe, determinism and per-sample seeds
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler, steps, expected_nfe",
    [
        ("ddpm", None, 31),
        ("ddpm", 6, 6),
        ("ddim", 5, 5),
        ("ddim", None, 31),
        ("dpm++2m", 4, 4),
        ("x0", None, 1),
    ],
)
def test_partial_reconstruction_counts_network_calls(schedule, sampler, steps, expected_nfe):
    calls = []

    def model_fn(x_t, t):
        calls.append(t.clone())
        assert t.shape == (2,) and t.dtype == torch.long
        return torch.zeros_like(x_t)

    x0 = torch.zeros(2, 1, 8, 8)
    result = partial_reconstruction(
        model_fn, schedule, x0, 30, sampler=sampler, steps=steps, seeds=[0, 1]
    )
    assert result.nfe == len(calls) == expected_nfe  # ddpm, steps=None: t_start + 1
    assert len(result.timesteps) == expected_nfe and result.timesteps[0] == 30
    assert calls[0].tolist() == [30, 30]
    assert result.x_t.shape == result.pred_x0.shape == result.reconstruction.shape == x0.shape


def test_partial_reconstruction_x_t_is_the_forward_process(schedule):
    x0 = torch.rand((2, 1, 16, 16), generator=torch.Generator().manual_seed(1))
    spec = NoiseSpec("simplex")
    result = partial_reconstruction(
        lambda x, t: torch.zeros_like(x),
        schedule,
        x0,
        250,
        sampler="x0",
        noise_spec=spec,
        seeds=[5, 6],
    )
    from medidiff.diffusion.noise import sample_noise

    noise = sample_noise(spec, x0.shape, seeds=[5, 6])
    torch.testing.assert_close(result.x_t, q_sample(schedule.to("cpu"), x0, 250, noise))


def test_ddim_eta_zero_is_deterministic(schedule):
    net = tiny_unet()
    x_t = seeded_randn((2, 1, 16, 16), 70, torch.float32)
    a = denoise(net, schedule, x_t, 500, sampler="ddim", steps=3, seeds=[1, 2])
    b = denoise(net, schedule, x_t, 500, sampler="ddim", steps=3, seeds=[8, 9])
    assert torch.equal(a.reconstruction, b.reconstruction)
    c = denoise(net, schedule, x_t, 500, sampler="ddim", steps=3, eta=1.0, seeds=[1, 2])
    d = denoise(net, schedule, x_t, 500, sampler="ddim", steps=3, eta=1.0, seeds=[8, 9])
    assert not torch.allclose(c.reconstruction, d.reconstruction)


@pytest.mark.parametrize(
    "sampler, kind", [("ddpm", "gaussian"), ("ddpm", "simplex"), ("ddim", "gaussian")]
)
def test_same_seeds_reproduce_and_samples_ignore_batch_composition(schedule, sampler, kind):
    net = tiny_unet()
    spec = NoiseSpec(kind)
    kwargs = {"sampler": sampler, "steps": 3, "noise_spec": spec, "eta": 0.5}
    batch = sample(net, schedule, (3, 1, 16, 16), seeds=[11, 12, 13], **kwargs).sample
    again = sample(net, schedule, (3, 1, 16, 16), seeds=[11, 12, 13], **kwargs).sample
    alone = sample(net, schedule, (1, 1, 16, 16), seeds=[12], **kwargs).sample
    other = sample(net, schedule, (2, 1, 16, 16), seeds=[12, 99], **kwargs).sample
    assert torch.equal(batch, again)
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(other[0:1], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(batch[0], batch[1])

    x0 = torch.rand((3, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    pr = {"sampler": sampler, "steps": 3, "noise_spec": spec, "eta": 0.5}
    rec = partial_reconstruction(net, schedule, x0, 100, seeds=[1, 2, 3], **pr).reconstruction
    rec_alone = partial_reconstruction(net, schedule, x0[2:], 100, seeds=[3], **pr).reconstruction
    torch.testing.assert_close(rec[2:], rec_alone, atol=1e-5, rtol=0)


def lag1(z: torch.Tensor) -> float:
    a, b = z[..., 1:].flatten().double(), z[..., :-1].flatten().double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@pytest.mark.parametrize("kind", ["gaussian", "simplex"])
def test_ddpm_chain_uses_the_chosen_noise_kind_for_its_steps(schedule, kind):
    """AnoDDPM: the ancestral steps add simplex noise when the forward noise is simplex."""
    seen = []

    def model_fn(x_t, t):  # eps_theta = 0: x_{t-1} = posterior mean(x_t) + sqrt(var) z
        seen.append(x_t.clone())
        return torch.zeros_like(x_t)

    x0 = torch.zeros(2, 1, 64, 64)
    partial_reconstruction(
        model_fn, schedule, x0, 5, sampler="ddpm", noise_spec=NoiseSpec(kind), seeds=[0, 1]
    )
    sched32 = schedule.to("cpu")
    x_5, x_4 = seen[0], seen[1]
    posterior = q_posterior_mean_variance(
        sched32, predict_x0(sched32, torch.zeros_like(x_5), x_5, 5), x_5, 5, 4
    )
    z = (x_4 - posterior.mean) / posterior.variance.sqrt()
    assert abs(z.std().item() - 1) < 0.05
    if kind == "simplex":
        assert lag1(z) > 0.5
    else:
        assert abs(lag1(z)) < 0.05


# ---------------------------------------------------------------------------------------------
# Real MONAI networks, 2D and 3D
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_sampling_with_a_monai_unet_gives_finite_outputs_of_the_right_shape(spatial_dims, sampler):
    net = tiny_unet(spatial_dims)
    schedule = NoiseSchedule.create("cosine", 100)
    shape = (2, 1) + (16,) * spatial_dims if spatial_dims == 2 else (1, 1, 8, 8, 8)
    result = sample(
        net,
        schedule,
        shape,
        sampler=sampler,
        steps=2,
        seeds=list(range(shape[0])),
        clip_range=(-1, 1),
    )
    assert result.sample.shape == shape and result.nfe == 2
    assert torch.isfinite(result.sample).all()
    assert result.sample.min() >= -1 - 1e-6 and result.sample.max() <= 1 + 1e-6


def test_progress_bar_runs(schedule, capsys):
    result = sample(
        lambda x, t: torch.zeros_like(x), schedule, (1, 1, 4, 4), steps=2, seeds=[0], progress=True
    )
    assert result.nfe == 2


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------


class RecordingClassModel(torch.nn.Module):
    """out = x * (label + 1); records the labels it is called with."""

    num_class_embeds = 4

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[torch.Tensor] = []

    def forward(self, x, timesteps, context=None, class_labels=None):
        self.calls.append(class_labels.clone())
        return x * (class_labels.float() + 1).view(-1, *([1] * (x.ndim - 1)))


def test_guidance_zero_is_unconditional_and_one_is_conditional():
    model = RecordingClassModel()
    x, t, labels = torch.ones(2, 1, 4, 4), torch.tensor([5, 5]), torch.tensor([0, 1])
    uncond = guided_model_fn(model, labels, 0.0)(x, t)
    assert len(model.calls) == 1 and model.calls[0].tolist() == [3, 3]  # null = last row
    torch.testing.assert_close(uncond, 4 * x)
    model.calls.clear()
    cond = guided_model_fn(model, labels, 1.0)(x, t)
    assert len(model.calls) == 1 and model.calls[0].tolist() == [0, 1]
    torch.testing.assert_close(cond[:, 0, 0, 0], torch.tensor([1.0, 2.0]))
    model.calls.clear()
    guided = guided_model_fn(model, labels, 3.0)(x, t)
    assert len(model.calls) == 1 and model.calls[0].tolist() == [3, 3, 0, 1]  # one 2B pass
    expected = uncond + 3.0 * (cond - uncond)
    torch.testing.assert_close(guided, expected)


def test_guidance_with_a_monai_unet():
    net = tiny_unet(num_class_embeds=3)
    x, t, labels = (
        seeded_randn((2, 1, 16, 16), 80, torch.float32),
        torch.tensor([10, 10]),
        torch.tensor([0, 1]),
    )
    with torch.no_grad():
        uncond = net(x, t, class_labels=torch.tensor([2, 2]))
        cond = net(x, t, class_labels=labels)
        guided = guided_model_fn(net, labels, 2.0)(x, t)
    torch.testing.assert_close(guided, uncond + 2.0 * (cond - uncond), atol=1e-5, rtol=1e-5)
    result = sample(
        guided_model_fn(net, labels, 2.0),
        NoiseSchedule.create("linear_beta", 50),
        (2, 1, 16, 16),
        steps=2,
        seeds=[0, 1],
    )
    assert result.nfe == 2


def test_null_label_resolution():
    assert resolve_null_label(RecordingClassModel()) == 3
    assert resolve_null_label(RecordingClassModel(), 0) == 0
    with pytest.raises(ConfigError, match="num_class_embeds"):
        resolve_null_label(torch.nn.Linear(1, 1))
    with pytest.raises(ConfigError, match="outside"):
        resolve_null_label(RecordingClassModel(), 4)


# ---------------------------------------------------------------------------------------------
# Argument checking
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"sampler": "euler"}, "sampler"),
        ({"t_start": 1000}, "t_start"),
        ({"t_start": -1}, "t_start"),
        ({"steps": 0}, "steps"),
        ({"steps": 32}, "steps"),
        ({"sampler": "x0", "steps": 3}, "x0"),
        ({"seeds": [1]}, "seeds"),
        ({"prediction_type": "noise"}, "prediction_type"),
        ({"clip_range": (1.0, -1.0)}, "clip_range"),
        ({"eta": -0.1}, "eta"),
        ({"spacing": "leading"}, "spacing"),
    ],
)
def test_bad_sampling_arguments_raise_config_error(schedule, kwargs, word):
    args = {"t_start": 30, "sampler": "ddim", "seeds": [1, 2]} | kwargs
    x0 = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ConfigError, match=word):
        partial_reconstruction(lambda x, t: x, schedule, x0, args.pop("t_start"), **args)


def test_bad_sample_shape_raises(schedule):
    with pytest.raises(ConfigError, match="shape"):
        sample(lambda x, t: x, schedule, (2, 16, 16))
