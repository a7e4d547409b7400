"""Generate new scans from a trained checkpoint.

A checkpoint, loaded once as a :class:`~medidiff.models.loaded.LoadedModel`, knows
everything synthesis needs: the network (``model_kwargs`` + weights),
the diffusion process it was trained with (schedule, prediction type, Gaussian or simplex
noise), the model grid (:class:`~medidiff.data.transforms.Preprocessing`: spacing, shape, RAS)
and, since training recorded it, a typical intensity map of the training scans
(``extra["intensity_reference"]``) and the class names of a class-conditional model
(``extra["class_names"]``).

What comes out depends on the model:

- a **3D** model generates whole volumes ``(X, Y, Z)`` on the model grid (kind
  ``"3d-volume"``);
- a **2D** model generates single axial slices (kind ``"2d-slice"``), written as NIfTI
  volumes of shape ``(X, Y, 1)`` with the in-plane spacing and the slice thickness of the
  training grid. Slices are independent samples: a stack of them is not a volume, and
  nothing here pretends it is.

Geometry: the model grid's RAS affine centred at the world origin
(:meth:`Preprocessing.grid_affine`), so viewers show the sample centred and the right
way up. Intensities: mapped from the model's [0, 1] back to the training data's scale with
the recorded reference (MRI: the median 1st/99th foreground percentiles of the training
scans; CT: the HU window); without a reference they stay on [0, 1] and the manifest's
``intensity`` column says so.

Reproducibility: sample ``i`` draws all its noise from a generator seeded with
``seed + i`` (:func:`medidiff.diffusion.sampling.sample` with per-sample ``seeds``), so it is the
same whatever the batch size, the number of ranks or an interruption and resume (on the
same kind of device).

Example (an untrained tiny model, so the samples are noise; a trained run's
``model.safetensors`` is used the same way):
    >>> import tempfile, pathlib
    >>> from medidiff.models.checkpoint import save_inference
    >>> from medidiff.models.unet import build_model, model_kwargs
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> _ = save_inference(path, build_model(2, "tiny"), model_kwargs=model_kwargs(2, "tiny"),
    ...                    config={"name": "doc", "model": {"spatial_dims": 2, "preset": "tiny"}},
    ...                    preprocessing={"shape": [16, 16, 8], "spacing": [2.0, 2.0, 3.0]})
    >>> synth = Synthesizer(path, device="cpu", sampler="ddim", steps=2)
    >>> [(s.index, s.seed, s.array.shape, s.volume.shape) for s in synth.generate([0, 1], seed=10)]
    [(0, 10, (16, 16), (16, 16, 1)), (1, 11, (16, 16), (16, 16, 1))]
    >>> synth.generate([0], seed=10).__next__().volume.spacing
    (2.0, 2.0, 3.0)
"""

from __future__ import annotations

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medidiff.constants import GENERATIVE_SAMPLERS, SYNTHESIS_DEFAULT_STEPS
from medidiff.diffusion.samplers import sampler_for
from medidiff.errors import CheckpointError, ConfigError
from medidiff.io.volume import Volume

__all__ = [
    "DEFAULT_STEPS",
    "KINDS",
    "SAMPLERS",
    "SynthSample",
    "Synthesizer",
]

#: Samplers that generate from pure noise (the one-shot ``"x0"`` predictor does not).
SAMPLERS = GENERATIVE_SAMPLERS

#: Network evaluations per sample when ``steps`` is not given
#: (:data:`medidiff.constants.SYNTHESIS_DEFAULT_STEPS`: DDPM all T, DDIM 50, DPM-Solver++ 20,
#: Euler 30).
DEFAULT_STEPS = SYNTHESIS_DEFAULT_STEPS

#: What a sample is, by the model's ``spatial_dims``.
KINDS = {2: "2d-slice", 3: "3d-volume"}

