"""Prediction types: what the network outputs, and how to read it.

The network is a callable ``model_fn(x_t, t) -> model_output`` whose output is read
according to its prediction type (:data:`medidiff.constants.PREDICTION_TYPES`):
``"epsilon"`` (eps_theta; Ho et al. 2020), ``"sample"`` (x_0 directly) or
``"v_prediction"`` (v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0; Salimans & Ho
2022). Each is one :class:`Parameterisation` in :data:`PARAMETERISATIONS`: its training
target and the x_0 and eps estimates it implies, written with alpha = sqrt(alpha_bar_t)
and sigma = sqrt(1 - alpha_bar_t). A new objective is a new entry.

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
from medidiff.diffusion.schedules import NoiseSchedule, alpha_bar_at, batch_timesteps, expand
from medidiff.errors import ConfigError

__all__ = [
    "PARAMETERISATIONS",
    "PREDICTION_TYPES",
    "Parameterisation",
    "check_prediction_type",
    "predict_eps",
    "predict_x0",
    "training_target",
    "x0_and_eps",
]

#: ``(a, b, alpha, sigma) -> tensor``: ``a`` and ``b`` as named by each field below.
_Read = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Parameterisation:
    """One prediction type, with alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t).

    Attributes:
        name: the prediction type, one of :data:`PREDICTION_TYPES`.
        target: ``(x0, eps, alpha, sigma) -> `` what the network should output.
        x0: ``(output, x_t, alpha, sigma) -> `` the implied x_0 estimate.
        eps: ``(output, x_t, alpha, sigma) -> `` the implied eps estimate.
    """

    name: str
    target: _Read
    x0: _Read
    eps: _Read


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


def _alpha_sigma(schedule: NoiseSchedule, t: int | Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped ``(B, 1, ..., 1)`` like ``like``."""
    alpha_bar = alpha_bar_at(schedule, batch_timesteps(t, like.shape[0], like.device))
    return expand(alpha_bar.sqrt(), like), expand((1 - alpha_bar).sqrt(), like)


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
    read = check_prediction_type(prediction_type)
    return read.target(x0, noise, *_alpha_sigma(schedule, t, x0))


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
    read = check_prediction_type(prediction_type)
    return read.x0(model_output, x_t, *_alpha_sigma(schedule, t, x_t))


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
    read = check_prediction_type(prediction_type)
    return read.eps(model_output, x_t, *_alpha_sigma(schedule, t, x_t))


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
    x0 = predict_x0(schedule, model_output, x_t, t, prediction_type=prediction_type)
    if clip_range is None:
        return x0, predict_eps(schedule, model_output, x_t, t, prediction_type=prediction_type)
    x0 = x0.clamp(clip_range[0], clip_range[1])
    return x0, predict_eps(schedule, x0, x_t, t, prediction_type="sample")
