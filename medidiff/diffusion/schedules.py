"""Noise schedules (float64) and the forward process q(x_t | x_0).

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"):

- ``t`` indexes the ``T`` training timesteps as MONAI does, ``0 .. T-1``; index ``t`` is the
  paper's step ``t + 1``. ``t = -1`` stands for clean data, where alpha_bar = 1.
- beta_t: the variance added at step t; alpha_t = 1 - beta_t;
  alpha_bar_t = prod_{s <= t} alpha_s.
- Forward process q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), i.e.
  x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps. eps is usually Gaussian; AnoDDPM
  uses simplex noise instead (:mod:`medidiff.diffusion.noise`).

The schedule names are :data:`medidiff.constants.SCHEDULES`; :data:`BETA_SCHEDULES` maps
each to the function that computes its betas, so a new schedule is a new entry in both.

Example:
    >>> import torch
    >>> schedule = NoiseSchedule.create("sigmoid_beta", num_train_timesteps=100)
    >>> x0 = torch.zeros(1, 1, 4, 4)
    >>> schedule.betas.dtype, schedule.num_train_timesteps
    (torch.float64, 100)
    >>> bool(q_mean_variance(schedule, x0, 99).variance.flatten()[0] > 0.5)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from medidiff.constants import SCHEDULES
from medidiff.errors import ConfigError

__all__ = [
    "BETA_SCHEDULES",
    "SCHEDULES",
    "Gaussian",
    "NoiseSchedule",
    "alpha_bar_at",
    "batch_timesteps",
    "expand",
    "extract",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
]

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


#: The beta_t of the linear-type schedules, ``(num_steps, beta_start, beta_end) -> (T,)``.
_LINEAR_TYPE = {
    "linear_beta": _linear_beta,
    "scaled_linear_beta": _scaled_linear_beta,
    "sigmoid_beta": _sigmoid_beta,
}

#: Every schedule of :data:`medidiff.constants.SCHEDULES` and its beta function; the
#: ``cosine`` one takes ``(num_steps, s)``.
BETA_SCHEDULES = {**_LINEAR_TYPE, "cosine": _cosine_beta}


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
            betas = _LINEAR_TYPE[name](num_train_timesteps, beta_start, beta_end)
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

    @classmethod
    def from_config(cls, diffusion: Any) -> NoiseSchedule:
        """The schedule of a ``diffusion`` config section (:class:`medidiff.config.DiffusionConfig`).

        Args:
            diffusion: has ``schedule``, ``num_train_timesteps``, ``beta_start``, ``beta_end``.

        Returns:
            The schedule, float64 on the CPU.
        """
        return cls.create(
            diffusion.schedule,
            num_train_timesteps=diffusion.num_train_timesteps,
            beta_start=diffusion.beta_start,
            beta_end=diffusion.beta_end,
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
    return expand(values[t.to(values.device)], like)


def expand(per_sample: Tensor, like: Tensor) -> Tensor:
    """Reshape a ``(B,)`` tensor to ``(B, 1, ..., 1)`` and cast it to ``like``.

    Args:
        per_sample: ``(B,)``.
        like: ``(B, C, H, W[, D])``.

    Returns:
        ``(B, 1, ..., 1)`` with ``like.ndim`` dims, on ``like``'s device and dtype.
    """
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


def batch_timesteps(t: int | Tensor, batch: int, device: torch.device) -> Tensor:
    """An int, a 0-d tensor or a ``(B,)`` tensor of timesteps as a ``(B,)`` long tensor on ``device``."""
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
    t = batch_timesteps(t, x0.shape[0], x0.device)
    alpha_bar = alpha_bar_at(schedule, t)
    return expand(alpha_bar.sqrt(), x0) * x0 + expand((1 - alpha_bar).sqrt(), x0) * noise


def q_mean_variance(schedule: NoiseSchedule, x0: Tensor, t: int | Tensor) -> Gaussian:
    """Mean and variance of q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I).

    Args:
        schedule: the noise schedule.
        x0: clean data x_0, ``(B, C, H, W[, D])``.
        t: timesteps, an int or ``(B,)`` long.

    Returns:
        The Gaussian, ``variance`` shaped ``(B, 1, ..., 1)``.
    """
    t = batch_timesteps(t, x0.shape[0], x0.device)
    alpha_bar = alpha_bar_at(schedule, t)
    return Gaussian(mean=expand(alpha_bar.sqrt(), x0) * x0, variance=expand(1 - alpha_bar, x0))


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
    alpha_bar = alpha_bar_at(schedule, batch_timesteps(t, batch, device))
    alpha_bar_prev = alpha_bar_at(schedule, batch_timesteps(t_prev, batch, device))
    beta = 1 - alpha_bar / alpha_bar_prev  # variance of the transition t_prev -> t
    coef_x0 = alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)
    coef_xt = (1 - beta).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * beta
    mean = expand(coef_x0, x_t) * x0 + expand(coef_xt, x_t) * x_t
    return Gaussian(mean=mean, variance=expand(variance, x_t))