#: ``intensity`` values of a synthesis run: native = mapped to the training data's scale;
#: model_0_1 = left on the model's [0, 1] scale (the checkpoint has no intensity reference).
INTENSITY_NATIVE, INTENSITY_MODEL = "native", "model_0_1"


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SynthSample:
    """One generated sample.

    Attributes:
        index: the sample's index (its file is ``synth_{index:05d}.nii.gz``).
        seed: the seed of all its noise, ``seed + index``.
        array: the sample on the model grid and scale: ``(X, Y)`` for a 2D model,
            ``(X, Y, Z)`` for a 3D one, float32, about [0, 1].
        volume: the sample as written: ``(X, Y, 1)`` or ``(X, Y, Z)`` with the output
            affine (RAS, model spacing, centred at the origin) and native intensities
            (or [0, 1] without an intensity reference).
        seconds: wall time of its batch divided by the batch size.
        nfe: network evaluations of its batch (with guidance > 0 and != 1 each one runs
            the network on a doubled batch).
    """

    index: int
    seed: int
    array: np.ndarray
    volume: Volume
    seconds: float
    nfe: int


# --------------------------------------------------------------------------------------------
# the synthesizer
# --------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _load(checkpoint: Any, device: torch.device) -> Any:
    """The :class:`~medidiff.models.loaded.LoadedModel` of a path, a read checkpoint or a
    loaded model; refuses a checkpoint without preprocessing (no output geometry)."""
    from medidiff.models.loaded import LoadedModel, load_model

    if checkpoint is None or (isinstance(checkpoint, str) and not checkpoint.strip()):
        raise CheckpointError(
            "no checkpoint given: pass --checkpoint PATH/model.safetensors (a model "
            "written by `medidiff train`) or a shipped model's name (brain_mri_2d, brain_mri_3d)"
        )
    loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load_model(checkpoint, device)
    if not loaded.checkpoint.preprocessing:
        raise CheckpointError(
            f"{loaded.checkpoint.path}: records no preprocessing (model grid); it cannot define "
            "the output geometry. Re-export it with "
            "medidiff.models.checkpoint.save_inference(..., preprocessing=...)"
        )
    return loaded


def _sampling_args(
    sampler: str, steps: int | None, batch_size: int, num_train_timesteps: int
) -> tuple[str, int, int]:
    """Checked ``(sampler, steps, batch_size)``; ``steps=None`` takes the sampler's default."""
    T = int(num_train_timesteps)
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {sampler!r} is unknown; use one of {', '.join(SAMPLERS)}")
    resolved = DEFAULT_STEPS[sampler] if steps is None else steps
    resolved = T if resolved is None else resolved
    if not _is_int(resolved) or not 1 <= resolved <= T:
        raise ConfigError(
            f"--steps must be an integer in 1 .. {T} (the model's timesteps); got {steps!r}"
        )
    if not _is_int(batch_size) or batch_size < 1:
        raise ConfigError(f"--batch-size must be an integer >= 1; got {batch_size!r}")
    return sampler, int(resolved), int(batch_size)


