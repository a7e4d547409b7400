"""The diffusion maths: schedules, the forward process, prediction types and samplers.

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"; Song et al. 2021,
"Denoising Diffusion Implicit Models"; Lu et al. 2022, "DPM-Solver++"):

- ``t`` indexes the ``T`` training timesteps as MONAI does, ``0 .. T-1``; index ``t`` is the
  paper's step ``t + 1``. ``t = -1`` stands for clean data, where alpha_bar = 1.
- beta_t: the variance added at step t; alpha_t = 1 - beta_t;
  alpha_bar_t = prod_{s <= t} alpha_s.
- Forward process q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), i.e.
  x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps. eps is usually Gaussian; AnoDDPM
  uses simplex noise instead (:mod:`medidiff.diffusion.noise`).
- The network is a callable ``model_fn(x_t, t) -> model_output`` (``t`` a ``(B,)`` long
  tensor) whose output is read according to its prediction type: ``"epsilon"``
  (eps_theta), ``"sample"`` (x_0 directly) or ``"v_prediction"``
  (v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0; Salimans & Ho 2022).

The step functions are written here rather than taken from MONAI's schedulers because the
samplers need things those do not offer: a step between any pair of timesteps t -> t_prev
(MONAI's DDIM step always goes to t - T // k, which in MONAI 1.6 does not always match the
next entry of its own linspace list: 979 -> 959, then 958), ancestral noise of a chosen kind
(simplex), per-sample random streams, and no hidden ``clip_sample=True`` default. They are
tested against ``monai.networks.schedulers`` step for step. Sampling lists start exactly at
the requested timestep (``"trailing"`` spacing), never at T - T/k as the leading spacing of
older MONAI releases did (MONAI #8600; GenerativeModels #397).

Example:
    >>> import torch
    >>> schedule = NoiseSchedule.create("linear_beta", num_train_timesteps=100)
    >>> x0 = torch.zeros(2, 1, 8, 8)
    >>> oracle = lambda x_t, t: predict_eps(
    ...     schedule, x0, x_t, t, prediction_type="sample")  # knows the answer
    >>> result = sample(oracle, schedule, (2, 1, 8, 8), steps=5, seeds=[0, 1])
    >>> (result.nfe, bool(result.sample.abs().max() < 1e-4))
    (5, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from medidiff.errors import ConfigError
from medidiff.diffusion.noise import NoiseSpec, per_sample_generators, sample_noise

__all__ = [
    "GAUSSIAN_NOISE",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SCHEDULES",
    "SPACINGS",
    "Gaussian",
    "ModelFn",
    "NoiseSchedule",
    "Reconstruction",
    "SampleResult",
    "StepResult",
    "alpha_bar_at",
    "ddim_step",
    "ddpm_step",
    "denoise",
    "dpm_solver_2m_step",
    "extract",
    "guided_model_fn",
    "inference_timesteps",
    "partial_reconstruction",
    "predict_eps",
    "predict_x0",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "resolve_null_label",
    "sample",
    "training_target",
]

SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SAMPLERS = ("ddpm", "ddim", "dpm++2m", "x0")
SPACINGS = ("trailing", "linspace")

#: The default noise of the samplers: white Gaussian eps ~ N(0, I).
GAUSSIAN_NOISE = NoiseSpec("gaussian")

#: A denoising network as the samplers see it: ``(x_t (B, C, ...), t (B,) long) -> output``.
ModelFn = Callable[[Tensor, Tensor], Tensor]
#: ``callback(t, x_t, pred_x0)``: observes one reverse step (see :func:`sample`)
StepCallback = Callable[[int, Tensor, Tensor], None]

# --------------------------------------------------------------------------------------------
# Noise schedules (computed in float64)
# --------------------------------------------------------------------------------------------


def _linear_beta(num_steps: int, beta_start: float, beta_end: float) -> Tensor:
    """beta_t linear in t from beta_start to beta_end (Ho et al. 2020: 1e-4 to 0.02)."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def _scaled_linear_beta(num_steps: int, beta_start: float, beta_end: float) -> Tensor:
    """sqrt(beta_t) linear in t (latent diffusion's schedule; MONAI's and diffusers' name)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2


def _sigmoid_beta(num_steps: int, beta_start: float, beta_end: float) -> Tensor:
    """beta_t on a sigmoid over [-6, 6] from beta_start to beta_end (MONAI's sigmoid_beta)."""
    x = torch.linspace(-6.0, 6.0, num_steps, dtype=torch.float64)
    return torch.sigmoid(x) * (beta_end - beta_start) + beta_start


def _cosine_beta(num_steps: int, s: float) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2).

    beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped to at most 0.999 to avoid a
    singularity at t = T.
    """
    steps = torch.linspace(0, num_steps, num_steps + 1, dtype=torch.float64)
    f = torch.cos((steps / num_steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clip(0.0, 0.999)


@dataclass(frozen=True, eq=False, repr=False)
class NoiseSchedule:
    """The variance schedule beta_1..beta_T and the constants derived from it.

    Build one with :meth:`NoiseSchedule.create`; the tensors are float64 on the CPU until
    :meth:`to` casts them, once, for the device the sampler runs on.

    Attributes:
        name: schedule name, one of :data:`SCHEDULES` (MONAI's names).
        betas: beta_t, shape ``(T,)``.
        alphas: alpha_t = 1 - beta_t, shape ``(T,)``.
        alphas_cumprod: alpha_bar_t = prod_{s <= t} alpha_s, shape ``(T,)``.
        beta_start: first beta of the linear-type schedules (unused by ``cosine``).
        beta_end: last beta of the linear-type schedules (unused by ``cosine``).
        cosine_s: the offset s of the ``cosine`` schedule (unused by the others).
    """

    name: str
    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    cosine_s: float = 8e-3

    @classmethod
    def create(
        cls,
        name: str = "linear_beta",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 2e-2,
        *,
        cosine_s: float = 8e-3,
    ) -> NoiseSchedule:
        """Compute a named schedule in float64.

        Args:
            name: ``"linear_beta"``, ``"scaled_linear_beta"``, ``"sigmoid_beta"`` or
                ``"cosine"`` (as ``monai.networks.schedulers.NoiseSchedules``).
            num_train_timesteps: T, the number of training timesteps.
            beta_start: beta of the first step (linear-type schedules).
            beta_end: beta of the last step (linear-type schedules).
            cosine_s: offset s of the cosine schedule (Nichol & Dhariwal: 0.008).

        Returns:
            The schedule, float64 on the CPU.

        Raises:
            ConfigError: unknown name or out-of-range values.
        """
        if name not in SCHEDULES:
            raise ConfigError(
                f"noise schedule {name!r} is unknown; use one of {', '.join(SCHEDULES)}"
            )
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int):
            raise ConfigError(
                f"num_train_timesteps must be an integer, got {num_train_timesteps!r}"
            )
        if num_train_timesteps < 2:
            raise ConfigError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        if name == "cosine":
            if not 0.0 <= cosine_s < 1.0:
                raise ConfigError(f"cosine_s must be in [0, 1), got {cosine_s!r}")
            betas = _cosine_beta(num_train_timesteps, cosine_s)
        else:
            if not 0.0 < beta_start <= beta_end < 1.0:
                raise ConfigError(
                    f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start!r}, "
                    f"beta_end={beta_end!r}"
                )
            make = {
                "linear_beta": _linear_beta,
                "scaled_linear_beta": _scaled_linear_beta,
                "sigmoid_beta": _sigmoid_beta,
            }[name]
            betas = make(num_train_timesteps, beta_start, beta_end)
        alphas = 1.0 - betas  # alpha_t
        alphas_cumprod = torch.cumprod(alphas, dim=0)  # alpha_bar_t
        return cls(
            name=name,
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            beta_start=float(beta_start),
            beta_end=float(beta_end),
            cosine_s=float(cosine_s),
        )

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of training timesteps."""
        return int(self.betas.shape[0])

    @property
    def device(self) -> torch.device:
        """Where the schedule's tensors live."""
        return self.betas.device

    @property
    def dtype(self) -> torch.dtype:
        """The schedule tensors' dtype (float64 until :meth:`to`)."""
        return self.betas.dtype

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> NoiseSchedule:
        """The same schedule with its tensors cast to ``dtype`` on ``device``.

        Args:
            device: target device.
            dtype: target dtype; float32 by default (cast once, up front).

        Returns:
            ``self`` when nothing changes, else a new schedule.
        """
        device = torch.device(device)
        same_device = self.device == device or (
            device.index is None and self.device.type == device.type
        )
        if same_device and self.dtype == dtype:
            return self
        return replace(
            self,
            betas=self.betas.to(device=device, dtype=dtype),
            alphas=self.alphas.to(device=device, dtype=dtype),
            alphas_cumprod=self.alphas_cumprod.to(device=device, dtype=dtype),
        )

    def config(self) -> dict[str, object]:
        """The arguments that rebuild this schedule with :meth:`create` (for checkpoints)."""
        return {
            "name": self.name,
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "cosine_s": self.cosine_s,
        }

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(name={self.name!r}, num_train_timesteps={self.num_train_timesteps}, "
            f"dtype={self.dtype}, device={self.device})"
        )


# --------------------------------------------------------------------------------------------
# Per-timestep constants, broadcast over a batch
# --------------------------------------------------------------------------------------------


def extract(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """Pick per-sample constants ``values[t]`` and shape them to broadcast against ``like``.

    Args:
        values: a per-timestep constant, shape ``(T,)`` (e.g. ``schedule.alphas_cumprod``).
        t: timesteps, shape ``(B,)`` long.
        like: a tensor of shape ``(B, C, H, W[, D])`` (any number of dims).

    Returns:
        ``values[t]`` of shape ``(B, 1, ..., 1)`` with ``like.ndim`` dims, on ``like``'s
        device and dtype.
    """
    return _expand(values[t.to(values.device)], like)


def _expand(per_sample: Tensor, like: Tensor) -> Tensor:
    """Reshape a ``(B,)`` tensor to ``(B, 1, ..., 1)`` and cast it to ``like``."""
    shape = (per_sample.shape[0],) + (1,) * (like.ndim - 1)
    return per_sample.to(device=like.device, dtype=like.dtype).reshape(shape)


def alpha_bar_at(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """alpha_bar_t for each sample, with alpha_bar = 1 at ``t = -1`` (clean data).

    Args:
        schedule: the noise schedule.
        t: timesteps in ``-1 .. T-1``, shape ``(B,)`` long.

    Returns:
        ``(B,)`` tensor in the schedule's dtype and on its device.
    """
    alpha_bar = schedule.alphas_cumprod
    t = t.to(alpha_bar.device)
    one = torch.ones((), dtype=alpha_bar.dtype, device=alpha_bar.device)
    return torch.where(t >= 0, alpha_bar[t.clamp_min(0)], one)


def _batch_timesteps(t: int | Tensor, batch: int, device: torch.device) -> Tensor:
    """An int, a 0-d tensor or a (B,) tensor of timesteps as a (B,) long tensor."""
    if not torch.is_tensor(t):
        return torch.full((batch,), int(t), dtype=torch.long, device=device)
    t = t.to(device=device, dtype=torch.long)
    return t.expand(batch) if t.ndim == 0 else t


# --------------------------------------------------------------------------------------------
# Forward process q(x_t | x_0)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gaussian:
    """A diagonal Gaussian N(mean, variance).

    Attributes:
        mean: ``(B, C, H, W[, D])``.
        variance: ``(B, 1, ..., 1)``, broadcastable to ``mean``.
    """

    mean: Tensor
    variance: Tensor


def q_sample(schedule: NoiseSchedule, x0: Tensor, t: int | Tensor, noise: Tensor) -> Tensor:
    """Noise clean data to timestep t: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

    Args:
        schedule: the noise schedule.
        x0: clean data x_0, ``(B, C, H, W[, D])``.
        t: timesteps, an int or ``(B,)`` long.
        noise: eps of the same shape as ``x0``, Gaussian or simplex.

    Returns:
        x_t, same shape as ``x0``.
    """
    t = _batch_timesteps(t, x0.shape[0], x0.device)
    alpha_bar = alpha_bar_at(schedule, t)
    return _expand(alpha_bar.sqrt(), x0) * x0 + _expand((1 - alpha_bar).sqrt(), x0) * noise


def q_mean_variance(schedule: NoiseSchedule, x0: Tensor, t: int | Tensor) -> Gaussian:
    """Mean and variance of q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I).

    Args:
        schedule: the noise schedule.
        x0: clean data x_0, ``(B, C, H, W[, D])``.
        t: timesteps, an int or ``(B,)`` long.

    Returns:
        The Gaussian, ``variance`` shaped ``(B, 1, ..., 1)``.
    """
    t = _batch_timesteps(t, x0.shape[0], x0.device)
    alpha_bar = alpha_bar_at(schedule, t)
    return Gaussian(mean=_expand(alpha_bar.sqrt(), x0) * x0, variance=_expand(1 - alpha_bar, x0))


def q_posterior_mean_variance(
    schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: int | Tensor, t_prev: int | Tensor
) -> Gaussian:
    """The forward-process posterior q(x_{t_prev} | x_t, x_0) (Ho et al. eqs. 6-7).

    For any t_prev < t (not only t - 1): with alpha_bar = alpha_bar_t,
    alpha_bar' = alpha_bar_{t_prev} and beta = 1 - alpha_bar / alpha_bar' the variance of the
    (possibly strided) transition t_prev -> t,

        mean     = sqrt(alpha_bar') beta / (1 - alpha_bar) x_0
                   + sqrt(1 - beta) (1 - alpha_bar') / (1 - alpha_bar) x_t
        variance = (1 - alpha_bar') / (1 - alpha_bar) beta        (beta tilde)

    At t_prev = t - 1 these are Ho et al.'s mu tilde_t and beta tilde_t; at t_prev = -1 the
    mean is x_0 and the variance 0.

    Args:
        schedule: the noise schedule.
        x0: clean data (or its estimate), ``(B, C, H, W[, D])``.
        x_t: noisy data at t, same shape.
        t: current timesteps, an int or ``(B,)`` long.
        t_prev: earlier timesteps, ``-1 <= t_prev < t``.

    Returns:
        The posterior Gaussian.
    """
    batch, device = x_t.shape[0], x_t.device
    alpha_bar = alpha_bar_at(schedule, _batch_timesteps(t, batch, device))
    alpha_bar_prev = alpha_bar_at(schedule, _batch_timesteps(t_prev, batch, device))
    beta = 1 - alpha_bar / alpha_bar_prev  # variance of the transition t_prev -> t
    coef_x0 = alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)
    coef_xt = (1 - beta).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * beta
    mean = _expand(coef_x0, x_t) * x0 + _expand(coef_xt, x_t) * x_t
    return Gaussian(mean=mean, variance=_expand(variance, x_t))


# --------------------------------------------------------------------------------------------
# Prediction types: what the network outputs, and how to read it
# --------------------------------------------------------------------------------------------


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"prediction_type {prediction_type!r} is unknown; use one of {', '.join(PREDICTION_TYPES)}"
        )


def _alpha_sigma(schedule: NoiseSchedule, t: int | Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped ``(B, 1, ..., 1)`` like ``like``."""
    alpha_bar = alpha_bar_at(schedule, _batch_timesteps(t, like.shape[0], like.device))
    return _expand(alpha_bar.sqrt(), like), _expand((1 - alpha_bar).sqrt(), like)


def training_target(
    schedule: NoiseSchedule,
    x0: Tensor,
    t: int | Tensor,
    noise: Tensor,
    *,
    prediction_type: str = "epsilon",
) -> Tensor:
    """What the network should output for x_t = q_sample(schedule, x0, t, noise).

    ``"epsilon"``: eps; ``"sample"``: x_0; ``"v_prediction"``:
    v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0.

    Args:
        schedule: the noise schedule.
        x0: clean data, ``(B, C, H, W[, D])``.
        t: timesteps, an int or ``(B,)`` long.
        noise: eps used to make x_t, same shape as ``x0``.
        prediction_type: one of :data:`PREDICTION_TYPES`.

    Returns:
        The regression target, same shape as ``x0``.
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    alpha, sigma = _alpha_sigma(schedule, t, x0)
    return alpha * noise - sigma * x0


def predict_x0(
    schedule: NoiseSchedule,
    model_output: Tensor,
    x_t: Tensor,
    t: int | Tensor,
    *,
    prediction_type: str = "epsilon",
) -> Tensor:
    """The x_0 estimate implied by a model output (Ho et al. eq. 15 for eps).

    ``"epsilon"``: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t);
    ``"sample"``: x_0 = output; ``"v_prediction"``:
    x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v.

    Args:
        schedule: the noise schedule.
        model_output: the network's output at (x_t, t), ``(B, C, H, W[, D])``.
        x_t: noisy input, same shape.
        t: timesteps, an int or ``(B,)`` long.
        prediction_type: one of :data:`PREDICTION_TYPES`.

    Returns:
        x_0 estimate, same shape as ``x_t``.
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "sample":
        return model_output
    alpha, sigma = _alpha_sigma(schedule, t, x_t)
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha
    return alpha * x_t - sigma * model_output


def predict_eps(
    schedule: NoiseSchedule,
    model_output: Tensor,
    x_t: Tensor,
    t: int | Tensor,
    *,
    prediction_type: str = "epsilon",
) -> Tensor:
    """The eps estimate implied by a model output.

    ``"epsilon"``: eps = output; ``"sample"``:
    eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t); ``"v_prediction"``:
    eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v.

    Args:
        schedule: the noise schedule.
        model_output: the network's output at (x_t, t), ``(B, C, H, W[, D])``.
        x_t: noisy input, same shape.
        t: timesteps (``>= 0``), an int or ``(B,)`` long.
        prediction_type: one of :data:`PREDICTION_TYPES`.

    Returns:
        eps estimate, same shape as ``x_t``.
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return model_output
    alpha, sigma = _alpha_sigma(schedule, t, x_t)
    if prediction_type == "sample":
        return (x_t - alpha * model_output) / sigma
    return sigma * x_t + alpha * model_output


def _x0_and_eps(
    schedule: NoiseSchedule,
    model_output: Tensor,
    x_t: Tensor,
    t: Tensor,
    prediction_type: str,
    clip_range: tuple[float, float] | None,
) -> tuple[Tensor, Tensor]:
    """x_0 and eps estimates; when x_0 is clipped, eps is re-derived from the clipped x_0
    so that both stay consistent with x_t (as improved-diffusion does)."""
    x0 = predict_x0(schedule, model_output, x_t, t, prediction_type=prediction_type)
    if clip_range is None:
        return x0, predict_eps(schedule, model_output, x_t, t, prediction_type=prediction_type)
    x0 = x0.clamp(clip_range[0], clip_range[1])
    return x0, predict_eps(schedule, x0, x_t, t, prediction_type="sample")


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
    t = _batch_timesteps(t, batch, device)
    t_prev = _batch_timesteps(t_prev, batch, device)
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
    t = _batch_timesteps(t, batch, device)
    t_prev = _batch_timesteps(t_prev, batch, device)
    x0, eps = _x0_and_eps(schedule, model_output, x_t, t, prediction_type, clip_range)
    alpha_bar = alpha_bar_at(schedule, t)
    alpha_bar_prev = alpha_bar_at(schedule, t_prev)
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
    direction = (1 - alpha_bar_prev - sigma**2).clamp_min(0).sqrt()  # "direction pointing to x_t"
    prev = _expand(alpha_bar_prev.sqrt(), x_t) * x0 + _expand(direction, x_t) * eps
    if eta > 0 and bool((t_prev >= 0).any()):
        if noise is None:
            raise ValueError("ddim_step needs noise when eta > 0")
        prev = prev + _expand(sigma, x_t) * noise
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
    t = _batch_timesteps(t, batch, device)
    t_prev = _batch_timesteps(t_prev, batch, device)
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
        earlier_t = _batch_timesteps(earlier_t, batch, device)
        second = t_prev >= 0  # the final step to clean data stays first order

        def log_snr(ab: Tensor) -> Tensor:  # lambda = log(alpha / sigma)
            return 0.5 * (torch.log(ab) - torch.log1p(-ab))

        lam_t = log_snr(alpha_bar)
        lam_prev = log_snr(alpha_bar_at(schedule, torch.where(second, t_prev, t - 1).clamp_min(0)))
        lam_earlier = log_snr(alpha_bar_at(schedule, earlier_t))
        r = (lam_t - lam_earlier) / (lam_prev - lam_t)
        w = torch.where(second, 0.5 / r, torch.zeros_like(r))  # 1 / (2r), 0 where first order
        d = (1 + _expand(w, x_t)) * x0 - _expand(w, x_t) * earlier_pred_x0

    prev = _expand(sigma_p / sigma_t, x_t) * x_t + _expand(alpha_p * (1 - exp_neg_h), x_t) * d
    return StepResult(prev_sample=prev, pred_x0=x0)


# --------------------------------------------------------------------------------------------
# Sampling loops
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleResult:
    """Samples generated from noise.

    Attributes:
        sample: x_0 samples, ``(B, C, H, W[, D])``.
        nfe: number of network evaluations (calls of ``model_fn``).
        timesteps: the timesteps visited, noisiest first.
    """

    sample: Tensor
    nfe: int
    timesteps: tuple[int, ...]


@dataclass(frozen=True)
class Reconstruction:
    """The result of denoising x_{t_start} back to clean data (partial diffusion).

    Attributes:
        reconstruction: the denoised result, ``(B, C, H, W[, D])``.
        pred_x0: the model's x_0 estimate at the first (noisiest) step, same shape.
        x_t: x_{t_start}, the noisy start of the reverse process, same shape.
        nfe: number of network evaluations (calls of ``model_fn``).
        timesteps: the timesteps visited, noisiest first.
    """

    reconstruction: Tensor
    pred_x0: Tensor
    x_t: Tensor
    nfe: int
    timesteps: tuple[int, ...]


class _CountingModel:
    """Wraps ``model_fn`` and counts its calls (so nfe is measured, not computed)."""

    def __init__(self, model_fn: ModelFn) -> None:
        self.model_fn = model_fn
        self.calls = 0

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.model_fn(x_t, t)


def _reverse(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x_t: Tensor,
    t_start: int,
    generators: list[torch.Generator],
    *,
    sampler: str,
    steps: int | None,
    noise_spec: NoiseSpec,
    eta: float,
    prediction_type: str,
    clip_range: tuple[float, float] | None,
    spacing: str,
    progress: bool,
    callback: StepCallback | None = None,
) -> Reconstruction:
    """Run the reverse process from x_t at ``t_start`` to t = -1 (clean data).

    The one loop behind :func:`sample`, :func:`denoise` and :func:`partial_reconstruction`.
    ``model_fn`` is wrapped so that ``nfe`` counts its actual calls. ``callback(t, x_t,
    pred_x0)`` sees every visited state before it is replaced.
    """
    model = _CountingModel(model_fn)
    batch, device = x_t.shape[0], x_t.device
    timesteps = inference_timesteps(
        t_start, 1 if sampler == "x0" else steps or t_start + 1, spacing
    )
    visits = [int(s) for s in timesteps.tolist()]
    targets = visits[1:] + [-1]  # t_prev of each step; the last step lands on clean data

    def step_noise() -> Tensor:  # z of a stochastic step, of the chosen noise kind, per sample
        return sample_noise(
            noise_spec, x_t.shape, generator=generators, device=device, dtype=x_t.dtype
        )

    pairs = zip(visits, targets)
    if progress:
        from tqdm.auto import tqdm

        pairs = tqdm(pairs, total=len(visits), desc=f"{sampler} sampling")

    x = x_t
    first_pred_x0: Tensor | None = None
    earlier: tuple[Tensor, Tensor] | None = None  # DPM-Solver++: previous (x_0 estimate, t)
    read = {"prediction_type": prediction_type, "clip_range": clip_range}  # how to read outputs
    for t_int, t_prev in pairs:
        t = torch.full((batch,), t_int, dtype=torch.long, device=device)
        output = model(x, t)
        if sampler == "x0":  # one shot: x_0 straight from x_t
            x0 = predict_x0(schedule, output, x, t, prediction_type=prediction_type)
            if clip_range is not None:
                x0 = x0.clamp(clip_range[0], clip_range[1])
            result = StepResult(prev_sample=x0, pred_x0=x0)
        elif sampler == "ddpm":
            noise = step_noise() if t_prev >= 0 else None
            result = ddpm_step(schedule, output, x, t, t_prev, noise=noise, **read)
        elif sampler == "ddim":
            noise = step_noise() if eta > 0 and t_prev >= 0 else None
            result = ddim_step(schedule, output, x, t, t_prev, eta=eta, noise=noise, **read)
        else:  # "dpm++2m"
            earlier_x0, earlier_t = earlier if earlier is not None else (None, None)
            result = dpm_solver_2m_step(
                schedule,
                output,
                x,
                t,
                t_prev,
                earlier_pred_x0=earlier_x0,
                earlier_t=earlier_t,
                **read,
            )
            earlier = (result.pred_x0, t)
        if first_pred_x0 is None:
            first_pred_x0 = result.pred_x0
        if callback is not None:
            callback(t_int, x, result.pred_x0)
        x = result.prev_sample

    assert first_pred_x0 is not None  # internal: the timestep list is never empty
    return Reconstruction(
        reconstruction=x, pred_x0=first_pred_x0, x_t=x_t, nfe=model.calls, timesteps=tuple(visits)
    )


def _check_sampling_args(
    schedule: NoiseSchedule,
    t_start: int,
    sampler: str,
    steps: int | None,
    eta: float,
    prediction_type: str,
    clip_range: tuple[float, float] | None,
) -> None:
    """Raise ConfigError, naming the argument, for any bad sampling argument."""
    T = schedule.num_train_timesteps
    if isinstance(t_start, bool) or not isinstance(t_start, int) or not 0 <= t_start < T:
        raise ConfigError(f"t_start must be an integer in 0 .. {T - 1}, got {t_start!r}")
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler {sampler!r} is unknown; use one of {', '.join(SAMPLERS)}")
    if sampler == "x0" and steps not in (None, 1):
        raise ConfigError(f"the 'x0' sampler takes exactly one step; got steps={steps}")
    if steps is not None and (
        isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= t_start + 1
    ):
        raise ConfigError(f"steps must be an integer in 1 .. {t_start + 1} or None, got {steps!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta < math.inf:
        raise ConfigError(f"eta must be a number >= 0, got {eta!r}")
    _check_prediction_type(prediction_type)
    if clip_range is not None and (len(clip_range) != 2 or not clip_range[0] < clip_range[1]):
        raise ConfigError(f"clip_range must be (low, high) with low < high, got {clip_range!r}")


def _generators(
    seeds: Sequence[int] | None, batch: int, device: torch.device
) -> list[torch.Generator]:
    """One generator per sample; seeds drawn from torch's global generator when not given."""
    if seeds is None:
        seeds = torch.randint(0, 2**62, (batch,)).tolist()
    elif isinstance(seeds, (str, bytes, int)) or len(seeds) != batch:
        raise ConfigError(
            f"seeds must be a sequence of {batch} ints (one per sample), got {seeds!r}"
        )
    return per_sample_generators(seeds, device)


def _schedule_dtype(x: Tensor) -> torch.dtype:
    """float64 constants for float64 data, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _default_device(model_fn: ModelFn) -> torch.device:
    """The device of an ``nn.Module``'s parameters, else the CPU."""
    if isinstance(model_fn, torch.nn.Module):
        for parameter in model_fn.parameters():
            return parameter.device
    return torch.device("cpu")


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    *,
    sampler: str = "ddim",
    steps: int | None = 50,
    seeds: Sequence[int] | None = None,
    noise_spec: NoiseSpec = GAUSSIAN_NOISE,
    device: torch.device | str | None = None,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_range: tuple[float, float] | None = None,
    spacing: str = "trailing",
    progress: bool = False,
    callback: StepCallback | None = None,
) -> SampleResult:
    """Generate samples from pure noise at t = T - 1.

    Randomness is per sample: sample ``b`` draws its initial noise x_{T-1} and every
    stochastic step's noise from its own generator seeded with ``seeds[b]``, so it is the
    same whatever the batch it is generated in (on the same device).

    Args:
        model_fn: ``(x_t, t) -> output``, e.g. a MONAI ``DiffusionModelUNet`` or
            :func:`guided_model_fn`.
        schedule: the noise schedule the model was trained with.
        shape: ``(B, C, H, W[, D])``.
        sampler: ``"ddim"``, ``"dpm++2m"``, ``"ddpm"`` or ``"x0"`` (one-shot x_0 prediction).
        steps: number of network evaluations, ``1 .. T``; ``None`` visits all T timesteps.
        seeds: ``B`` per-sample seeds; default: drawn from torch's global generator.
        noise_spec: the kind of the initial and step noise.
        device: where to sample; default: ``model_fn``'s parameters' device, else CPU.
        eta: DDIM stochasticity (0: deterministic).
        prediction_type: what the model outputs, one of :data:`PREDICTION_TYPES`.
        clip_range: clamp every x_0 estimate to ``(low, high)``; ``None`` disables.
        spacing: timestep spacing, see :func:`inference_timesteps`.
        progress: show a progress bar.
        callback: ``callback(t, x_t, pred_x0)`` after each network evaluation, with the
            visited timestep, the state ``(B, C, ...)`` the step started from and the
            step's x_0 estimate (e.g. to draw the reverse trajectory); the tensors are
            not copied, so copy what you keep.

    Returns:
        The samples, the number of network evaluations and the timesteps visited.

    Raises:
        ConfigError: bad shape, sampler, steps, seeds, eta, clip range or prediction type.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (4, 5) or any(s < 1 for s in shape):
        raise ConfigError(f"sample shape must be (B, C, H, W) or (B, C, H, W, D), got {shape}")
    t_start = schedule.num_train_timesteps - 1
    _check_sampling_args(schedule, t_start, sampler, steps, eta, prediction_type, clip_range)
    device = torch.device(device) if device is not None else _default_device(model_fn)
    schedule = schedule.to(device)
    generators = _generators(seeds, shape[0], device)
    x_T = sample_noise(noise_spec, shape, generator=generators, device=device)
    result = _reverse(
        model_fn,
        schedule,
        x_T,
        t_start,
        generators,
        sampler=sampler,
        steps=steps,
        noise_spec=noise_spec,
        eta=eta,
        prediction_type=prediction_type,
        clip_range=clip_range,
        spacing=spacing,
        progress=progress,
        callback=callback,
    )
    return SampleResult(sample=result.reconstruction, nfe=result.nfe, timesteps=result.timesteps)


@torch.no_grad()
def denoise(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x_t: Tensor,
    t_start: int,
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    seeds: Sequence[int] | None = None,
    noise_spec: NoiseSpec = GAUSSIAN_NOISE,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_range: tuple[float, float] | None = None,
    spacing: str = "trailing",
    progress: bool = False,
) -> Reconstruction:
    """Run the reverse process from a given x_t at ``t_start`` down to clean data.

    Evaluations: ``steps`` over :func:`inference_timesteps` ``(t_start, steps)``;
    ``steps=None`` visits every timestep ``t_start, ..., 0`` (``t_start + 1``
    evaluations); the ``"x0"`` sampler makes one. Only stochastic steps (DDPM, DDIM with
    ``eta > 0``) use ``seeds``, drawing noise of ``noise_spec``'s kind per sample.

    Args:
        model_fn: ``(x_t, t) -> output``.
        schedule: the noise schedule the model was trained with.
        x_t: noisy input at ``t_start``, ``(B, C, H, W[, D])``; its device is used throughout.
        t_start: the timestep of ``x_t``, ``0 .. T-1``.
        sampler: ``"ddim"``, ``"dpm++2m"``, ``"ddpm"`` or ``"x0"``.
        steps: number of evaluations, ``1 .. t_start + 1``, or ``None`` (every timestep).
        seeds: ``B`` per-sample seeds for the step noise; default: torch's global generator.
        noise_spec: the kind of the step noise.
        eta: DDIM stochasticity (0: deterministic).
        prediction_type: what the model outputs.
        clip_range: clamp every x_0 estimate to ``(low, high)``; ``None`` disables.
        spacing: timestep spacing, see :func:`inference_timesteps`.
        progress: show a progress bar.

    Returns:
        A :class:`Reconstruction` whose ``x_t`` is the input.

    Raises:
        ConfigError: bad t_start, sampler, steps, seeds, eta, clip range or prediction type.
    """
    if x_t.ndim not in (4, 5):
        raise ConfigError(
            f"x_t must be (B, C, H, W) or (B, C, H, W, D), got shape {tuple(x_t.shape)}"
        )
    _check_sampling_args(schedule, t_start, sampler, steps, eta, prediction_type, clip_range)
    schedule = schedule.to(x_t.device, _schedule_dtype(x_t))
    generators = _generators(seeds, x_t.shape[0], x_t.device)
    return _reverse(
        model_fn,
        schedule,
        x_t,
        t_start,
        generators,
        sampler=sampler,
        steps=steps,
        noise_spec=noise_spec,
        eta=eta,
        prediction_type=prediction_type,
        clip_range=clip_range,
        spacing=spacing,
        progress=progress,
    )


@torch.no_grad()
def partial_reconstruction(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x0: Tensor,
    t_start: int,
    *,
    sampler: str = "ddpm",
    steps: int | None = None,
    noise_spec: NoiseSpec = GAUSSIAN_NOISE,
    seeds: Sequence[int] | None = None,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_range: tuple[float, float] | None = None,
    spacing: str = "trailing",
    progress: bool = False,
) -> Reconstruction:
    """Noise ``x0`` to ``t_start``, then denoise it back (partial diffusion, AnoDDPM style).

    x_{t_start} = q_sample(x0, t_start, eps) with eps of ``noise_spec``'s kind, then the
    reverse process of :func:`denoise`. Network evaluations (``nfe``, counted):

    - ``"ddpm"`` with ``steps=None``: the full ancestral chain t_start, t_start-1, ..., 0,
      i.e. ``t_start + 1`` evaluations (index t is the paper's step t + 1). Its step noise
      has the same kind as ``noise_spec`` (simplex in AnoDDPM).
    - ``"ddim"`` / ``"dpm++2m"`` (or a strided ``"ddpm"``) with ``steps=K``: ``K``
      evaluations over :func:`inference_timesteps` ``(t_start, K)``; ``steps=None`` visits
      every timestep like the full DDPM chain.
    - ``"x0"``: one evaluation, x_0 predicted directly from x_{t_start}.

    Sample ``b``'s forward noise and step noises come from one generator seeded with
    ``seeds[b]``, so a scan's reconstruction does not depend on its batch.

    Args:
        model_fn: ``(x_t, t) -> output``.
        schedule: the noise schedule the model was trained with.
        x0: the input scan(s), ``(B, C, H, W[, D])``; its device is used throughout.
        t_start: how far to noise, ``0 .. T-1`` (AnoDDPM: about 250 of 1000).
        sampler: ``"ddpm"``, ``"ddim"``, ``"dpm++2m"`` or ``"x0"``.
        steps: number of evaluations, ``1 .. t_start + 1``, or ``None`` (every timestep).
        noise_spec: the noise kind for the forward noising and the stochastic steps.
        seeds: ``B`` per-sample seeds; default: drawn from torch's global generator.
        eta: DDIM stochasticity (0: deterministic).
        prediction_type: what the model outputs.
        clip_range: clamp every x_0 estimate to ``(low, high)``; ``None`` disables.
        spacing: timestep spacing, see :func:`inference_timesteps`.
        progress: show a progress bar.

    Returns:
        The reconstruction, the first x_0 estimate, x_{t_start}, nfe and the timesteps.

    Raises:
        ConfigError: bad t_start, sampler, steps, seeds, eta, clip range or prediction type.
    """
    if x0.ndim not in (4, 5):
        raise ConfigError(
            f"x0 must be (B, C, H, W) or (B, C, H, W, D), got shape {tuple(x0.shape)}"
        )
    _check_sampling_args(schedule, t_start, sampler, steps, eta, prediction_type, clip_range)
    device = x0.device
    schedule = schedule.to(device, _schedule_dtype(x0))
    generators = _generators(seeds, x0.shape[0], device)
    noise = sample_noise(noise_spec, x0.shape, generator=generators, device=device, dtype=x0.dtype)
    x_t = q_sample(schedule, x0, t_start, noise)
    return _reverse(
        model_fn,
        schedule,
        x_t,
        t_start,
        generators,
        sampler=sampler,
        steps=steps,
        noise_spec=noise_spec,
        eta=eta,
        prediction_type=prediction_type,
        clip_range=clip_range,
        spacing=spacing,
        progress=progress,
    )


# --------------------------------------------------------------------------------------------
# Classifier-free guidance (Ho & Salimans 2022)
# --------------------------------------------------------------------------------------------


def resolve_null_label(model: torch.nn.Module, null_label: int = -1) -> int:
    """The class index that means "no class" for a class-conditional MONAI U-Net.

    ``nn.Embedding`` cannot look up -1, so a negative ``null_label`` counts from the end of
    the model's class-embedding table: -1 is row ``num_class_embeds - 1``, reserved for the
    unconditional case. Training with condition dropout must use the same index.

    Args:
        model: a ``DiffusionModelUNet`` built with ``num_class_embeds`` (possibly wrapped in
            DDP, whose ``.module`` is used).
        null_label: the null class; negative counts from the end.

    Returns:
        A non-negative class index.

    Raises:
        ConfigError: the model has no class embedding, or the index is out of range.
    """
    inner = getattr(model, "module", model)
    num_classes = getattr(inner, "num_class_embeds", None)
    if num_classes is None:
        raise ConfigError("classifier-free guidance needs a model built with num_class_embeds")
    index = num_classes + null_label if null_label < 0 else null_label
    if not 0 <= index < num_classes:
        raise ConfigError(f"null_label {null_label} is outside the model's {num_classes} classes")
    return index


def guided_model_fn(
    model: torch.nn.Module,
    class_labels: Tensor,
    guidance: float,
    *,
    null_label: int = -1,
) -> ModelFn:
    """A ``model_fn`` with classifier-free guidance over class labels.

    output = out_uncond + w (out_cond - out_uncond), with out_cond = model(x, t, labels) and
    out_uncond = model(x, t, null label). So ``guidance = 0`` is exactly the unconditional
    model (one pass on the null label), ``guidance = 1`` exactly the conditional model (one
    pass), and ``w > 1`` strengthens the condition; other values run one network call on a
    batch of 2B. The combination is linear, so it applies to any prediction type.

    Args:
        model: a ``DiffusionModelUNet`` (``forward(x, timesteps, context=None,
            class_labels=None)``) with ``num_class_embeds``.
        class_labels: the wanted classes, ``(B,)`` long.
        guidance: the guidance weight w.
        null_label: the "no class" index, see :func:`resolve_null_label`.

    Returns:
        ``model_fn(x_t, t) -> output``.
    """
    null = resolve_null_label(model, null_label)
    labels = class_labels.long()

    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        cond = labels.to(x_t.device)
        uncond = torch.full_like(cond, null)
        if guidance == 0:
            return model(x_t, t, class_labels=uncond)
        if guidance == 1:
            return model(x_t, t, class_labels=cond)
        both = model(
            torch.cat([x_t, x_t]), torch.cat([t, t]), class_labels=torch.cat([uncond, cond])
        )
        out_uncond, out_cond = both.chunk(2)
        return out_uncond + guidance * (out_cond - out_uncond)

    return model_fn
