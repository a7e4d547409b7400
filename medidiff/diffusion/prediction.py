"""Prediction types: what the network outputs, and how to read it.

The network is a callable ``model_fn(x_t, t) -> model_output`` whose output is read
according to its prediction type (:data:`medidiff.constants.PREDICTION_TYPES`):
``"epsilon"`` (eps_theta; Ho et al. 2020), ``"sample"`` (x_0 directly) or
``"v_prediction"`` (v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0; Salimans & Ho
2022) or ``"flow"`` (the rectified-flow velocity u = x_0 - eps; Liu et al. 2023, see
:mod:`medidiff.diffusion.flow`). Each is one :class:`Parameterisation` in
:data:`PARAMETERISATIONS`: its training target and the x_0 and eps estimates it implies,
written with the coefficients of the noisy input x_t = alpha x_0 + sigma eps
(:func:`path_coefficients`): alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t) on
the diffusion path, alpha = 1 - s, sigma = s on the straight flow path at flow time
s = (t + 1) / T. A new objective is a new entry.

Example:
    >>> import torch
    >>> from medidiff.diffusion.schedules import NoiseSchedule, q_sample
    >>> schedule = NoiseSchedule.create(num_train_timesteps=10)
    >>> x0, eps = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    >>> v = training_target(schedule, x0, 5, eps, prediction_type="v_prediction")
    >>> x_t = q_sample(schedule, x0, 5, eps)
    >>> torch.allclose(predict_x0(schedule, v, x_t, 5, prediction_type="v_prediction"), x0)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from medidiff.constants import PREDICTION_TYPES
from medidiff.diffusion.flow import flow_interpolate, flow_time
from medidiff.diffusion.schedules import (
    NoiseSchedule,
    alpha_bar_at,
    batch_timesteps,
    expand,
    q_sample,
)
from medidiff.errors import ConfigError

__all__ = [
    "PARAMETERISATIONS",
    "PREDICTION_TYPES",
    "Parameterisation",
    "check_prediction_type",
    "forward_noise",
    "is_flow",
    "path_coefficients",
    "predict_eps",
    "predict_x0",
    "training_target",
    "x0_and_eps",
]

#: ``(a, b, alpha, sigma) -> tensor``: ``a`` and ``b`` as named by each field below.
_Read = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Parameterisation:
    """One prediction type, read with the path coefficients x_t = alpha x_0 + sigma eps.

    Attributes:
        name: the prediction type, one of :data:`PREDICTION_TYPES`.
        target: ``(x0, eps, alpha, sigma) -> `` what the network should output.
        x0: ``(output, x_t, alpha, sigma) -> `` the implied x_0 estimate.
        eps: ``(output, x_t, alpha, sigma) -> `` the implied eps estimate.
        flow: the model lives on the straight rectified-flow path (alpha = 1 - s,
            sigma = s) rather than the diffusion schedule's (alpha = sqrt(alpha_bar_t),
            sigma = sqrt(1 - alpha_bar_t)).
    """

    name: str
    target: _Read
    x0: _Read
    eps: _Read
    flow: bool = False


#: Every prediction type of :data:`medidiff.constants.PREDICTION_TYPES`.
PARAMETERISATIONS: dict[str, Parameterisation] = {
    "epsilon": Parameterisation(
        "epsilon",
        target=lambda x0, eps, alpha, sigma: eps,
        x0=lambda out, x_t, alpha, sigma: (x_t - sigma * out) / alpha,  # Ho et al. eq. 15
        eps=lambda out, x_t, alpha, sigma: out,
    ),
    "v_prediction": Parameterisation(
        "v_prediction",
        target=lambda x0, eps, alpha, sigma: alpha * eps - sigma * x0,
        x0=lambda out, x_t, alpha, sigma: alpha * x_t - sigma * out,
        eps=lambda out, x_t, alpha, sigma: sigma * x_t + alpha * out,
    ),
    "sample": Parameterisation(
        "sample",
        target=lambda x0, eps, alpha, sigma: x0,
        x0=lambda out, x_t, alpha, sigma: out,
        eps=lambda out, x_t, alpha, sigma: (x_t - alpha * out) / sigma,
    ),
    # u = x_0 - eps on x_t = (1 - s) x_0 + s eps (alpha + sigma = 1): x_0 = x_t + s u,
    # eps = x_0 - u = x_t - (1 - s) u.
    "flow": Parameterisation(
        "flow",
        target=lambda x0, eps, alpha, sigma: x0 - eps,
        x0=lambda out, x_t, alpha, sigma: x_t + sigma * out,
        eps=lambda out, x_t, alpha, sigma: x_t - alpha * out,
        flow=True,
    ),
}


def check_prediction_type(prediction_type: str) -> Parameterisation:
    """The :class:`Parameterisation` of ``prediction_type``.

    Raises:
        ConfigError: an unknown prediction type, named with the known ones.
    """
    if prediction_type not in PREDICTION_TYPES or prediction_type not in PARAMETERISATIONS:
        raise ConfigError(
            f"prediction_type {prediction_type!r} is unknown; use one of {', '.join(PREDICTION_TYPES)}"
        )
    return PARAMETERISATIONS[prediction_type]


def is_flow(prediction_type: str) -> bool:
    """Whether ``prediction_type`` is a rectified-flow model's (``"flow"``).

    Raises:
        ConfigError: an unknown prediction type.
    """
    return check_prediction_type(prediction_type).flow


def path_coefficients(
    schedule: NoiseSchedule, t: int | Tensor, like: Tensor, *, prediction_type: str = "epsilon"
) -> tuple[Tensor, Tensor]:
    """``(alpha, sigma)`` of the noisy input x_t = alpha x_0 + sigma eps at timestep ``t``.

    Diffusion models: sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t). Flow models:
    1 - s and s with s = (t + 1) / T (:func:`~medidiff.diffusion.flow.flow_time`; t = -1 is
    clean data); ``t`` may then be fractional.

    Args:
        schedule: the noise schedule (flow models use only its T).
        t: timesteps, an int or ``(B,)`` tensor, ``-1 .. T-1``.
        like: a ``(B, C, H, W[, D])`` tensor whose batch, device and dtype the result takes.
        prediction_type: one of :data:`PREDICTION_TYPES`.

    Returns:
        ``alpha`` and ``sigma``, each shaped ``(B, 1, ..., 1)``.
    """
    if not is_flow(prediction_type):
        alpha_bar = alpha_bar_at(schedule, batch_timesteps(t, like.shape[0], like.device))
        return expand(alpha_bar.sqrt(), like), expand((1 - alpha_bar).sqrt(), like)
    s = flow_time(t, schedule.num_train_timesteps).to(like.device)
    s = s.expand(like.shape[0]) if s.ndim == 0 else s
    return expand((1 - s).to(like.dtype), like), expand(s.to(like.dtype), like)


def forward_noise(
    schedule: NoiseSchedule,
    x0: Tensor,
    t: int | Tensor,
    noise: Tensor,
    *,
    prediction_type: str = "epsilon",
) -> Tensor:
    """Noise clean data to timestep ``t`` on the model's own path.

    Diffusion models: :func:`~medidiff.diffusion.schedules.q_sample`,
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps. Flow models:
    x_s = (1 - s) x_0 + s eps at s = (t + 1) / T
    (:func:`~medidiff.diffusion.flow.flow_interpolate`).

    Args:
        schedule: the noise schedule.
        x0: clean data, ``(B, C, H, W[, D])``.
        t: timesteps, an int or ``(B,)`` tensor, ``0 .. T-1``.
        noise: eps, same shape as ``x0`` (Gaussian or simplex).
        prediction_type: one of :data:`PREDICTION_TYPES`.

    Returns:
        x_t, same shape as ``x0``.
    """
    if not is_flow(prediction_type):
        return q_sample(schedule, x0, t, noise)
    s = flow_time(t, schedule.num_train_timesteps).to(x0.device)
    return flow_interpolate(x0, noise, s.expand(x0.shape[0]) if s.ndim == 0 else s)


def training_target(
    schedule: NoiseSchedule,
    x0: Tensor,
    t: int | Tensor,
    noise: Tensor,
    *,
    prediction_type: str = "epsilon",
) -> Tensor:
    """What the network should output for x_t = forward_noise(schedule, x0, t, noise).

    ``"epsilon"``: eps; ``"sample"``: x_0; ``"v_prediction"``:
    v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0; ``"flow"``: u = x_0 - eps.

    Args:
        schedule: the noise schedule.
        x0: clean data, ``(B, C, H, W[, D])``.
        t: timesteps, an int or ``(B,)`` long.
        noise: eps used to make x_t, same shape as ``x0``.
        prediction_type: one of :data:`PREDICTION_TYPES`.

    Returns:
        The regression target, same shape as ``x0``.
    """
    read = check_prediction_type(prediction_type)
    return read.target(x0, noise, *path_coefficients(schedule, t, x0, prediction_type=prediction_type))


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
    x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v; ``"flow"``: x_0 = x_t + s u with
    s = (t + 1) / T (the one-step reconstruction of REFLECT).

    Args:
        schedule: the noise schedule.
        model_output: the network's output at (x_t, t), ``(B, C, H, W[, D])``.
        x_t: noisy input, same shape.
        t: timesteps, an int or ``(B,)`` long.
        prediction_type: one of :data:`PREDICTION_TYPES`.

    Returns:
        x_0 estimate, same shape as ``x_t``.
    """
    read = check_prediction_type(prediction_type)
    return read.x0(model_output, x_t, *path_coefficients(schedule, t, x_t, prediction_type=prediction_type))


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
    eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v; ``"flow"``: eps = x_t - (1 - s) u.

    Args:
        schedule: the noise schedule.
        model_output: the network's output at (x_t, t), ``(B, C, H, W[, D])``.
        x_t: noisy input, same shape.
        t: timesteps (``>= 0``), an int or ``(B,)`` long.
        prediction_type: one of :data:`PREDICTION_TYPES`.

    Returns:
        eps estimate, same shape as ``x_t``.
    """
    read = check_prediction_type(prediction_type)
    return read.eps(model_output, x_t, *path_coefficients(schedule, t, x_t, prediction_type=prediction_type))


def x0_and_eps(
    schedule: NoiseSchedule,
    model_output: Tensor,
    x_t: Tensor,
    t: Tensor,
    prediction_type: str,
    clip_range: tuple[float, float] | None,
) -> tuple[Tensor, Tensor]:
    """x_0 and eps estimates; when x_0 is clipped, eps is re-derived from the clipped x_0
    so that both stay consistent with x_t (as improved-diffusion does).

    Args:
        schedule: the noise schedule.
        model_output: the network's output at (x_t, t), ``(B, C, H, W[, D])``.
        x_t: noisy input, same shape.
        t: timesteps, ``(B,)`` long.
        prediction_type: one of :data:`PREDICTION_TYPES`.
        clip_range: clamp x_0 to ``(low, high)``; ``None`` disables.

    Returns:
        ``(x0, eps)``, each shaped like ``x_t``.
    """
    read = check_prediction_type(prediction_type)
    alpha, sigma = path_coefficients(schedule, t, x_t, prediction_type=prediction_type)
    x0 = read.x0(model_output, x_t, alpha, sigma)
    if clip_range is None:
        return x0, read.eps(model_output, x_t, alpha, sigma)
    x0 = x0.clamp(clip_range[0], clip_range[1])
    return x0, PARAMETERISATIONS["sample"].eps(x0, x_t, alpha, sigma)
