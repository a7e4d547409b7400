"""Reverse samplers: one step x_t -> x_{t_prev}, one object per sampler behind one registry.

Each sampler of :data:`medidiff.constants.SAMPLERS` is a small class in
:data:`SAMPLER_CLASSES` with :meth:`Sampler.timesteps` (which timesteps it visits) and
:meth:`Sampler.step` (one reverse step); the loop that drives them is
:mod:`medidiff.diffusion.sampling`. A new sampler (e.g. rectified flow) is a new class and
a new entry, not a new branch in the loop:

- :class:`DDPMSampler`: ancestral DDPM (Ho et al. 2020), strided when steps < T;
- :class:`DDIMSampler`: DDIM (Song et al. 2021), deterministic at eta = 0;
- :class:`DPMSolver2MSampler`: DPM-Solver++(2M) (Lu et al. 2022), multistep, deterministic;
- :class:`X0Sampler`: one network evaluation, x_0 predicted straight from x_t (any model);
- :class:`EulerSampler`: Euler steps along a rectified-flow model's straight path
  (Liu et al. 2023), deterministic; the generative sampler of ``prediction_type: flow``.

Diffusion samplers (DDPM, DDIM, DPM-Solver++) read the diffusion schedule and refuse flow
models; the Euler sampler refuses diffusion models (:meth:`Sampler.check_prediction_type`);
:func:`sampler_for` picks a model's sampler when the user named none.

The step functions are written here rather than taken from MONAI's schedulers because the
samplers need things those do not offer: a step between any pair of timesteps t -> t_prev
(MONAI's DDIM step always goes to t - T // k, which in MONAI 1.6 does not always match the
next entry of its own linspace list: 979 -> 959, then 958), ancestral noise of a chosen kind
(simplex), per-sample random streams, and no hidden ``clip_sample=True`` default. They are
tested against ``monai.networks.schedulers`` step for step. Sampling lists start exactly at
the requested timestep (``"trailing"`` spacing), never at T - T/k as the leading spacing of
older MONAI releases did (MONAI #8600; GenerativeModels #397).

Example:
    >>> from medidiff.diffusion.schedules import NoiseSchedule
    >>> sampler = make_sampler("ddim", NoiseSchedule.create(num_train_timesteps=100))
    >>> sampler.timesteps(99, 4)
    [99, 74, 49, 24]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from medidiff.constants import SAMPLERS, SPACINGS
from medidiff.diffusion.flow import flow_time
from medidiff.diffusion.prediction import is_flow, predict_x0, x0_and_eps
from medidiff.diffusion.schedules import (
    NoiseSchedule,
    alpha_bar_at,
    batch_timesteps,
    expand,
    q_posterior_mean_variance,
)
from medidiff.errors import ConfigError

__all__ = [
    "SAMPLERS",
    "SAMPLER_CLASSES",
    "SPACINGS",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolver2MSampler",
    "EulerSampler",
    "Sampler",
    "StepResult",
    "X0Sampler",
    "ddim_step",
    "ddpm_step",
    "dpm_solver_2m_step",
    "euler_step",
    "inference_timesteps",
    "make_sampler",
    "sampler_class",
    "sampler_for",
]


# --------------------------------------------------------------------------------------------
# Timesteps for sampling
# --------------------------------------------------------------------------------------------


def inference_timesteps(start_t: int, num_steps: int, spacing: str = "trailing") -> Tensor:
    """The timesteps a sampler visits, from ``start_t`` down towards 0.

    ``"trailing"`` (default; Lin et al. 2024, "Common diffusion noise schedules and sample
    steps are flawed"): ``round((start_t + 1) (1 - i / num_steps)) - 1`` for
    ``i = 0 .. num_steps-1``, so the list starts exactly at ``start_t`` (``T - 1`` for full
    sampling, or a partial-diffusion start) and ends near ``(start_t + 1) / num_steps - 1``.
    ``"linspace"``: ``round(linspace(start_t, 0, num_steps))``, ending exactly at 0 (MONAI's
    DDPM spacing). MONAI's DDIM "leading" spacing, which never visits ``T - 1``, is not
    offered. After the last listed timestep a sampler steps to ``t = -1`` (alpha_bar = 1).

    Args:
        start_t: the first (noisiest) timestep, ``>= 0``.
        num_steps: how many timesteps, ``1 .. start_t + 1``; ``start_t + 1`` visits every
            timestep.
        spacing: ``"trailing"`` or ``"linspace"``.

    Returns:
        ``(num_steps,)`` strictly decreasing long tensor with first entry ``start_t``.

    Raises:
        ConfigError: bad spacing or out-of-range numbers.
    """
    if spacing not in SPACINGS:
        raise ConfigError(
            f"timestep spacing {spacing!r} is unknown; use one of {', '.join(SPACINGS)}"
        )
    if isinstance(start_t, bool) or not isinstance(start_t, int) or start_t < 0:
        raise ConfigError(f"start timestep must be an integer >= 0, got {start_t!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise ConfigError(f"number of steps must be an integer, got {num_steps!r}")
    if not 1 <= num_steps <= start_t + 1:
        raise ConfigError(
            f"number of steps must be between 1 and {start_t + 1} (start timestep + 1), got {num_steps}"
        )
    i = torch.arange(num_steps, dtype=torch.float64)
    if spacing == "trailing":
        steps = torch.round((start_t + 1) * (1 - i / num_steps)) - 1
    else:
        steps = torch.round(start_t * (1 - i / max(num_steps - 1, 1)))
    steps = steps.long()
    if steps[0] != start_t or (num_steps > 1 and not bool((steps[1:] < steps[:-1]).all())):
        raise RuntimeError(f"internal error: bad timesteps {steps.tolist()}")  # pragma: no cover
    return steps


# --------------------------------------------------------------------------------------------
# One reverse step: x_t -> x_{t_prev}
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepResult:
    """The outcome of one reverse step.

    Attributes:
        prev_sample: x_{t_prev}, ``(B, C, H, W[, D])`` (x_0 itself when ``t_prev = -1``).
        pred_x0: the x_0 estimate at t used by the step (clipped when asked).
    """

    prev_sample: Tensor
    pred_x0: Tensor


def ddpm_step(
    schedule: NoiseSchedule,
    model_output: Tensor,
    x_t: Tensor,
    t: int | Tensor,
    t_prev: int | Tensor,
    *,
    noise: Tensor | None = None,
    prediction_type: str = "epsilon",
    clip_range: tuple[float, float] | None = None,
) -> StepResult:
    """Ancestral DDPM step (Ho et al. 2020, Algorithm 2) with "fixed_small" variance.

    x_{t_prev} = mu tilde(x_t, x_0_hat) + sqrt(beta tilde) z, with the posterior of
    :func:`q_posterior_mean_variance`; ``t_prev = t - 1`` is Ho et al.'s step (equal to
    ``monai.networks.schedulers.DDPMScheduler.step``), a larger gap is the strided DDPM.

    Args:
        schedule: the noise schedule.
        model_output: network output at (x_t, t).
        x_t: current sample, ``(B, C, H, W[, D])``.
        t: current timesteps, an int or ``(B,)`` long.
        t_prev: target timesteps, ``-1 <= t_prev < t``.
        noise: z, same shape as ``x_t`` (Gaussian, or simplex as in AnoDDPM); needed unless
            every ``t_prev`` is -1.
        prediction_type: how to read ``model_output``.
        clip_range: clamp the x_0 estimate to ``(low, high)``; ``None`` disables.

    Returns:
        x_{t_prev} and the x_0 estimate.
    """
    batch, device = x_t.shape[0], x_t.device
    t = batch_timesteps(t, batch, device)
    t_prev = batch_timesteps(t_prev, batch, device)
    x0 = predict_x0(schedule, model_output, x_t, t, prediction_type=prediction_type)
    if clip_range is not None:
        x0 = x0.clamp(clip_range[0], clip_range[1])
    posterior = q_posterior_mean_variance(schedule, x0, x_t, t, t_prev)
    if bool((t_prev < 0).all()):  # last step: the posterior is a point mass at x_0
        return StepResult(prev_sample=posterior.mean, pred_x0=x0)
    if noise is None:
        raise ValueError("ddpm_step needs noise for a step to t_prev >= 0")
    return StepResult(prev_sample=posterior.mean + posterior.variance.sqrt() * noise, pred_x0=x0)


def ddim_step(
    schedule: NoiseSchedule,
    model_output: Tensor,
    x_t: Tensor,
    t: int | Tensor,
    t_prev: int | Tensor,
    *,
    eta: float = 0.0,
    noise: Tensor | None = None,
    prediction_type: str = "epsilon",
    clip_range: tuple[float, float] | None = None,
) -> StepResult:
    """DDIM step (Song et al. 2021, eq. 12) between any two timesteps t -> t_prev.

        x_{t_prev} = sqrt(alpha_bar') x_0_hat + sqrt(1 - alpha_bar' - sigma^2) eps_hat + sigma z
        sigma = eta sqrt((1 - alpha_bar') / (1 - alpha_bar)) sqrt(1 - alpha_bar / alpha_bar')

    with alpha_bar = alpha_bar_t and alpha_bar' = alpha_bar_{t_prev} (1 at ``t_prev = -1``).
    ``eta = 0`` is deterministic; ``eta = 1`` is the (strided) DDPM posterior.

    Args:
        schedule: the noise schedule.
        model_output: network output at (x_t, t).
        x_t: current sample, ``(B, C, H, W[, D])``.
        t: current timesteps, an int or ``(B,)`` long.
        t_prev: target timesteps, ``-1 <= t_prev < t``.
        eta: stochasticity, ``>= 0``.
        noise: z, same shape as ``x_t``; needed when ``eta > 0``.
        prediction_type: how to read ``model_output``.
        clip_range: clamp the x_0 estimate to ``(low, high)`` (eps is then re-derived from the
            clipped x_0); ``None`` disables.

    Returns:
        x_{t_prev} and the x_0 estimate.
    """
    batch, device = x_t.shape[0], x_t.device
    t = batch_timesteps(t, batch, device)
    t_prev = batch_timesteps(t_prev, batch, device)
    x0, eps = x0_and_eps(schedule, model_output, x_t, t, prediction_type, clip_range)
    alpha_bar = alpha_bar_at(schedule, t)
    alpha_bar_prev = alpha_bar_at(schedule, t_prev)
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
    direction = (1 - alpha_bar_prev - sigma**2).clamp_min(0).sqrt()  # "direction pointing to x_t"
    prev = expand(alpha_bar_prev.sqrt(), x_t) * x0 + expand(direction, x_t) * eps
    if eta > 0 and bool((t_prev >= 0).any()):
        if noise is None:
            raise ValueError("ddim_step needs noise when eta > 0")
        prev = prev + expand(sigma, x_t) * noise
    return StepResult(prev_sample=prev, pred_x0=x0)


def dpm_solver_2m_step(
    schedule: NoiseSchedule,
    model_output: Tensor,
    x_t: Tensor,
    t: int | Tensor,
    t_prev: int | Tensor,
    *,
    earlier_pred_x0: Tensor | None = None,
    earlier_t: int | Tensor | None = None,
    prediction_type: str = "epsilon",
    clip_range: tuple[float, float] | None = None,
) -> StepResult:
    """DPM-Solver++(2M) step (Lu et al. 2022, Algorithm 2): multistep, data prediction.

    With alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lambda = log(alpha / sigma),
    h = lambda_{t_prev} - lambda_t and D the x_0 estimate,

        x_{t_prev} = (sigma_{t_prev} / sigma_t) x_t + alpha_{t_prev} (1 - e^{-h}) D

    First order (``earlier_pred_x0`` is None, or ``t_prev = -1`` where lambda is infinite):
    D = x_0_hat(t), the same update as DDIM with eta = 0. Second order: with the estimate
    x_0_hat(t_earlier) from the previous step, r = (lambda_t - lambda_{t_earlier}) / h and
    D = (1 + 1/(2r)) x_0_hat(t) - 1/(2r) x_0_hat(t_earlier).

    Args:
        schedule: the noise schedule.
        model_output: network output at (x_t, t).
        x_t: current sample, ``(B, C, H, W[, D])``.
        t: current timesteps, an int or ``(B,)`` long.
        t_prev: target timesteps, ``-1 <= t_prev < t``.
        earlier_pred_x0: the previous step's ``pred_x0`` (at ``earlier_t > t``), or None.
        earlier_t: the timestep of ``earlier_pred_x0``.
        prediction_type: how to read ``model_output``.
        clip_range: clamp the x_0 estimate to ``(low, high)``; ``None`` disables.

    Returns:
        x_{t_prev} and the x_0 estimate at t (the one to pass as ``earlier_pred_x0`` next).
    """
    batch, device = x_t.shape[0], x_t.device
    t = batch_timesteps(t, batch, device)
    t_prev = batch_timesteps(t_prev, batch, device)
    x0 = predict_x0(schedule, model_output, x_t, t, prediction_type=prediction_type)
    if clip_range is not None:
        x0 = x0.clamp(clip_range[0], clip_range[1])

    alpha_bar, alpha_bar_prev = alpha_bar_at(schedule, t), alpha_bar_at(schedule, t_prev)
    alpha_t, sigma_t = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    alpha_p, sigma_p = alpha_bar_prev.sqrt(), (1 - alpha_bar_prev).sqrt()
    # e^{-h} = (sigma_p / alpha_p) / (sigma_t / alpha_t): 0 at t_prev = -1, no infinities.
    exp_neg_h = (sigma_p * alpha_t) / (alpha_p * sigma_t)

    d = x0
    if earlier_pred_x0 is not None:
        if earlier_t is None:
            raise ValueError("dpm_solver_2m_step needs earlier_t with earlier_pred_x0")
        earlier_t = batch_timesteps(earlier_t, batch, device)
        second = t_prev >= 0  # the final step to clean data stays first order

        def log_snr(ab: Tensor) -> Tensor:  # lambda = log(alpha / sigma)
            return 0.5 * (torch.log(ab) - torch.log1p(-ab))

        lam_t = log_snr(alpha_bar)
        lam_prev = log_snr(alpha_bar_at(schedule, torch.where(second, t_prev, t - 1).clamp_min(0)))
        lam_earlier = log_snr(alpha_bar_at(schedule, earlier_t))
        r = (lam_t - lam_earlier) / (lam_prev - lam_t)
        w = torch.where(second, 0.5 / r, torch.zeros_like(r))  # 1 / (2r), 0 where first order
        d = (1 + expand(w, x_t)) * x0 - expand(w, x_t) * earlier_pred_x0

    prev = expand(sigma_p / sigma_t, x_t) * x_t + expand(alpha_p * (1 - exp_neg_h), x_t) * d
    return StepResult(prev_sample=prev, pred_x0=x0)


def euler_step(
    schedule: NoiseSchedule,
    model_output: Tensor,
    x_t: Tensor,
    t: int | Tensor,
    t_prev: int | Tensor,
    *,
    prediction_type: str = "flow",
    clip_range: tuple[float, float] | None = None,
) -> StepResult:
    """Euler step of a rectified-flow model (Liu et al. 2023) from flow time s to s'.

    With s = (t + 1) / T and s' = (t_prev + 1) / T (:func:`~medidiff.diffusion.flow.flow_time`;
    ``t_prev = -1`` is s' = 0, clean data) and the velocity u = ``model_output``:

        x_{s'} = x_s + (s - s') u,        x_0_hat = x_s + s u.

    The step lands on x_0_hat when s' = 0. With ``clip_range`` the x_0 estimate is clamped
    and the step is written as x_{s'} = (1 - s') x_0_hat + s' eps_hat with
    eps_hat = (x_s - (1 - s) x_0_hat) / s (the same update when nothing is clamped; DDIM's
    eta = 0 step on the straight path).

    Args:
        schedule: the noise schedule (only its T is used).
        model_output: the velocity u at (x_s, t).
        x_t: current sample x_s, ``(B, C, H, W[, D])``.
        t: current timesteps, an int or ``(B,)`` long.
        t_prev: target timesteps, ``-1 <= t_prev < t``.
        prediction_type: must be ``"flow"``.
        clip_range: clamp the x_0 estimate to ``(low, high)``; ``None`` disables.

    Returns:
        x_{t_prev} and the x_0 estimate.

    Raises:
        ConfigError: a prediction type other than ``"flow"``.
    """
    EulerSampler.check_prediction_type(prediction_type)
    batch, device = x_t.shape[0], x_t.device
    t = batch_timesteps(t, batch, device)
    t_prev = batch_timesteps(t_prev, batch, device)
    T = schedule.num_train_timesteps
    s, s_prev = flow_time(t, T), flow_time(t_prev, T)
    x0, eps = x0_and_eps(schedule, model_output, x_t, t, prediction_type, clip_range)
    if clip_range is None:
        prev = x_t + expand((s - s_prev).to(x_t.dtype), x_t) * model_output
    else:
        s_prev = expand(s_prev.to(x_t.dtype), x_t)
        prev = (1 - s_prev) * x0 + s_prev * eps
    return StepResult(prev_sample=prev, pred_x0=x0)


# --------------------------------------------------------------------------------------------
# One object per sampler
# --------------------------------------------------------------------------------------------


class Sampler:
    """A reverse sampler for one run of the reverse process (it may keep state between steps).

    Args:
        schedule: the noise schedule, already on the sampling device and dtype.
        prediction_type: how to read the network's output.
        clip_range: clamp every x_0 estimate to ``(low, high)``; ``None`` disables.
        eta: stochasticity (used by DDIM; ignored by the others).

    Subclasses set :attr:`name` and implement :meth:`step`; they override
    :meth:`needs_noise` when a step draws noise and :attr:`max_steps` when they take a
    fixed number of evaluations.
    """

    #: the name in :data:`medidiff.constants.SAMPLERS`
    name: ClassVar[str] = ""
    #: the most network evaluations this sampler can make (``None``: any)
    max_steps: ClassVar[int | None] = None
    #: the models it samples: ``False`` diffusion models only, ``True`` rectified-flow
    #: models (``prediction_type: flow``) only, ``None`` both
    for_flow: ClassVar[bool | None] = False

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        prediction_type: str = "epsilon",
        clip_range: tuple[float, float] | None = None,
        eta: float = 0.0,
    ) -> None:
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.clip_range = clip_range
        self.eta = eta

    @classmethod
    def check_steps(cls, steps: int | None) -> None:
        """Raise ConfigError when this sampler cannot make ``steps`` evaluations."""
        if cls.max_steps is not None and steps not in (None, *range(1, cls.max_steps + 1)):
            raise ConfigError(
                f"the {cls.name!r} sampler takes exactly one step; got steps={steps}"
                if cls.max_steps == 1
                else f"the {cls.name!r} sampler takes at most {cls.max_steps} steps; got steps={steps}"
            )

    @classmethod
    def accepts(cls, prediction_type: str) -> bool:
        """Whether this sampler can sample a model of ``prediction_type``."""
        return cls.for_flow is None or cls.for_flow == is_flow(prediction_type)

    @classmethod
    def check_prediction_type(cls, prediction_type: str) -> None:
        """Raise ConfigError, naming the samplers that fit, when this one cannot sample a
        model of ``prediction_type``."""
        if cls.accepts(prediction_type):
            return
        fits = ", ".join(n for n, c in SAMPLER_CLASSES.items() if c.accepts(prediction_type))
        if is_flow(prediction_type):
            raise ConfigError(
                f"sampler {cls.name!r} cannot sample a rectified-flow model (prediction_type "
                f"'flow'); use {fits}"
            )
        raise ConfigError(
            f"sampler {cls.name!r} integrates rectified-flow models (prediction_type 'flow'); "
            f"this model predicts {prediction_type!r}: use {fits}"
        )

    def timesteps(self, t_start: int, steps: int | None, spacing: str = "trailing") -> list[int]:
        """The timesteps visited from ``t_start``, noisiest first (``steps=None``: every one).

        Args:
            t_start: the first timestep, ``0 .. T-1``.
            steps: network evaluations, ``1 .. t_start + 1``, or ``None``.
            spacing: see :func:`inference_timesteps`.

        Returns:
            The visited timesteps as ints; after the last one the sampler steps to -1.
        """
        count = steps or t_start + 1
        if self.max_steps is not None:
            count = min(count, self.max_steps)
        return [int(s) for s in inference_timesteps(t_start, count, spacing).tolist()]

    def needs_noise(self, t_prev: int) -> bool:
        """Whether the step to ``t_prev`` draws noise z (the loop then passes ``noise``)."""
        return False

    def step(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, t_prev: int, noise: Tensor | None
    ) -> StepResult:
        """One reverse step x_t -> x_{t_prev}.

        Args:
            model_output: the network's output at (x_t, t), ``(B, C, H, W[, D])``.
            x_t: the current sample, same shape.
            t: the current timesteps, ``(B,)`` long.
            t_prev: the target timestep, ``-1 <= t_prev < t``.
            noise: z of the step's noise kind when :meth:`needs_noise`, else ``None``.

        Returns:
            x_{t_prev} and the x_0 estimate at t.
        """
        raise NotImplementedError

    @property
    def _read(self) -> dict:
        return {"prediction_type": self.prediction_type, "clip_range": self.clip_range}


class DDPMSampler(Sampler):
    """Ancestral DDPM (Ho et al. 2020, Algorithm 2), see :func:`ddpm_step`; its step noise
    has the kind the loop draws (simplex in AnoDDPM)."""

    name = "ddpm"

    def needs_noise(self, t_prev: int) -> bool:
        return t_prev >= 0

    def step(self, model_output, x_t, t, t_prev, noise):  # noqa: D102 - see Sampler.step
        return ddpm_step(self.schedule, model_output, x_t, t, t_prev, noise=noise, **self._read)


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021), see :func:`ddim_step`; noise only when ``eta > 0``."""

    name = "ddim"

    def needs_noise(self, t_prev: int) -> bool:
        return self.eta > 0 and t_prev >= 0

    def step(self, model_output, x_t, t, t_prev, noise):  # noqa: D102 - see Sampler.step
        return ddim_step(
            self.schedule, model_output, x_t, t, t_prev, eta=self.eta, noise=noise, **self._read
        )


class DPMSolver2MSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022), see :func:`dpm_solver_2m_step`; remembers the
    previous step's x_0 estimate for its second-order update."""

    name = "dpm++2m"

    def __init__(self, schedule: NoiseSchedule, **kwargs) -> None:
        super().__init__(schedule, **kwargs)
        self._earlier: tuple[Tensor, Tensor] | None = None  # previous (x_0 estimate, t)

    def step(self, model_output, x_t, t, t_prev, noise):  # noqa: D102 - see Sampler.step
        earlier_x0, earlier_t = self._earlier if self._earlier is not None else (None, None)
        result = dpm_solver_2m_step(
            self.schedule, model_output, x_t, t, t_prev,
            earlier_pred_x0=earlier_x0, earlier_t=earlier_t, **self._read,
        )
        self._earlier = (result.pred_x0, t)
        return result


