"""Sampling loops: generate from noise, denoise from any x_t, partial reconstruction.

One loop (:func:`_reverse`) drives any :class:`~medidiff.diffusion.samplers.Sampler` from
x_{t_start} down to clean data (t = -1), drawing each stochastic step's noise of the chosen
kind from per-sample generators and counting the network evaluations it makes (``nfe``).
:func:`sample` starts from pure noise at T - 1; :func:`denoise` from a given x_t;
:func:`partial_reconstruction` noises a scan to t_start first (AnoDDPM).

Example:
    >>> import torch
    >>> from medidiff.diffusion.prediction import predict_eps
    >>> from medidiff.diffusion.schedules import NoiseSchedule
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
from dataclasses import dataclass

import torch
from torch import Tensor

from medidiff.diffusion.noise import NoiseSpec, per_sample_generators, sample_noise
from medidiff.diffusion.prediction import check_prediction_type, forward_noise
from medidiff.diffusion.samplers import Sampler, make_sampler, sampler_class
from medidiff.diffusion.schedules import NoiseSchedule
from medidiff.errors import ConfigError

__all__ = [
    "GAUSSIAN_NOISE",
    "ModelFn",
    "Reconstruction",
    "SampleResult",
    "SamplingOptions",
    "StepCallback",
    "StepGuide",
    "denoise",
    "partial_reconstruction",
    "sample",
]

#: The default noise of the samplers: white Gaussian eps ~ N(0, I).
GAUSSIAN_NOISE = NoiseSpec("gaussian")

#: A denoising network as the samplers see it: ``(x_t (B, C, ...), t (B,) long) -> output``.
ModelFn = Callable[[Tensor, Tensor], Tensor]
#: ``callback(t, x_t, pred_x0)``: observes one reverse step (see :func:`sample`)
StepCallback = Callable[[int, Tensor, Tensor], None]
#: ``guide(t_prev, x_prev, pred_x0, eps) -> x_prev``: may replace the state a reverse step
#: produced before the next step sees it (``eps``: the forward noise of a partial
#: reconstruction); see :func:`partial_reconstruction`
StepGuide = Callable[[int, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class SamplingOptions:
    """How to run the reverse process (the keyword arguments of :func:`sample`).

    Attributes:
        sampler: a name of :data:`medidiff.constants.SAMPLERS`.
        steps: network evaluations, or ``None`` (every timestep from the start).
        noise_spec: the kind of the step noise.
        eta: DDIM stochasticity (0: deterministic).
        prediction_type: what the model outputs.
        clip_range: clamp every x_0 estimate to ``(low, high)``; ``None`` disables.
        spacing: timestep spacing, see :func:`~medidiff.diffusion.samplers.inference_timesteps`.
        progress: show a progress bar.
    """

    sampler: str = "ddim"
    steps: int | None = None
    noise_spec: NoiseSpec = GAUSSIAN_NOISE
    eta: float = 0.0
    prediction_type: str = "epsilon"
    clip_range: tuple[float, float] | None = None
    spacing: str = "trailing"
    progress: bool = False

    def check(self, schedule: NoiseSchedule, t_start: int) -> None:
        """Raise ConfigError, naming the argument, for any bad sampling argument."""
        T = schedule.num_train_timesteps
        steps, eta, clip_range = self.steps, self.eta, self.clip_range
        if isinstance(t_start, bool) or not isinstance(t_start, int) or not 0 <= t_start < T:
            raise ConfigError(f"t_start must be an integer in 0 .. {T - 1}, got {t_start!r}")
        sampler_class(self.sampler).check_steps(steps)
        if steps is not None and (
            isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= t_start + 1
        ):
            raise ConfigError(
                f"steps must be an integer in 1 .. {t_start + 1} or None, got {steps!r}"
            )
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta < math.inf:
            raise ConfigError(f"eta must be a number >= 0, got {eta!r}")
        check_prediction_type(self.prediction_type)
        sampler_class(self.sampler).check_prediction_type(self.prediction_type)
        if clip_range is not None and (len(clip_range) != 2 or not clip_range[0] < clip_range[1]):
            raise ConfigError(
                f"clip_range must be (low, high) with low < high, got {clip_range!r}"
            )

    def make_sampler(self, schedule: NoiseSchedule) -> Sampler:
        """A fresh :class:`~medidiff.diffusion.samplers.Sampler` with these options."""
        return make_sampler(
            self.sampler, schedule, prediction_type=self.prediction_type,
            clip_range=self.clip_range, eta=self.eta,
        )


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



def _step_pairs(
    sampler: Sampler, t_start: int, options: SamplingOptions
) -> tuple[list[int], list[tuple[int, int]]]:
    """The visited timesteps and the ``(t, t_prev)`` of each step; the last lands on -1."""
    visits = sampler.timesteps(t_start, options.steps, options.spacing)
    targets = visits[1:] + [-1]  # t_prev of each step; the last step lands on clean data
    return visits, list(zip(visits, targets))


def _reverse(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x_t: Tensor,
    t_start: int,
    generators: list[torch.Generator],
    options: SamplingOptions,
    callback: StepCallback | None = None,
    guide: Callable[[int, Tensor, Tensor], Tensor] | None = None,
) -> Reconstruction:
    """Run the reverse process from x_t at ``t_start`` to t = -1 (clean data).

    The one loop behind :func:`sample`, :func:`denoise` and :func:`partial_reconstruction`.
    ``model_fn`` is wrapped so that ``nfe`` counts its actual calls. ``callback(t, x_t,
    pred_x0)`` sees every visited state before it is replaced; ``guide(t_prev, x_prev,
    pred_x0)`` may replace the state of every step that does not land on clean data. A
    stochastic step's noise z is drawn after the network call, of ``options.noise_spec``'s
    kind, per sample.
    """
    model = _CountingModel(model_fn)
    sampler = options.make_sampler(schedule)
    batch, device = x_t.shape[0], x_t.device
    visits, pairs = _step_pairs(sampler, t_start, options)
    if options.progress:
        from medidiff.runtime.progress import progress_iter

        pairs = progress_iter(pairs, f"{options.sampler} sampling", total=len(visits), unit="step",
                              leave=False)

    x = x_t
    first_pred_x0: Tensor | None = None
    for t_int, t_prev in pairs:
        t = torch.full((batch,), t_int, dtype=torch.long, device=device)
        output = model(x, t)
        noise = None
        if sampler.needs_noise(t_prev):
            noise = sample_noise(
                options.noise_spec, x_t.shape, generator=generators, device=device, dtype=x_t.dtype
            )
        result = sampler.step(output, x, t, t_prev, noise)
        if first_pred_x0 is None:
            first_pred_x0 = result.pred_x0
        if callback is not None:
            callback(t_int, x, result.pred_x0)
        x = result.prev_sample
        if guide is not None and t_prev >= 0:
            x = guide(t_prev, x, result.pred_x0)

    assert first_pred_x0 is not None  # internal: the timestep list is never empty
    return Reconstruction(
        reconstruction=x, pred_x0=first_pred_x0, x_t=x_t, nfe=model.calls, timesteps=tuple(visits)
    )


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


def _start(
    name: str, x: Tensor, schedule: NoiseSchedule, t_start: int, seeds: Sequence[int] | None,
    **options: object,
) -> tuple[SamplingOptions, NoiseSchedule, list[torch.Generator]]:
    """Check a reverse run that starts from ``x`` (named ``name`` in errors) at ``t_start``:
    its options, the schedule cast once for ``x``'s device and dtype, one generator per sample."""
    if x.ndim not in (4, 5):
        raise ConfigError(
            f"{name} must be (B, C, H, W) or (B, C, H, W, D), got shape {tuple(x.shape)}"
        )
    checked = SamplingOptions(**options)  # type: ignore[arg-type]
    checked.check(schedule, t_start)
    schedule = schedule.to(x.device, _schedule_dtype(x))
    return checked, schedule, _generators(seeds, x.shape[0], x.device)


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
        sampler: ``"ddim"``, ``"dpm++2m"``, ``"ddpm"`` or ``"x0"`` (one-shot x_0 prediction);
            ``"euler"`` for a rectified-flow model (``prediction_type="flow"``).
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
    options = SamplingOptions(
        sampler=sampler, steps=steps, noise_spec=noise_spec, eta=eta,
        prediction_type=prediction_type, clip_range=clip_range, spacing=spacing, progress=progress,
    )
    options.check(schedule, t_start)
    device = torch.device(device) if device is not None else _default_device(model_fn)
    schedule = schedule.to(device)
    generators = _generators(seeds, shape[0], device)
    x_T = sample_noise(noise_spec, shape, generator=generators, device=device)
    result = _reverse(model_fn, schedule, x_T, t_start, generators, options, callback)
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
        sampler: ``"ddim"``, ``"dpm++2m"``, ``"ddpm"`` or ``"x0"``; ``"euler"`` for a
            rectified-flow model.
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
    options, schedule, generators = _start(
        "x_t", x_t, schedule, t_start, seeds, sampler=sampler, steps=steps, noise_spec=noise_spec,
        eta=eta, prediction_type=prediction_type, clip_range=clip_range, spacing=spacing,
        progress=progress,
    )
    return _reverse(model_fn, schedule, x_t, t_start, generators, options)


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
    guide: StepGuide | None = None,
) -> Reconstruction:
    """Noise ``x0`` to ``t_start``, then denoise it back (partial diffusion, AnoDDPM style).

    x_{t_start} = q_sample(x0, t_start, eps) with eps of ``noise_spec``'s kind (for a
    rectified-flow model x_s = (1 - s) x0 + s eps at s = (t_start + 1) / T, see
    :func:`~medidiff.diffusion.prediction.forward_noise`), then the reverse process of
    :func:`denoise`. Network evaluations (``nfe``, counted):

    - ``"ddpm"`` with ``steps=None``: the full ancestral chain t_start, t_start-1, ..., 0,
      i.e. ``t_start + 1`` evaluations (index t is the paper's step t + 1). Its step noise
      has the same kind as ``noise_spec`` (simplex in AnoDDPM).
    - ``"ddim"`` / ``"dpm++2m"`` (or a strided ``"ddpm"``) with ``steps=K``: ``K``
      evaluations over :func:`inference_timesteps` ``(t_start, K)``; ``steps=None`` visits
      every timestep like the full DDPM chain.
    - ``"x0"``: one evaluation, x_0 predicted directly from x_{t_start}.
    - ``"euler"`` (flow models): ``steps`` Euler steps from s = (t_start + 1) / T to 0.

    Sample ``b``'s forward noise and step noises come from one generator seeded with
    ``seeds[b]``, so a scan's reconstruction does not depend on its batch.

    Args:
        model_fn: ``(x_t, t) -> output``.
        schedule: the noise schedule the model was trained with.
        x0: the input scan(s), ``(B, C, H, W[, D])``; its device is used throughout.
        t_start: how far to noise, ``0 .. T-1`` (AnoDDPM: about 250 of 1000).
        sampler: ``"ddpm"``, ``"ddim"``, ``"dpm++2m"`` or ``"x0"``; ``"euler"`` for a
            rectified-flow model.
        steps: number of evaluations, ``1 .. t_start + 1``, or ``None`` (every timestep).
        noise_spec: the noise kind for the forward noising and the stochastic steps.
        seeds: ``B`` per-sample seeds; default: drawn from torch's global generator.
        eta: DDIM stochasticity (0: deterministic).
        prediction_type: what the model outputs.
        clip_range: clamp every x_0 estimate to ``(low, high)``; ``None`` disables.
        spacing: timestep spacing, see :func:`inference_timesteps`.
        progress: show a progress bar.
        guide: ``guide(t_prev, x_prev, pred_x0, eps)`` after every step that does not land
            on clean data, with ``eps`` the forward noise: returns the state the next step
            starts from (THOR's harmonisation with the input, Bercea et al. 2024).

    Returns:
        The reconstruction, the first x_0 estimate, x_{t_start}, nfe and the timesteps.

    Raises:
        ConfigError: bad t_start, sampler, steps, seeds, eta, clip range or prediction type.
    """
    options, schedule, generators = _start(
        "x0", x0, schedule, t_start, seeds, sampler=sampler, steps=steps, noise_spec=noise_spec,
        eta=eta, prediction_type=prediction_type, clip_range=clip_range, spacing=spacing,
        progress=progress,
    )
    noise = sample_noise(noise_spec, x0.shape, generator=generators, device=x0.device, dtype=x0.dtype)
    x_t = forward_noise(schedule, x0, t_start, noise, prediction_type=options.prediction_type)
    step_guide = None
    if guide is not None:
        step_guide = lambda t_prev, x, pred_x0: guide(t_prev, x, pred_x0, noise)  # noqa: E731
    return _reverse(model_fn, schedule, x_t, t_start, generators, options, guide=step_guide)
