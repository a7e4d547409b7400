"""Partial-diffusion reconstruction methods for anomaly detection.

Every method noises a scan x_0 part of the way, x_t = sqrt(alpha_bar_t) x_0 +
sqrt(1 - alpha_bar_t) eps, and lets a model trained on healthy data denoise it back; the
reconstruction x_hat keeps healthy anatomy and "repaints" what the model never saw, so the
residual |x_0 - x_hat| marks anomalies. They differ in how far they noise, how they
denoise, and which part of the image they noise:

==========  ====================================================  ============================
method      recipe                                                network evaluations / image
==========  ====================================================  ============================
anoddpm     t = 250 of 1000, full ancestral DDPM chain            t + 1 (251): the slow
            (Wyatt et al. 2022, "AnoDDPM"; simplex noise when     reference
            the model was trained with it)
ddim        t = 50, K deterministic DDIM steps (Song et al.       K (default 3): the fast
            2021) over trailing timesteps                         default
x0          t = 250, one-shot x_0 prediction                      1
patched     pDDPM (Behrendt et al. 2023, "Patched diffusion       number of patches (9 on the
            models for unsupervised anomaly detection in brain    default grid)
            MRI"): noise one patch at t = 500, predict x_0 in one
            pass, keep the patch, stitch (overlaps averaged)
ensemble    t = 250 / 500 / 750, one-shot x_0 each, residuals    3
            averaged (cDDPM-style, Behrendt et al. 2025)
multi       several partial reconstructions (t = 25 / 50 / 100    4 (one per start)
            / 200, one DDIM step each), scored by the per-voxel
            Mahalanobis distance of the input to them (Behrendt
            et al. 2024, arXiv 2407.12474)
thor        t = 100, K DDIM steps; after each step the state is   K (default 5)
            harmonised with the noised input where the current
            x_0 estimate agrees with it (THOR, Bercea et al. 2024)
latent      latent models only: encode, noise the latent to       K (default 1) on the latent
            t = 600, K deterministic steps, decode; residual in   (plus one encode and one
            image space (MAD-AD, IPMI 2025; REFLECT, MICCAI 2025)  decode)
==========  ====================================================  ============================

On a latent model every method but ``patched`` runs in latent space (the scan is encoded,
the latent noised and denoised, each reconstruction decoded); ``latent`` is the default.

pDDPM used 48 px patches on 128 px slices (about 3/8 of the slice); here the default patch
is half the network's input along each axis with a stride of half a patch (50 % overlap),
i.e. 3 x 3 patches on a 2D slice, so that every pixel is noised in 1 to 4 patches. It can be
set in voxels (``patch_size``, ``patch_stride``).

All methods rest on :func:`medidiff.diffusion.partial_reconstruction` (``patched`` noises
its patch itself and uses the reverse half, :func:`medidiff.diffusion.denoise`).
Randomness is per image: image ``b`` draws all its noise from seeds derived from
``seeds[b]`` (and the start / patch index), so a scan's map does not depend on the batch.

Example:
    >>> cfg = MethodConfig("ddim").resolve(num_train_timesteps=1000, noise="gaussian",
    ...                                    input_shape=(64, 80))
    >>> (cfg.t_starts, cfg.steps, cfg.nfe_per_image((64, 80)))
    ((50,), 3, 3)
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from medidiff.anomaly.seeds import patch_seed, start_seed
from medidiff.constants import (
    ANOMALY_DEFAULTS,
    ANOMALY_METHODS,
    ENSEMBLE_STARTS,
    MULTI_START_METHODS,
    MULTI_STARTS,
)
from medidiff.diffusion import ModelFn, NoiseSchedule, denoise, forward_noise, partial_reconstruction
from medidiff.diffusion.samplers import sampler_for
from medidiff.errors import ConfigError
from medidiff.diffusion.noise import NOISE_KINDS, NoiseSpec, sample_noise

__all__ = [
    "METHODS",
    "MethodConfig",
    "patch_grid",
    "reconstruct",
    "thor_guide",
]

METHODS = ANOMALY_METHODS
#: Per-method defaults (t_start, sampler, steps): :data:`medidiff.constants.ANOMALY_DEFAULTS`.
_DEFAULTS = ANOMALY_DEFAULTS
_ENSEMBLE_STARTS = ENSEMBLE_STARTS
#: Samplers a method may use (the first is its default; a rectified-flow model takes
#: "euler" where the default is a diffusion sampler, see :meth:`MethodConfig.resolve`).
_ALLOWED_SAMPLERS = {
    "anoddpm": ("ddpm", "euler"),
    "ddim": ("ddim", "dpm++2m", "euler"),
    "x0": ("x0",),
    "patched": ("x0",),
    "ensemble": ("x0", "ddim", "dpm++2m", "ddpm", "euler"),
    "multi": ("ddim", "x0", "dpm++2m", "euler"),
    "thor": ("ddim", "ddpm", "euler"),
    "latent": ("ddim", "dpm++2m", "euler", "x0", "ddpm"),
}


def _int_or_none(value: Any, name: str, low: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}; got {value!r}")
    return int(value)


def _int_tuple(value: Any, name: str, low: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ConfigError(f"{name} must be one or more integers >= {low}; got {value!r}")
    return tuple(_int_or_none(v, name, low) for v in value)  # type: ignore[misc]


@dataclass(frozen=True)
class MethodConfig:
    """Which reconstruction method, and its settings.

    Fields left as ``None`` take the method's defaults when the detector calls
    :meth:`resolve` (which needs the checkpoint's noise, T and input size); a resolved
    config holds only concrete values and is what thresholds are tied to.

    Attributes:
        method: one of :data:`METHODS` (default ``"ddim"``).
        t_start: how far to noise, a timestep in ``0 .. T-1`` (default 250; ``ddim`` 50;
            ``patched`` 500). Not used by ``ensemble`` (see ``t_starts``).
        steps: network evaluations per start (default: ``anoddpm`` t_start + 1, the full
            chain; ``ddim`` 3; one-shot methods 1).
        sampler: the reverse sampler: ``anoddpm`` ``"ddpm"``; ``ddim`` ``"ddim"`` (or
            ``"dpm++2m"``); ``x0`` and ``patched`` ``"x0"``; ``ensemble`` ``"x0"`` by
            default, or any sampler with ``steps`` evaluations per start.
        noise: ``"gaussian"`` or ``"simplex"``; default the noise the checkpoint was
            trained with (``config.diffusion.noise``, with its simplex settings).
        eta: DDIM stochasticity (default 0, deterministic).
        clip: clamp every x_0 estimate to the model's intensity range [0, 1] (default True).
        t_starts: the starts of ``ensemble`` (default (250, 500, 750)); for the other
            methods it resolves to ``(t_start,)``.
        patch_size: ``patched`` only: the patch in voxels along each axis of the network
            input (default: half of it, rounded up).
        patch_stride: ``patched`` only: the step between patches (default: half the
            patch, i.e. 50 % overlap).
        window_overlap: overlap of the sliding windows (MONAI's
            ``sliding_window_inference``, Gaussian blending) when the scan's grid exceeds
            the size the model was trained on (default 0.25).
    """

    method: str = "ddim"
    t_start: int | None = None
    steps: int | None = None
    sampler: str | None = None
    noise: str | None = None
    eta: float = 0.0
    clip: bool = True
    t_starts: tuple[int, ...] | None = None
    patch_size: tuple[int, ...] | None = None
    patch_stride: tuple[int, ...] | None = None
    window_overlap: float = 0.25

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is unknown; use one of {', '.join(METHODS)}")
        set_("t_start", _int_or_none(self.t_start, "t_start", 0))
        set_("steps", _int_or_none(self.steps, "steps", 1))
        set_("t_starts", _int_tuple(self.t_starts, "t_starts", 0))
        set_("patch_size", _int_tuple(self.patch_size, "patch_size", 1))
        set_("patch_stride", _int_tuple(self.patch_stride, "patch_stride", 1))
        if self.sampler is not None and self.sampler not in _ALLOWED_SAMPLERS[self.method]:
            raise ConfigError(
                f"method {self.method!r} uses sampler {', '.join(_ALLOWED_SAMPLERS[self.method])}; "
                f"got sampler={self.sampler!r}"
            )
        if self.noise is not None and self.noise not in NOISE_KINDS:
            raise ConfigError(f"noise must be one of {', '.join(NOISE_KINDS)}; got {self.noise!r}")
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or self.eta < 0:
            raise ConfigError(f"eta must be a number >= 0; got {self.eta!r}")
        set_("eta", float(self.eta))
        if not isinstance(self.clip, bool):
            raise ConfigError(f"clip must be true or false; got {self.clip!r}")
        ov = self.window_overlap
        if isinstance(ov, bool) or not isinstance(ov, (int, float)) or not 0 <= ov < 1:
            raise ConfigError(f"window_overlap must be a number in [0, 1); got {ov!r}")
        set_("window_overlap", float(ov))
        several = self.method in MULTI_START_METHODS
        if several and self.t_start is not None:
            raise ConfigError(
                f"method {self.method!r} takes several starts: set t_starts, not t_start"
            )
        if not several and self.t_starts is not None and len(self.t_starts) > 1:
            raise ConfigError(f"method {self.method!r} has one start: set t_start, not t_starts")
        if self.method != "patched" and (self.patch_size or self.patch_stride):
            raise ConfigError("patch_size and patch_stride apply to method 'patched' only")
        sampler = self.sampler or _ALLOWED_SAMPLERS[self.method][0]
        if sampler == "x0" and self.steps not in (None, 1):
            raise ConfigError(
                f"method {self.method!r} with sampler 'x0' is one-shot; steps must be 1"
            )

    @property
    def is_resolved(self) -> bool:
        """Whether every default has been filled in (see :meth:`resolve`)."""
        return None not in (self.steps, self.sampler, self.noise, self.t_starts) and (
            self.method != "patched" or self.patch_size is not None
        )

    def resolve(
        self, *, num_train_timesteps: int, noise: str, input_shape: Sequence[int],
        prediction_type: str = "epsilon",
    ) -> MethodConfig:
        """Fill in the defaults for a checkpoint.

        Args:
            num_train_timesteps: T of the checkpoint's schedule.
            noise: the checkpoint's training noise (used when ``noise`` is None).
            input_shape: the spatial shape the network sees (a slice ``(X, Y)`` or a
                volume / window ``(X, Y, Z)``); sets the default patch.
            prediction_type: the checkpoint's; a rectified-flow model (``"flow"``) takes
                the ``"euler"`` sampler where the method's default is a diffusion sampler.

        Returns:
            A resolved copy.

        Raises:
            ConfigError: a start outside ``0 .. T-1``, too many steps, or a patch larger
                than the input.
        """
        default_t, default_sampler, default_steps = _DEFAULTS[self.method]
        sampler = sampler_for(prediction_type, self.sampler, default_sampler)
        if self.method in MULTI_START_METHODS:
            starts = self.t_starts or (_ENSEMBLE_STARTS if self.method == "ensemble" else MULTI_STARTS)
            t_start = None
        else:
            t_start = (
                self.t_start
                if self.t_start is not None
                else (self.t_starts[0] if self.t_starts else default_t)
            )
            starts = (t_start,)
        T = int(num_train_timesteps)
        for t in starts:
            if not 0 <= t < T:
                raise ConfigError(f"t_start {t} is outside the checkpoint's timesteps 0 .. {T - 1}")
        steps = self.steps
        if steps is None:
            steps = default_steps if default_steps is not None else min(starts) + 1
            if self.method == "ensemble" and sampler != "x0":
                steps = 10
        steps = min(steps, min(starts) + 1) if self.steps is None else steps
        if steps > min(starts) + 1:
            raise ConfigError(f"steps={steps} exceeds t_start + 1 = {min(starts) + 1}")
        patch_size = patch_stride = None
        if self.method == "patched":
            dims = len(input_shape)
            patch_size = self.patch_size or tuple((int(s) + 1) // 2 for s in input_shape)
            if len(patch_size) == 1:
                patch_size = patch_size * dims
            patch_stride = self.patch_stride or tuple(max(1, (p + 1) // 2) for p in patch_size)
            if len(patch_stride) == 1:
                patch_stride = patch_stride * dims
            if len(patch_size) != dims or len(patch_stride) != dims:
                raise ConfigError(
                    f"patch_size and patch_stride need {dims} values for a {dims}D input"
                )
            if any(p > s for p, s in zip(patch_size, input_shape)):
                raise ConfigError(
                    f"patch_size {patch_size} exceeds the network input {tuple(input_shape)}"
                )
        return replace(
            self,
            t_start=t_start,
            steps=steps,
            sampler=sampler,
            noise=self.noise or noise,
            t_starts=tuple(starts),
            patch_size=patch_size,
            patch_stride=patch_stride,
        )

    def nfe_per_image(self, input_shape: Sequence[int]) -> int:
        """Network evaluations per network input (slice, volume or window) of a resolved config."""
        if not self.is_resolved:
            raise ConfigError("resolve the method config first (MethodConfig.resolve)")
        patches = (
            len(patch_grid(input_shape, self.patch_size, self.patch_stride))
            if (self.method == "patched")
            else 1
        )
        return len(self.t_starts) * int(self.steps) * patches  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings (tuples as lists)."""
        out = asdict(self)
        for key in ("t_starts", "patch_size", "patch_stride"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> MethodConfig:
        """Build from a dict (e.g. a thresholds file), refusing unknown keys.

        Raises:
            ConfigError: unknown key or bad value.
        """
        raw = dict(raw or {})
        known = [f.name for f in fields(cls)]
        for key in raw:
            if key not in known:
                raise ConfigError(f"method.{key} is unknown; known keys: {', '.join(known)}")
        for key in ("t_starts", "patch_size", "patch_stride"):
            if isinstance(raw.get(key), list):
                raw[key] = tuple(raw[key])
        return cls(**raw)


def patch_grid(
    shape: Sequence[int], patch_size: Sequence[int] | None, stride: Sequence[int] | None
) -> list[tuple[slice, ...]]:
    """The patches of ``patched``: a regular grid of boxes covering ``shape``.

    Along each axis the starts are ``0, stride, 2 stride, ...`` plus a last patch flush
    with the far edge, so every voxel is covered.

    Args:
        shape: spatial shape ``(X, Y[, Z])``.
        patch_size: patch size per axis.
        stride: step per axis.

    Returns:
        One tuple of slices per patch.
    """
    if patch_size is None or stride is None:
        raise ConfigError("patch_size and patch_stride are needed (resolve the method config)")
    axes = []
    for n, p, s in zip(shape, patch_size, stride):
        p = min(int(p), int(n))
        starts = list(range(0, int(n) - p + 1, int(s)))
        if starts[-1] != n - p:
            starts.append(int(n) - p)
        axes.append([slice(a, a + p) for a in starts])
    return list(itertools.product(*axes))


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, max(1, size))]