class X0Sampler(Sampler):
    """One shot: x_0 predicted straight from x_t (one network evaluation); for a flow model
    x_0 = x_s + s u, REFLECT's one-step reconstruction."""

    name = "x0"
    max_steps = 1
    for_flow = None

    def step(self, model_output, x_t, t, t_prev, noise):  # noqa: D102 - see Sampler.step
        x0 = predict_x0(self.schedule, model_output, x_t, t, prediction_type=self.prediction_type)
        if self.clip_range is not None:
            x0 = x0.clamp(self.clip_range[0], self.clip_range[1])
        return StepResult(prev_sample=x0, pred_x0=x0)


class EulerSampler(Sampler):
    """Rectified flow: Euler steps x_{s'} = x_s + (s - s') u (see :func:`euler_step`);
    deterministic, no step noise. MAISI-v2 generates CT with 30 such steps."""

    name = "euler"
    for_flow = True

    def step(self, model_output, x_t, t, t_prev, noise):  # noqa: D102 - see Sampler.step
        return euler_step(self.schedule, model_output, x_t, t, t_prev, **self._read)


#: Every sampler of :data:`medidiff.constants.SAMPLERS`, by name.
SAMPLER_CLASSES: dict[str, type[Sampler]] = {
    cls.name: cls
    for cls in (DDPMSampler, DDIMSampler, DPMSolver2MSampler, X0Sampler, EulerSampler)
}


