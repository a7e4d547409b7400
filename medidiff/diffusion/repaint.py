"""RePaint: inpainting with an unconditionally or mask-conditionally trained diffusion model.

Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic Models"
(CVPR, https://arxiv.org/abs/2201.09865), Algorithm 1, on a strided timestep grid
tau_K > ... > tau_1 (here ``steps`` = K):

    x_{tau_K} ~ noise
    for i = K .. 1:                                   # t = tau_i, t' = tau_{i-1} (-1: clean)
        for u = 1 .. U:                               # U = ``resample`` jumps
            x_known   = sqrt(alpha_bar_t') x_0 + sqrt(1 - alpha_bar_t') eps     (forward-noised input)
            x_unknown = DDPM step x_t -> x_t' with the network                  (sampled)
            x_t'      = m * x_known + (1 - m) * x_unknown                       (m: known region)
            if u < U and t' >= 0:                     # jump back: renoise t' -> t
                x_t = sqrt(alpha_bar_t / alpha_bar_t') x_t' + sqrt(1 - alpha_bar_t / alpha_bar_t') z

The resampling lets the sampled region harmonise with the known one (the paper's point:
without it, x_unknown ignores the context). The last step (t' = -1) sets the known region
to x_0 exactly. Network evaluations: ``steps * resample - (resample - 1)`` (the last step
does not jump back).

All noise (initial, known-region, step and jump noise) is of the model's training kind
(Gaussian, or simplex as in AnoDDPM) and comes from one generator per sample, so a
sample does not depend on its batch.

Example:
    >>> import torch
    >>> from medidiff.diffusion.prediction import predict_eps
    >>> from medidiff.diffusion.schedules import NoiseSchedule
    >>> schedule = NoiseSchedule.create("linear_beta", num_train_timesteps=100)
    >>> x0 = torch.rand(1, 1, 8, 8); known = torch.ones_like(x0); known[..., 2:5, 2:5] = 0
    >>> zero = lambda x_t, t: predict_eps(schedule, torch.zeros_like(x_t), x_t, t, prediction_type="sample")
    >>> result = repaint(zero, schedule, x0, known, steps=4, resample=2, seeds=[0])
    >>> bool(torch.equal(result.sample[known > 0], x0[known > 0])), result.nfe
    (True, 7)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from medidiff.diffusion.noise import NoiseSpec, per_sample_generators, sample_noise
from medidiff.diffusion.prediction import check_prediction_type
from medidiff.diffusion.samplers import inference_timesteps, make_sampler
from medidiff.diffusion.schedules import NoiseSchedule, alpha_bar_at, expand, q_sample
from medidiff.errors import ConfigError

__all__ = ["InpaintResult", "repaint"]

_GAUSSIAN = NoiseSpec("gaussian")


@dataclass(frozen=True)
class InpaintResult:
    """What :func:`repaint` produced.

    Attributes:
        sample: ``(B, C, *spatial)``: x_0 where ``known``, the painted content elsewhere.
        nfe: network evaluations (calls of ``model_fn``).
        timesteps: the strided grid tau_K, ..., tau_1, noisiest first.
    """

    sample: Tensor
    nfe: int
    timesteps: tuple[int, ...]


@torch.no_grad()
def repaint(
    model_fn,
    schedule: NoiseSchedule,
    x0: Tensor,
    known: Tensor,
    *,
    steps: int = 50,
    resample: int = 5,
    seeds: Sequence[int],
    noise_spec: NoiseSpec = _GAUSSIAN,
    prediction_type: str = "epsilon",
    clip_range: tuple[float, float] | None = None,
    progress: bool = False,
) -> InpaintResult:
    """Fill the unknown region of ``x0`` with samples from the model (RePaint).

    Args:
        model_fn: ``(x_t, t) -> output`` (e.g. a mask-guided model, so the painted content
            follows a label map).
        schedule: the model's noise schedule.
        x0: the image, ``(B, C, *spatial)``, on the model scale.
        known: ``(B, 1 or C, *spatial)``, 1 where ``x0`` is kept, 0 where it is painted.
        steps: K, the strided reverse steps (``1 .. T``).
        resample: U, the resampling jumps per step (1: no resampling).
        seeds: one seed per sample.
        noise_spec: the noise kind the model was trained with.
        prediction_type: the model's output (not ``flow``).
        clip_range: clamp every x_0 estimate to ``(low, high)``.
        progress: show a progress bar.

    Returns:
        The :class:`InpaintResult`; outside the unknown region ``sample`` equals ``x0``
        exactly.

    Raises:
        ConfigError: bad steps, resample, seeds, shapes or a rectified-flow model.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "flow":
        raise ConfigError("RePaint inpainting needs a diffusion model; rectified-flow models are not supported")
    T = schedule.num_train_timesteps
    for name, value, high in (("steps", steps, T), ("resample", resample, 100)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise ConfigError(f"{name} must be an integer in 1 .. {high}; got {value!r}")
    if x0.ndim not in (4, 5) or known.ndim != x0.ndim or known.shape[0] != x0.shape[0] \
            or tuple(known.shape[2:]) != tuple(x0.shape[2:]):
        raise ConfigError(
            f"x0 {tuple(x0.shape)} and known {tuple(known.shape)} must be (B, C, *spatial) on one grid"
        )
    if len(seeds) != x0.shape[0]:
        raise ConfigError(f"repaint needs one seed per sample ({x0.shape[0]}); got {len(seeds)}")

    device = x0.device
    schedule = schedule.to(device, torch.float64 if x0.dtype == torch.float64 else torch.float32)
    m = known.to(x0.dtype).expand_as(x0)
    generators = per_sample_generators(list(seeds), device)
    sampler = make_sampler("ddpm", schedule, prediction_type=prediction_type, clip_range=clip_range)
    visits = [int(v) for v in inference_timesteps(T - 1, steps, "trailing").tolist()]
    pairs = list(zip(visits, visits[1:] + [-1]))
    if progress:
        from tqdm.auto import tqdm

        pairs = tqdm(pairs, desc="repaint")

    def noise() -> Tensor:
        return sample_noise(noise_spec, tuple(x0.shape), generator=generators, device=device, dtype=x0.dtype)

    batch = x0.shape[0]
    x = q_sample(schedule, x0, torch.full((batch,), visits[0], device=device, dtype=torch.long), noise())
    x = m * x + (1 - m) * noise()  # the unknown region starts from pure noise
    nfe = 0
    for t_int, t_prev in pairs:
        t = torch.full((batch,), t_int, dtype=torch.long, device=device)
        t_p = torch.full((batch,), t_prev, dtype=torch.long, device=device)
        for u in range(resample):
            output = model_fn(x, t)
            nfe += 1
            step_noise = noise() if t_prev >= 0 else None
            unknown = sampler.step(output, x, t, t_prev, step_noise).prev_sample
            known_part = x0 if t_prev < 0 else q_sample(schedule, x0, t_p, noise())
            x_prev = m * known_part + (1 - m) * unknown
            if u == resample - 1 or t_prev < 0:
                x = x_prev
                break
            # jump back t' -> t: q(x_t | x_t') = N(sqrt(a) x_t', (1 - a) I), a = alpha_bar_t / alpha_bar_t'
            ratio = alpha_bar_at(schedule, t) / alpha_bar_at(schedule, t_p)
            x = expand(ratio.sqrt(), x_prev) * x_prev + expand((1 - ratio).sqrt(), x_prev) * noise()
    # exact: the known region is x0 itself, not x0 through float arithmetic
    x = torch.where(m > 0.5, x0, x)
    return InpaintResult(sample=x, nfe=nfe, timesteps=tuple(visits))