@torch.no_grad()
def reconstruct(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    images: Tensor,
    config: MethodConfig,
    *,
    seeds: Sequence[int],
    noise_spec: NoiseSpec,
    prediction_type: str = "epsilon",
    batch_size: int = 16,
) -> Tensor:
    """Reconstruct images with a resolved method.

    Args:
        model_fn: ``(x_t, t) -> output`` of the checkpoint's model.
        schedule: the checkpoint's noise schedule.
        images: x_0 on the model's intensity scale, ``(B, 1, H, W[, D])``.
        config: a resolved :class:`MethodConfig`.
        seeds: one base seed per image (:func:`medidiff.anomaly.seeds.input_seed` of the
            scan name and slice); the noise of start ``k`` (and patch ``p``) comes from
            :func:`~medidiff.anomaly.seeds.start_seed` (and
            :func:`~medidiff.anomaly.seeds.patch_seed`).
        noise_spec: the noise (its ``kind`` should be ``config.noise``).
        prediction_type: what the model outputs.
        batch_size: at most this many images per network call.

    Returns:
        x_hat, ``(B, K, H, W[, D])``: one reconstruction per start (K = len(t_starts)).
    """
    if not config.is_resolved:
        raise ConfigError("resolve the method config first (MethodConfig.resolve)")
    if len(seeds) != images.shape[0]:
        raise ConfigError(f"need one seed per image: {images.shape[0]} images, {len(seeds)} seeds")
    clip_range = (0.0, 1.0) if config.clip else None
    outputs = []
    for k, t in enumerate(config.t_starts):  # type: ignore[arg-type]
        if config.method == "patched":
            recon = _patched(
                model_fn,
                schedule,
                images,
                t,
                config,
                seeds=[start_seed(s, k) for s in seeds],
                noise_spec=noise_spec,
                prediction_type=prediction_type,
                clip_range=clip_range,
                batch_size=batch_size,
            )
        else:
            recon = torch.empty_like(images)
            for part in _chunks(images.shape[0], batch_size):
                result = partial_reconstruction(
                    model_fn,
                    schedule,
                    images[part],
                    t,
                    sampler=config.sampler,  # type: ignore[arg-type]
                    steps=config.steps,
                    noise_spec=noise_spec,
                    seeds=[start_seed(s, k) for s in seeds[part]],
                    eta=config.eta,
                    prediction_type=prediction_type,
                    clip_range=clip_range,
                    guide=(
                        thor_guide(schedule, images[part], prediction_type)
                        if config.method == "thor"
                        else None
                    ),
                )
                recon[part] = result.reconstruction
        outputs.append(recon)
    return torch.cat(outputs, dim=1)


