"""Generate new scans from a trained checkpoint.

A checkpoint knows everything synthesis needs: the network (``model_kwargs`` + weights),
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
``seed + i`` (:func:`medidiff.diffusion.sample` with per-sample ``seeds``), so it is the
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

import csv
import io
import json
import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medidiff.errors import CheckpointError, ConfigError, OutputError
from medidiff.io.volume import Volume

__all__ = [
    "DEFAULT_STEPS",
    "KINDS",
    "MANIFEST_COLUMNS",
    "SAMPLERS",
    "SynthSample",
    "SynthesisSummary",
    "Synthesizer",
    "read_manifest",
    "synth_file_name",
    "synthesize_to_folder",
]

#: Samplers that generate from pure noise (the one-shot ``"x0"`` predictor does not).
SAMPLERS = ("ddpm", "ddim", "dpm++2m")

#: Network evaluations per sample when ``steps`` is not given: DDPM runs the whole
#: ancestral chain (``None`` = all T timesteps); DDIM 50 (Pinaya et al. 2022's brain LDM);
#: DPM-Solver++(2M) 20 (Lu et al. 2022 report good samples at 10-20).
DEFAULT_STEPS: dict[str, int | None] = {"ddpm": None, "ddim": 50, "dpm++2m": 20}

#: What a sample is, by the model's ``spatial_dims``.
KINDS = {2: "2d-slice", 3: "3d-volume"}

#: Columns of ``DIR/manifest.csv``, in order.
MANIFEST_COLUMNS = (
    "file", "index", "seed", "sampler", "steps", "label", "guidance", "seconds", "kind",
    "nfe", "intensity",
)

#: ``intensity`` column values: native = mapped to the training data's scale;
#: model_0_1 = left on the model's [0, 1] scale (the checkpoint has no intensity reference).
INTENSITY_NATIVE, INTENSITY_MODEL = "native", "model_0_1"

MANIFEST_NAME = "manifest.csv"
CONFIG_NAME = "synthesis_config.json"
MONTAGE_NAME = "montage.png"
METRICS_NAME = "synthesis_metrics.json"  # written here by `medidiff evaluate-synthesis`
_FILE_RE = re.compile(r"^synth_(\d{5,})\.nii\.gz$")
_MONTAGE_MAX = 16

#: Settings that make two runs produce different samples; an existing folder made with
#: other values is refused (``overwrite`` starts it afresh).
IDENTITY_KEYS = (
    "checkpoint_sha256", "kind", "sampler", "steps", "seed", "label_index", "guidance",
    "clip_range", "eta", "output_shape", "intensity",
)


def synth_file_name(index: int) -> str:
    """``synth_00042.nii.gz`` for index 42 (at least five digits)."""
    return f"synth_{int(index):05d}.nii.gz"


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


@dataclass(frozen=True)
class SynthesisSummary:
    """What :func:`synthesize_to_folder` did.

    Attributes:
        out_dir: the output folder.
        generated: indices generated by this call (on this rank).
        skipped: indices of ``range(num)`` already present, left untouched.
        manifest: ``out_dir/manifest.csv`` (complete on rank 0).
        montage: ``out_dir/montage.png``, or ``None`` when not written.
        config: ``out_dir/synthesis_config.json``.
        kind: ``"2d-slice"`` or ``"3d-volume"``.
        num_files: samples listed in the manifest (the whole folder, on rank 0).
        seconds: wall time of the call.
        repaired: one line per damaged file found on resume (a sample file that does not
            load, or has another shape, was deleted and generated again; an unreadable
            manifest was rebuilt from the sample files); rank 0 only.
    """

    out_dir: Path
    generated: tuple[int, ...]
    skipped: tuple[int, ...]
    manifest: Path
    montage: Path | None
    config: Path
    kind: str
    num_files: int
    seconds: float
    repaired: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# the synthesizer
# --------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class Synthesizer:
    """Samples new scans from an inference checkpoint.

    Args:
        checkpoint: ``model.safetensors`` written by ``medidiff train`` (or an already
            loaded :class:`~medidiff.models.checkpoint.InferenceCheckpoint`).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or a
            :class:`torch.device`.
        sampler: ``"ddim"`` (deterministic, eta = 0), ``"dpm++2m"`` (DPM-Solver++(2M)) or
            ``"ddpm"`` (ancestral; its step noise has the training noise's kind).
        steps: network evaluations per sample, ``1 .. T``; ``None`` takes the sampler's
            default (:data:`DEFAULT_STEPS`: DDPM all T, DDIM 50, DPM-Solver++ 20).
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
        sampler: str = "ddim",
        steps: int | None = 50,
        batch_size: int = 4,
        label: str | int | None = None,
        guidance: float | None = None,
        progress: bool = False,
    ) -> None:
        from medidiff.models.checkpoint import InferenceCheckpoint, build_model_from_checkpoint, load_inference
        from medidiff.models.unet import prepare_for_inference
        from medidiff.config import Config
        from medidiff.diffusion import NoiseSchedule
        from medidiff.runtime.distributed import resolve_device
        from medidiff.diffusion.noise import NoiseSpec
        from medidiff.data.transforms import Preprocessing

        if checkpoint is None or (isinstance(checkpoint, str) and not checkpoint.strip()):
            raise CheckpointError(
                "no checkpoint given: pass --checkpoint PATH/model.safetensors (a model "
                "written by `medidiff train`) or a shipped model's name (brain_mri_2d, brain_mri_3d)"
            )
        ckpt = checkpoint if isinstance(checkpoint, InferenceCheckpoint) else load_inference(checkpoint)
        self.checkpoint = ckpt
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        if not ckpt.preprocessing:
            raise CheckpointError(
                f"{ckpt.path}: records no preprocessing (model grid); it cannot define the "
                "output geometry. Re-export it with "
                "medidiff.models.checkpoint.save_inference(..., preprocessing=...)"
            )
        try:
            self.config = Config.from_dict(ckpt.config)
            self.preprocessing = Preprocessing.from_dict(ckpt.preprocessing)
        except ConfigError as exc:
            raise CheckpointError(f"{ckpt.path}: its recorded training config is unusable: {exc}") from None
        self.spatial_dims = int(ckpt.model_kwargs.get("spatial_dims", self.config.model.spatial_dims))
        if self.spatial_dims not in KINDS:
            raise CheckpointError(f"{ckpt.path}: spatial_dims must be 2 or 3; got {self.spatial_dims}")
        self.kind = KINDS[self.spatial_dims]
        grid = self.preprocessing.shape
        #: the sample shape the network sees, without batch and channel: (X, Y) or (X, Y, Z)
        self.spatial_shape: tuple[int, ...] = tuple(grid[:2]) if self.spatial_dims == 2 else tuple(grid)

        d = self.config.diffusion
        self.schedule = NoiseSchedule.create(
            d.schedule, num_train_timesteps=d.num_train_timesteps, beta_start=d.beta_start,
            beta_end=d.beta_end,
        )
        self.prediction_type = d.prediction_type
        self.noise_spec = NoiseSpec(
            kind=d.noise, octaves=d.simplex_octaves, persistence=d.simplex_persistence,
            **({"frequency": d.simplex_frequency} if d.simplex_frequency else {}),
        )
        T = d.num_train_timesteps
        if sampler not in SAMPLERS:
            raise ConfigError(f"--sampler {sampler!r} is unknown; use one of {', '.join(SAMPLERS)}")
        self.sampler = sampler
        resolved = DEFAULT_STEPS[sampler] if steps is None else steps
        resolved = T if resolved is None else resolved
        if not _is_int(resolved) or not 1 <= resolved <= T:
            raise ConfigError(
                f"--steps must be an integer in 1 .. {T} (the model's timesteps); got {steps!r}"
            )
        self.steps = int(resolved)
        if not _is_int(batch_size) or batch_size < 1:
            raise ConfigError(f"--batch-size must be an integer >= 1; got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.progress = progress
        # The model's data live on [0, 1] when preprocessing clips; clamping every x_0
        # estimate to that range is DDPM's ``clip_sample`` for this data range.
        self.clip_range: tuple[float, float] | None = (0.0, 1.0) if self.preprocessing.clip else None

        self.class_names: tuple[str, ...] = tuple(str(n) for n in (ckpt.extra.get("class_names") or []))
        self.num_classes: int | None = self.config.model.num_class_embeds or None
        self.label_index, self.label_name = self._resolve_label(label)
        self.guidance = self._resolve_guidance(guidance)

        ref = ckpt.extra.get("intensity_reference")
        self.intensity_reference: dict[str, Any] | None = (
            dict(ref) if isinstance(ref, Mapping) and "a_min" in ref and "a_max" in ref else None
        )
        self.model = prepare_for_inference(build_model_from_checkpoint(ckpt, device=self.device).model, self.device)
        self._null_label: int | None = None
        if self.num_classes is not None:
            from medidiff.diffusion import resolve_null_label

            self._null_label = resolve_null_label(self.model)

    # ---- argument resolution -------------------------------------------------------------
    def _resolve_label(self, label: str | int | None) -> tuple[int | None, str | None]:
        path = self.checkpoint.path
        if label is None:
            if self.num_classes is not None and self.config.train.cond_drop_prob <= 0:
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
            return 1.0 if self.label_index is not None else 0.0
        number = isinstance(guidance, (int, float)) and not isinstance(guidance, bool)
        if not number or not math.isfinite(guidance) or guidance < 0:
            raise ConfigError(f"--guidance must be a number >= 0; got {guidance!r}")
        if self.label_index is None and guidance != 0:
            raise ConfigError(
                "--guidance needs --label: classifier-free guidance steers towards a class"
                + (f" ({self._known_labels()})" if self.num_classes is not None else
                   f"; {self.checkpoint.path} is an unconditional model")
            )
        if guidance != 1 and self.label_index is not None and self.config.train.cond_drop_prob <= 0:
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
        :func:`medidiff.diffusion.guided_model_fn`: without a label, every sample gets the
        null class (the last embedding row) at guidance 0, which is one network pass on
        the null label, exactly the unconditional path.
        """
        from medidiff.diffusion import guided_model_fn

        model = self.model
        if self.num_classes is None:
            return lambda x_t, t: model(x_t, timesteps=t)
        index = self._null_label if self.label_index is None else self.label_index
        labels = torch.full((batch,), int(index), dtype=torch.long, device=self.device)
        return guided_model_fn(model, labels, self.guidance)

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
        from medidiff.diffusion import sample

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
                self.model_fn(len(chunk)), self.schedule, (len(chunk), 1, *self.spatial_shape),
                sampler=self.sampler, steps=self.steps, seeds=seeds, noise_spec=self.noise_spec,
                device=self.device, prediction_type=self.prediction_type,
                clip_range=self.clip_range, progress=self.progress,
            )
            arrays = result.sample[:, 0].float().cpu().numpy()  # synchronises CUDA
            seconds = (time.perf_counter() - began) / len(chunk)
            for index, sample_seed, array in zip(chunk, seeds, arrays):
                yield SynthSample(
                    index=index, seed=sample_seed, array=array,
                    volume=self.to_volume(array, seed=sample_seed), seconds=seconds, nfe=result.nfe,
                )

    # ---- provenance -------------------------------------------------------------------------
    def settings(self, seed: int) -> dict[str, Any]:
        """Everything that defines the samples of a run with base ``seed`` (JSON-ready)."""
        from medidiff import __version__

        ckpt = self.checkpoint
        return {
            "medidiff_version": __version__,
            "checkpoint": str(Path(ckpt.path).resolve()),
            "checkpoint_sha256": ckpt.sha256,
            "checkpoint_step": ckpt.extra.get("step"),
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
        }

    def manifest_row(
        self, index: int, seed: int, seconds: float | str = "", nfe: int | str = ""
    ) -> dict[str, str]:
        """The manifest row of sample ``index`` (``seconds``/``nfe`` empty when unknown)."""
        return {
            "file": synth_file_name(index), "index": str(index), "seed": str(seed),
            "sampler": self.sampler, "steps": str(self.steps), "label": self.label_name or "",
            "guidance": f"{self.guidance:g}",
            "seconds": f"{seconds:.4f}" if isinstance(seconds, float) else str(seconds),
            "kind": self.kind, "nfe": str(nfe), "intensity": self.intensity_mapping,
        }


# --------------------------------------------------------------------------------------------
# writing a folder of samples
# --------------------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a ``manifest.csv`` (``[]`` when missing or unreadable)."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return [dict(row) for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _write_manifest(path: Path, rows: Iterable[Mapping[str, str]]) -> None:
    from medidiff.io.volume import write_text_atomic

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: int(r["index"])):
        writer.writerow(row)
    write_text_atomic(path, buffer.getvalue())


def _existing_indices(out: Path) -> set[int]:
    """Indices of the complete sample files in ``out`` (writes are atomic: present = complete)."""
    if not out.is_dir():
        return set()
    found = set()
    for entry in os.scandir(out):
        match = _FILE_RE.match(entry.name)
        if match and entry.is_file():
            found.add(int(match.group(1)))
    return found


def _ours(name: str) -> bool:
    """A file medidiff writes in a synthesis folder (or a temporary one of them); ``overwrite``
    removes these, including stale metrics of the replaced samples."""
    bare = name[1:] if name.startswith(".") else name
    return bool(
        _FILE_RE.match(name) or name in (MANIFEST_NAME, CONFIG_NAME, MONTAGE_NAME, METRICS_NAME)
        or (name.startswith(".") and ".tmp" in name
            and (bare.startswith(("synth_", MANIFEST_NAME, CONFIG_NAME, MONTAGE_NAME, METRICS_NAME))))
    )


def _check_folder(out: Path, settings: Mapping[str, Any], overwrite: bool) -> None:
    """Refuse a folder that holds samples of another configuration (read-only check)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: is a file; give a folder")
    if overwrite or not out.is_dir():
        return
    config_path = out / CONFIG_NAME
    if config_path.is_file():
        try:
            previous = json.loads(config_path.read_text(encoding="utf-8"))
            if not isinstance(previous, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise OutputError(
                f"{config_path}: unreadable ({exc}); pass --overwrite to start this folder afresh"
            ) from None
        differ = [k for k in IDENTITY_KEYS if previous.get(k) != settings.get(k)]
        if differ:
            details = ", ".join(f"{k} {previous.get(k)!r} -> {settings.get(k)!r}" for k in differ)
            raise OutputError(
                f"--out {out}: holds samples of another configuration ({details}); pass "
                "--overwrite to replace them or choose another --out"
            )
    elif _existing_indices(out) or (out / MANIFEST_NAME).exists():
        raise OutputError(
            f"--out {out}: holds synth_*.nii.gz files or a manifest but no {CONFIG_NAME}, so "
            "their configuration is unknown; pass --overwrite to replace them or choose another --out"
        )


def _prepare_folder(out: Path, settings: Mapping[str, Any], num: int, overwrite: bool) -> None:
    """Rank 0: clear the folder on ``overwrite``, drop stale temporaries, record the config."""
    from medidiff.io.volume import write_json_atomic

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot create the folder ({exc.strerror})") from None
    for entry in os.scandir(out):
        stale_tmp = entry.name.startswith(".") and _ours(entry.name)
        if entry.is_file() and (stale_tmp or (overwrite and _ours(entry.name))):
            try:
                os.unlink(entry.path)
            except OSError as exc:
                raise OutputError(f"{entry.path}: cannot remove ({exc.strerror})") from None
    write_json_atomic(out / CONFIG_NAME, {**settings, "num_requested": int(num)})


def _remove_damaged(out: Path, expected_shape: Sequence[int]) -> list[str]:
    """Rank 0, on resume: delete sample files that do not load as a volume of
    ``expected_shape`` (damaged or truncated by something other than medidiff, whose writes
    are atomic) so they are generated again; note an unreadable manifest. Returns one line
    per problem."""
    from medidiff.errors import MedidiffError
    from medidiff.io.volume import load_volume

    notes = []
    for i in sorted(_existing_indices(out)):
        path = out / synth_file_name(i)
        try:
            shape = load_volume(path).shape
            problem = None if tuple(shape) == tuple(expected_shape) else (
                f"shape {tuple(shape)}, not this model's {tuple(expected_shape)}")
        except MedidiffError as exc:
            problem = " ".join(str(exc).replace(str(path), "").split()).lstrip(": ")
        if problem is not None:
            try:
                os.unlink(path)
            except OSError as exc:
                raise OutputError(f"{path}: damaged ({problem}) and cannot be removed "
                                  f"({exc.strerror})") from None
            notes.append(f"{path}: damaged ({problem}); generated again")
    manifest = out / MANIFEST_NAME
    if manifest.is_file():
        rows = read_manifest(manifest)
        usable = rows and all(r.get("file") and str(r.get("index", "")).isdigit() for r in rows)
        if not usable:
            notes.append(f"{manifest}: unreadable or not a medidiff manifest; rebuilt from the "
                         "sample files (earlier timings are lost)")
    return notes


def _distributed_ready(info: Any) -> bool:
    """True when collectives can run (a real ``torchrun`` job, not a simulated DistInfo)."""
    if not info.enabled:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _gather_rows(rows: list[dict[str, str]], info: Any) -> list[dict[str, str]]:
    """All ranks' manifest rows on rank 0 (this rank's rows elsewhere)."""
    if not _distributed_ready(info):
        return rows
    import torch.distributed as dist

    gathered: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(rows, gathered, dst=0)
    if not info.is_main:
        return rows
    return [row for part in (gathered or []) for row in (part or [])]


def _write_montage(synth: Synthesizer, out: Path, indices: Sequence[int]) -> Path | None:
    """``montage.png``: the first samples of the folder on the model scale [0, 1]."""
    from medidiff.io.volume import load_volume
    from medidiff.viz.display import save_image_grid

    chosen = sorted(indices)[:_MONTAGE_MAX]
    if not chosen:
        return None
    images = []
    for i in chosen:
        values = synth.to_model_scale(load_volume(out / synth_file_name(i)).array)
        images.append(values[None, :, :, 0] if synth.spatial_dims == 2 else values[None])
    title = f"{synth.kind} samples {chosen[0]}..{chosen[-1]}, {synth.sampler} {synth.steps} steps"
    if synth.label_name is not None:
        title += f", label {synth.label_name} (w={synth.guidance:g})"
    return save_image_grid(np.stack(images), out / MONTAGE_NAME, title=title, columns=8)


def synthesize_to_folder(
    synthesizer: Synthesizer,
    out_dir: str | os.PathLike,
    num: int,
    *,
    seed: int = 0,
    overwrite: bool = False,
    info: Any = None,
    progress: bool = False,
    montage: bool = True,
) -> SynthesisSummary:
    """Write samples ``0 .. num-1`` as ``out_dir/synth_00000.nii.gz ...`` with a manifest.

    Resumable: files already present (complete, since every write is atomic) are skipped
    and keep their manifest rows; rows lost by an interruption are rebuilt from the file
    names (seed, sampler, ...; ``seconds`` and ``nfe`` left empty). A present file that
    does not load (damaged by something else) is deleted and generated again, and an
    unreadable manifest is rebuilt; both are listed in ``SynthesisSummary.repaired``. A
    folder made with a different configuration (checkpoint, sampler, steps, seed, label,
    guidance, ...) is refused unless ``overwrite``, which deletes the earlier samples first.

    Under ``torchrun``, rank ``r`` of ``n`` owns the indices ``i`` with ``i % n == r`` (each
    exactly once, whatever is already present); the manifest is gathered on rank 0, which
    also writes the montage and the config. A ``DistInfo`` without an initialised process
    group (a simulated rank) skips the collectives: rank 0 then lists the files present.

    Args:
        synthesizer: the configured :class:`Synthesizer`.
        out_dir: the output folder (created).
        num: how many samples the folder should hold, ``>= 1``.
        seed: base seed; sample ``i`` uses ``seed + i``.
        overwrite: replace a folder of another configuration (and regenerate everything).
        info: a :class:`medidiff.runtime.distributed.DistInfo`; default: a world of one.
        progress: a progress bar over this rank's samples (rank 0 only).
        montage: write ``montage.png`` of the first 16 samples.

    Returns:
        A :class:`SynthesisSummary`.

    Raises:
        ConfigError: ``num`` or ``seed`` out of range.
        OutputError: the folder holds another configuration, or cannot be written.
    """
    from medidiff.runtime.distributed import DistInfo, barrier, shard
    from medidiff.io.volume import save_volume

    began = time.perf_counter()
    if not _is_int(num) or num < 1:
        raise ConfigError(f"--num must be an integer >= 1; got {num!r}")
    if not _is_int(seed) or seed < 0:
        raise ConfigError(f"--seed must be an integer >= 0; got {seed!r}")
    info = info if info is not None else DistInfo(device=synthesizer.device)
    out = Path(out_dir)
    settings = synthesizer.settings(int(seed))
    _check_folder(out, settings, overwrite)  # every rank: the same answer, no hang on refusal
    repaired: list[str] = []
    if info.is_main:
        _prepare_folder(out, settings, num, overwrite)
        repaired = _remove_damaged(out, synthesizer.output_shape)
    if _distributed_ready(info):
        barrier(info)

    present = _existing_indices(out)
    mine = [i for i in shard(list(range(num)), info) if i not in present]
    skipped = tuple(sorted(i for i in range(num) if i in present))
    rows: list[dict[str, str]] = []
    earlier_rows = {r.get("file"): r for r in read_manifest(out / MANIFEST_NAME)} if info.is_main else {}

    def merged(new_rows: list[dict[str, str]]) -> list[dict[str, str]]:
        """Rows for every sample file present: earlier rows kept, missing ones rebuilt."""
        by_index = {}
        for i in sorted(_existing_indices(out)):
            row = earlier_rows.get(synth_file_name(i))
            by_index[i] = dict(row) if row else synthesizer.manifest_row(i, seed + i)
        for row in new_rows:
            by_index[int(row["index"])] = row
        return list(by_index.values())

    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), desc=f"synthesizing ({synthesizer.kind})", unit="sample",
               disable=not (progress and info.is_main))
    try:
        for s in synthesizer.generate(mine, seed=int(seed)):
            save_volume(s.volume, out / synth_file_name(s.index))  # atomic: never a partial file
            rows.append(synthesizer.manifest_row(s.index, s.seed, s.seconds, s.nfe))
            bar.update(1)
            # A single process keeps the manifest current after each batch, so an
            # interruption loses no timings.
            if not info.enabled and len(rows) % synthesizer.batch_size == 0:
                _write_manifest(out / MANIFEST_NAME, merged(rows))
    finally:
        bar.close()

    all_rows = _gather_rows(rows, info)
    manifest_path = out / MANIFEST_NAME
    montage_path: Path | None = None
    num_files = len(all_rows)
    if info.is_main:
        final = merged(all_rows)
        num_files = len(final)
        _write_manifest(manifest_path, final)
        if montage:
            montage_path = _write_montage(synthesizer, out, [int(r["index"]) for r in final])
    if _distributed_ready(info):
        barrier(info)
    return SynthesisSummary(
        out_dir=out, generated=tuple(sorted(int(r["index"]) for r in rows)),
        skipped=skipped, manifest=manifest_path, montage=montage_path, config=out / CONFIG_NAME,
        kind=synthesizer.kind, num_files=num_files, seconds=time.perf_counter() - began,
        repaired=tuple(repaired),
    )