def sampler_class(name: str) -> type[Sampler]:
    """The :class:`Sampler` subclass called ``name``.

    Raises:
        ConfigError: an unknown name, with the known ones.
    """
    if name not in SAMPLERS or name not in SAMPLER_CLASSES:
        raise ConfigError(f"sampler {name!r} is unknown; use one of {', '.join(SAMPLERS)}")
    return SAMPLER_CLASSES[name]


def make_sampler(name: str, schedule: NoiseSchedule, **kwargs) -> Sampler:
    """A fresh :class:`Sampler` called ``name`` (keyword arguments as :class:`Sampler`)."""
    return sampler_class(name)(schedule, **kwargs)


def sampler_for(prediction_type: str, requested: str | None = None, default: str = "ddim") -> str:
    """The sampler to use for a model of ``prediction_type``.

    ``requested`` (what the user asked for) is returned when it fits the model; ``None``
    takes ``default`` (a caller's usual sampler, e.g. ``"ddim"``) when it fits, else the
    model's generative sampler: ``"euler"`` for rectified-flow models, ``"ddim"`` otherwise.

    Example:
        >>> sampler_for("flow"), sampler_for("flow", default="x0"), sampler_for("epsilon")
        ('euler', 'x0', 'ddim')

    Raises:
        ConfigError: an unknown name, or a requested sampler that cannot sample this model.
    """
    if requested is not None:
        sampler_class(requested).check_prediction_type(prediction_type)
        return requested
    if sampler_class(default).accepts(prediction_type):
        return default
    return "euler" if is_flow(prediction_type) else "ddim"