#: THOR's anomaly weight is smoothed over a box of this many voxels per axis
THOR_SMOOTHING = 5


def thor_guide(schedule: NoiseSchedule, x0: Tensor, prediction_type: str) -> Any:
    """THOR's harmonisation of each intermediate state with the input (Bercea et al.,
    "Diffusion models with implicit guidance for medical anomaly detection", MICCAI 2024).

    After a reverse step to ``t_prev`` the current estimate of the clean image
    ``x_0_hat`` is compared with the input: the residual ``|x_0_hat - x_0|`` is smoothed
    (a box of :data:`THOR_SMOOTHING` voxels) and scaled by its maximum per image into a
    weight ``m`` in [0, 1] (1: most anomalous); the next step starts from
    ``m * x_{t_prev} + (1 - m) * q(x_0, t_prev)``, the input noised to the same level with
    the same noise. Healthy regions stay on the input's trajectory, so they come back close
    to it, and only suspected anomalies are repainted: fewer false positives at a
    larger ``t`` than a plain reconstruction could afford.

    Args:
        schedule: the noise schedule.
        x0: the inputs, ``(B, C, H, W[, D])``.
        prediction_type: the model's (sets the forward path).

    Returns:
        A ``guide(t_prev, x_prev, pred_x0, eps)`` for
        :func:`~medidiff.diffusion.partial_reconstruction`.
    """
    dims = x0.ndim - 2
    pool = torch.nn.functional.avg_pool2d if dims == 2 else torch.nn.functional.avg_pool3d
    spatial = tuple(range(2, x0.ndim))

    def guide(t_prev: int, x_prev: Tensor, pred_x0: Tensor, eps: Tensor) -> Tensor:
        residual = (pred_x0 - x0).abs()
        smooth = pool(residual, THOR_SMOOTHING, stride=1, padding=THOR_SMOOTHING // 2,
                      count_include_pad=False)
        weight = smooth / smooth.amax(dim=spatial, keepdim=True).clamp_min(1e-6)
        noised_input = forward_noise(schedule.to(x0.device), x0, t_prev, eps,
                                     prediction_type=prediction_type)
        return weight * x_prev + (1 - weight) * noised_input

    return guide