class Synthesizer:
    """Samples new scans from an inference checkpoint.

    Args:
        checkpoint: ``model.safetensors`` written by ``medidiff train``, an already read
            :class:`~medidiff.models.checkpoint.InferenceCheckpoint`, or a
            :class:`~medidiff.models.loaded.LoadedModel`.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or a
            :class:`torch.device`.
        sampler: ``"ddim"`` (deterministic, eta = 0), ``"dpm++2m"`` (DPM-Solver++(2M)),
            ``"ddpm"`` (ancestral; its step noise has the training noise's kind) or
            ``"euler"`` (rectified-flow models); ``None`` (default): ``"ddim"``, or
            ``"euler"`` for a rectified-flow model.
        steps: network evaluations per sample, ``1 .. T``; ``None`` takes the sampler's
            default (:data:`DEFAULT_STEPS`: DDPM all T, DDIM 50, DPM-Solver++ 20, Euler 30).
        batch_size: samples generated together (memory/speed only: samples do not
            depend on it).
        label: for a class-conditional model, the class to generate: a name from the
            checkpoint's ``class_names`` or an index; ``None`` samples unconditionally
            (the null class). Refused for an unconditional model.
        guidance: classifier-free guidance weight w (Ho & Salimans 2022):
            eps = eps_uncond + w (eps_cond - eps_uncond). 0 is exactly the unconditional
            model, 1 exactly the conditional one, w > 1 strengthens the class. ``None``
            (default) means 1 with a label and 0 without.
        progress: show a progress bar over each batch's sampling steps.

    Raises:
        CheckpointError: the checkpoint cannot be read or its records are unusable.
        ConfigError: a bad sampler, steps, batch size, label or guidance.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | Any,
        *,
        device: str | torch.device = "auto",
        sampler: str | None = None,
        steps: int | None = 50,
        batch_size: int = 4,
        label: str | int | None = None,
        guidance: float | None = None,
        progress: bool = False,
    ) -> None:
        from medidiff.models.unet import prepare_for_inference
        from medidiff.runtime.distributed import resolve_device

        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.loaded = _load(checkpoint, self.device)
        loaded = self.loaded
        self.checkpoint = loaded.checkpoint
        self.config = loaded.config
        self.preprocessing = loaded.preprocessing
        self.spatial_dims = loaded.spatial_dims
        if self.spatial_dims not in KINDS:
            raise CheckpointError(
                f"{self.checkpoint.path}: spatial_dims must be 2 or 3; got {self.spatial_dims}"
            )
        if loaded.conditioning.mask_conditional:
            legend = ", ".join(f"{i + 1}={n}" for i, n in enumerate(loaded.conditioning.labels))
            raise ConfigError(
                f"{self.checkpoint.path} is a mask-conditioned model: give --mask LABEL_MAPS "
                f"(label maps with 0=background, {legend})"
            )
        self.kind = KINDS[self.spatial_dims]
        #: the sample shape the network sees, without batch and channel: (X, Y) or (X, Y, Z)
        grid = self.preprocessing.shape
        self.spatial_shape: tuple[int, ...] = tuple(grid[:2]) if self.spatial_dims == 2 else tuple(grid)
        #: a latent model's codec (samples are latents, decoded to images), else None
        self.codec = loaded.autoencoder
        #: what the sampler generates, without batch: (C, *spatial) of an image or a latent
        self.sample_shape: tuple[int, ...] = (
            tuple(self.codec.latent_shape(self.spatial_shape)) if self.codec is not None
            else (1, *self.spatial_shape)
        )
        self.schedule = loaded.schedule
        self.prediction_type = loaded.prediction_type
        self.noise_spec = loaded.noise_spec
        if sampler is None or sampler in SAMPLERS:
            sampler = sampler_for(self.prediction_type, sampler, "ddim")
        self.sampler, self.steps, self.batch_size = _sampling_args(
            sampler, steps, batch_size, self.schedule.num_train_timesteps
        )
        self.progress = progress
        # The model's data live on [0, 1] when preprocessing clips; clamping every x_0
        # estimate to that range is DDPM's ``clip_sample`` for this data range.
        self.clip_range: tuple[float, float] | None = (0.0, 1.0) if self.preprocessing.clip else None
        if self.codec is not None:  # latents are not on [0, 1]: the decoded image is clipped
            self.image_clip, self.clip_range = self.clip_range, None
        else:
            self.image_clip = None

        self.class_names: tuple[str, ...] = loaded.conditioning.class_names
        self.num_classes: int | None = loaded.conditioning.num_classes
        self.label_index, self.label_name = self._resolve_label(label)
        self.guidance = self._resolve_guidance(guidance)
        self.intensity_reference: dict[str, Any] | None = loaded.intensity_reference
        self.model = prepare_for_inference(loaded.model, self.device)

    def _resolve_label(self, label: str | int | None) -> tuple[int | None, str | None]:
        path = self.checkpoint.path
        if label is None:
            if self.num_classes is not None and self.loaded.conditioning.cond_drop_prob <= 0:
                raise ConfigError(
                    f"{path}: this class-conditional model was trained without condition "
                    "dropout (train.cond_drop_prob = 0), so it has no unconditional mode; pass "
                    f"--label ({self._known_labels()})"
                )
            return None, None
        if self.num_classes is None:
            raise ConfigError(
                f"--label {label!r}: {path} is an unconditional model (trained without "
                "model.num_class_embeds); drop --label"
            )
        if isinstance(label, str) and label in self.class_names:
            index = self.class_names.index(label)
        elif _is_int(label) or (isinstance(label, str) and label.strip().lstrip("-").isdigit()):
            index = int(label)
            if not 0 <= index < self.num_classes:
                raise ConfigError(
                    f"--label {label!r}: class index out of range 0 .. {self.num_classes - 1} "
                    f"({self._known_labels()})"
                )
        else:
            raise ConfigError(f"--label {label!r} is not a class of {path}; {self._known_labels()}")
        name = self.class_names[index] if index < len(self.class_names) else str(index)
        return index, name

    def _known_labels(self) -> str:
        if self.class_names:
            listed = ", ".join(f"{i}={n}" for i, n in enumerate(self.class_names))
            return f"known labels: {listed}"
        return f"known labels: indices 0 .. {(self.num_classes or 1) - 1} (no class names recorded)"

    def _resolve_guidance(self, guidance: float | None) -> float:
        if guidance is None:
            return self.loaded.conditioning.default_guidance(self.label_index)
        number = isinstance(guidance, (int, float)) and not isinstance(guidance, bool)
        if not number or not math.isfinite(guidance) or guidance < 0:
            raise ConfigError(f"--guidance must be a number >= 0; got {guidance!r}")
        if self.label_index is None and guidance != 0:
            raise ConfigError(
                "--guidance needs --label: classifier-free guidance steers towards a class"
                + (f" ({self._known_labels()})" if self.num_classes is not None else
                   f"; {self.checkpoint.path} is an unconditional model")
            )
        if guidance != 1 and self.label_index is not None and self.loaded.conditioning.cond_drop_prob <= 0:
            raise ConfigError(
                f"--guidance {guidance:g}: {self.checkpoint.path} was trained without condition "
                "dropout (train.cond_drop_prob = 0), so only --guidance 1 (plain conditional) is valid"
            )
        return float(guidance)

    # ---- geometry and intensities ----------------------------------------------------------
    @property
    def output_shape(self) -> tuple[int, int, int]:
        """The written volumes' shape: ``(X, Y, 1)`` for 2D models, ``(X, Y, Z)`` for 3D."""
        x, y, z = self.preprocessing.shape
        return (x, y, 1) if self.spatial_dims == 2 else (x, y, z)

    @property
    def output_affine(self) -> np.ndarray:
        """RAS voxel-to-world affine of the written volumes, grid centred at the origin.

        A 2D slice keeps the training grid's in-plane spacing and its slice thickness
        (the z spacing): the affine of one axial slice of the model grid.
        """
        return replace(self.preprocessing, shape=self.output_shape).grid_affine()

    @property
    def intensity_mapping(self) -> str:
        """:data:`INTENSITY_NATIVE` with an intensity reference, else :data:`INTENSITY_MODEL`."""
        return INTENSITY_NATIVE if self.intensity_reference is not None else INTENSITY_MODEL

    def to_volume(self, array: np.ndarray, **meta: Any) -> Volume:
        """A model-grid sample as the written volume (output geometry, native intensities).

        Args:
            array: ``(X, Y)`` (2D) or ``(X, Y, Z)`` (3D) on the model scale.
            meta: extra ``Volume.meta`` entries.
        """
        from medidiff.data.transforms import intensity_to_native

        values = np.asarray(array, dtype=np.float32).reshape(self.output_shape)
        if self.intensity_reference is not None:
            values = intensity_to_native(values, self.intensity_reference)
        return Volume(values.astype(np.float32), self.output_affine, {"synthetic": True, **meta})

    def to_model_scale(self, values: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_volume`'s intensity map: written values -> model scale."""
        from medidiff.data.transforms import intensity_to_model

        if self.intensity_reference is None:
            return np.asarray(values, dtype=np.float32)
        return intensity_to_model(values, self.intensity_reference)

    # ---- sampling -------------------------------------------------------------------------
    def model_fn(self, batch: int) -> Any:
        """The denoiser the sampler calls for a batch of ``batch`` samples.

        An unconditional model is called as is. A conditional one goes through
        :func:`medidiff.diffusion.guidance.guided_model_fn`: without a label, every sample
        gets the null class (the last embedding row) at guidance 0, which is one network
        pass on the null label, exactly the unconditional path
        (:func:`medidiff.diffusion.guidance.conditional_model_fn`).
        """
        from medidiff.diffusion.guidance import conditional_model_fn

        return conditional_model_fn(
            self.model, self.num_classes, batch, label=self.label_index, guidance=self.guidance,
            device=self.device,
        )

    def generate(self, indices: Iterable[int], seed: int = 0) -> Iterator[SynthSample]:
        """Generate the samples ``indices``, ``batch_size`` at a time.

        Args:
            indices: sample indices (non-negative ints); sample ``i`` uses seed ``seed + i``.
            seed: the run's base seed.

        Yields:
            One :class:`SynthSample` per index, in the given order.

        Raises:
            ConfigError: a negative or non-integer index or seed.
        """
        from medidiff.diffusion.sampling import sample

        if not _is_int(seed) or seed < 0:
            raise ConfigError(f"--seed must be an integer >= 0; got {seed!r}")
        order = list(indices)
        for i in order:
            if not _is_int(i) or i < 0:
                raise ConfigError(f"sample indices must be integers >= 0; got {i!r}")
        for start in range(0, len(order), self.batch_size):
            chunk = [int(i) for i in order[start : start + self.batch_size]]
            seeds = [int(seed) + i for i in chunk]
            began = time.perf_counter()
            result = sample(
                self.model_fn(len(chunk)), self.schedule, (len(chunk), *self.sample_shape),
                sampler=self.sampler, steps=self.steps, seeds=seeds, noise_spec=self.noise_spec,
                device=self.device, prediction_type=self.prediction_type,
                clip_range=self.clip_range, progress=self.progress,
            )
            images = self.decode(result.sample)
            arrays = images[:, 0].float().cpu().numpy()  # synchronises CUDA
            seconds = (time.perf_counter() - began) / len(chunk)
            for index, sample_seed, array in zip(chunk, seeds, arrays):
                yield SynthSample(
                    index=index, seed=sample_seed, array=array,
                    volume=self.to_volume(array, seed=sample_seed), seconds=seconds, nfe=result.nfe,
                )

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Images of sampled network outputs: a latent model's latents are decoded (in tiles
        where the model says so) and clipped to the data range; images pass unchanged."""
        if self.codec is None:
            return samples
        # one sample at a time: the decoder's memory stays that of one volume
        images = torch.cat([self.codec.decode(samples[i : i + 1]) for i in range(samples.shape[0])])
        if self.image_clip is not None:
            images = images.clamp(*self.image_clip)
        return images

    # ---- provenance -------------------------------------------------------------------------
    def settings(self, seed: int) -> dict[str, Any]:
        """Everything that defines the samples of a run with base ``seed`` (JSON-ready)."""
        from medidiff import __version__

        ckpt = self.checkpoint
        return {
            "medidiff_version": __version__,
            "checkpoint": str(Path(ckpt.path).resolve()),
            "checkpoint_sha256": ckpt.sha256,
            "checkpoint_step": ckpt.extra.get("step"),  # as recorded (Provenance.step is typed)
            "kind": self.kind,
            "spatial_dims": self.spatial_dims,
            "sampler": self.sampler,
            "steps": self.steps,
            "seed": int(seed),
            "seeding": "sample i uses seed + i for all its noise",
            "label": self.label_name,
            "label_index": self.label_index,
            "class_names": list(self.class_names),
            "guidance": self.guidance,
            "eta": 0.0,
            "clip_range": list(self.clip_range) if self.clip_range else None,
            "prediction_type": self.prediction_type,
            "noise": {"kind": self.noise_spec.kind, "octaves": self.noise_spec.octaves,
                      "persistence": self.noise_spec.persistence, "frequency": self.noise_spec.frequency},
            "schedule": self.schedule.config(),
            "batch_size": self.batch_size,
            "device": str(self.device),
            "preprocessing": self.preprocessing.to_dict(),
            # the 2D slice filter of training, so evaluation compares with the same slices
            "min_foreground": float(self.config.data.min_foreground),
            "model_grid_shape": list(self.spatial_shape),
            "output_shape": list(self.output_shape),
            "output_spacing": list(self.preprocessing.spacing),
            "output_affine": self.output_affine.tolist(),
            "intensity": self.intensity_mapping,
            "intensity_reference": self.intensity_reference,
            "latent": None if self.codec is None else {
                **self.codec.describe(), "latent_shape": list(self.sample_shape),
                "image_clip": list(self.image_clip) if self.image_clip else None,
            },
        }