def _patched(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    images: Tensor,
    t: int,
    config: MethodConfig,
    *,
    seeds: Sequence[int],
    noise_spec: NoiseSpec,
    prediction_type: str,
    clip_range: tuple[float, float] | None,
    batch_size: int,
) -> Tensor:
    """pDDPM: for each patch P, x_t = x_0 outside P and q_sample(x_0, t) inside; predict x_0
    in one pass; keep the prediction inside P; average where patches overlap."""
    spatial = tuple(images.shape[2:])
    patches = patch_grid(spatial, config.patch_size, config.patch_stride)
    # every (image, patch) pair is one network input; batched across images and patches
    pairs = [(b, p) for b in range(images.shape[0]) for p in range(len(patches))]
    total = torch.zeros_like(images)
    count = torch.zeros_like(images)
    for part in _chunks(len(pairs), batch_size):
        chunk = pairs[part]
        x0 = images[[b for b, _ in chunk]]
        inside = torch.zeros_like(x0, dtype=torch.bool)
        for i, (_, p) in enumerate(chunk):
            inside[(i, slice(None), *patches[p])] = True
        chunk_seeds = [patch_seed(seeds[b], p) for b, p in chunk]
        eps = sample_noise(
            noise_spec, tuple(x0.shape), seeds=chunk_seeds, device=x0.device, dtype=x0.dtype
        )
        noised = forward_noise(schedule.to(x0.device), x0, t, eps, prediction_type=prediction_type)
        x_t = torch.where(inside, noised, x0)
        pred = denoise(
            model_fn,
            schedule,
            x_t,
            t,
            sampler="x0",
            seeds=chunk_seeds,
            noise_spec=noise_spec,
            prediction_type=prediction_type,
            clip_range=clip_range,
        ).reconstruction
        for i, (b, p) in enumerate(chunk):
            region = (b, slice(None), *patches[p])
            total[region] += pred[(i, slice(None), *patches[p])]
            count[region] += 1
    return total / count.clamp_min(1)
