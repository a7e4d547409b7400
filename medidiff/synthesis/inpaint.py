"""Paint lesions into real scans, and synthesise scans from label maps, in the scan's own grid.

:class:`Inpainter` takes a scan and a lesion mask on its grid and returns the scan with a
lesion painted into the mask, plus the label (the mask): a paired training example from a
healthy scan. It runs RePaint (:func:`medidiff.diffusion.repaint.repaint`, Lugmayr et al.
2022) on the model grid: the known region (outside the dilated lesion) is the forward-noised
scan at every step, the unknown region is sampled with resampling jumps so that it
harmonises with its surroundings. A mask-conditioned model (``conditioning.mask``) also sees
the label map (brain mask + lesion of the given kind), so it paints a lesion rather than
healthy tissue; an unconditional model fills the region with tissue like its training data.

Writing back (the contract tested to 1e-6): only a region R, the lesion dilated by
``margin`` voxels of the scan's grid, changes. Inside the lesion the output is the painted
image; in the margin ring it blends linearly (by distance) towards the input; outside R it
*is* the input, copied, not resampled. The painted image comes from the model grid by
linear interpolation and the scan's own intensity map (its 1st/99th percentiles).

2D models paint each axial slice of the model grid that meets the (dilated) lesion, one
RePaint run per slice (seeded by the pair's seed and the slice index); 3D models paint the
whole model-grid volume in one run. Latent models are refused (RePaint needs the pixel
grid to keep the known region).

:func:`synthesize_from_label_map` generates a whole scan from a label map alone (a
mask-conditioned model; every labelled slice or the whole volume), written on the map's
grid.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medidiff.errors import CheckpointError, ConfigError, DataError
from medidiff.io import Volume

__all__ = ["Inpainter", "PairedScan", "blend_weights", "synthesize_from_label_map"]


@dataclass(frozen=True, eq=False)
class PairedScan:
    """An image with its label, on one native grid.

    Attributes:
        image: float32 intensities on the input's grid and scale (affine kept).
        label: uint8 lesion mask 0/1 on the same grid.
        changed: bool, where ``image`` may differ from the input (all True when
            synthesised from a label map alone).
        nfe: network evaluations per painted slice or volume.
        seconds: wall time.
    """

    image: Volume
    label: Volume
    changed: np.ndarray
    nfe: int
    seconds: float


def blend_weights(lesion: np.ndarray, margin: int) -> np.ndarray:
    """Weights of the painted image: 1 inside ``lesion``, falling linearly over ``margin``
    voxels outside it (1 - d / (margin + 1) at distance d), exactly 0 beyond.

    Example:
        >>> m = np.zeros((7, 1, 1), bool); m[3] = True
        >>> blend_weights(m, 2)[:, 0, 0].round(2).tolist()
        [0.0, 0.33, 0.67, 1.0, 0.67, 0.33, 0.0]
    """
    from scipy.ndimage import distance_transform_edt

    lesion = np.asarray(lesion) > 0
    if margin <= 0:
        return lesion.astype(np.float32)
    distance = distance_transform_edt(~lesion)
    weights = np.clip(1.0 - distance / (margin + 1), 0.0, 1.0).astype(np.float32)
    weights[distance > margin] = 0.0
    return weights


def _load(checkpoint: Any, device: torch.device) -> Any:
    from medidiff.models.loaded import LoadedModel, load_model

    loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load_model(checkpoint, device)
    if loaded.is_latent:
        raise CheckpointError(
            f"{loaded.provenance.path}: a latent model; lesion inpainting (RePaint) is implemented "
            "for pixel-space models only"
        )
    if loaded.prediction_type == "flow":
        raise CheckpointError(
            f"{loaded.provenance.path}: a rectified-flow model; RePaint inpainting needs a diffusion model"
        )
    return loaded


class Inpainter:
    """Paints lesions into scans with a (mask-conditioned) diffusion model.

    Args:
        checkpoint: ``model.safetensors``, or a :class:`~medidiff.models.loaded.LoadedModel`.
        device: ``auto``, ``cpu``, ``cuda`` or a torch device.
        steps: K, strided reverse steps of RePaint.
        resample: U, resampling jumps per step.
        guidance: classifier-free guidance weight on the label map (mask-conditioned
            models; 1 = plain conditional).
        margin: blend margin in voxels of the scan's grid.
        batch_size: slices painted together (2D models).
        progress: progress bars.

    Raises:
        CheckpointError: a latent or rectified-flow model.
        ConfigError: bad steps, resample, guidance or margin.
    """

    def __init__(self, checkpoint: Any, *, device: str | torch.device = "auto", steps: int = 50,
                 resample: int = 5, guidance: float = 1.0, margin: int = 2, batch_size: int = 16,
                 progress: bool = False) -> None:
        from medidiff.models.unet import prepare_for_inference
        from medidiff.runtime.distributed import resolve_device

        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.loaded = _load(checkpoint, self.device)
        T = self.loaded.schedule.num_train_timesteps
        for name, value, low, high in (("--steps", steps, 1, T), ("--resample", resample, 1, 100),
                                       ("--margin", margin, 0, 50), ("--batch-size", batch_size, 1, 10_000)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name} must be an integer in {low} .. {high}; got {value!r}")
        if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0:
            raise ConfigError(f"--guidance must be a number >= 0; got {guidance!r}")
        self.conditioning = self.loaded.conditioning
        if guidance != 1 and not self.conditioning.mask_conditional:
            raise ConfigError(
                f"--guidance applies to mask-conditioned models; {self.loaded.provenance.path} is unconditional"
            )
        if guidance != 1 and self.conditioning.mask_conditional and self.conditioning.mask_dropout <= 0:
            raise ConfigError(
                f"--guidance {guidance:g}: {self.loaded.provenance.path} was trained without condition "
                "dropout (conditioning.dropout = 0), so only --guidance 1 is valid"
            )
        self.steps, self.resample, self.guidance = steps, resample, float(guidance)
        self.margin, self.batch_size, self.progress = margin, batch_size, progress
        self.model = prepare_for_inference(self.loaded.model, self.device)
        self.preprocessing = self.loaded.preprocessing
        self.clip_range = (0.0, 1.0) if self.preprocessing.clip else None

    @property
    def labels(self) -> tuple[str, ...]:
        """The model's label names (empty for an unconditional model)."""
        return self.conditioning.labels

    def settings(self) -> dict[str, Any]:
        """What defines the painted pairs (JSON-ready), for the folder's config."""
        p = self.loaded.provenance
        return {
            "checkpoint_sha256": p.sha256, "conditioning": self.conditioning.mask,
            "labels": list(self.labels), "steps": self.steps, "resample": self.resample,
            "guidance": self.guidance, "margin": self.margin, "sampler": "repaint-ddpm",
            "noise": self.loaded.noise_spec.kind,
        }

    # ---- the model-grid part -------------------------------------------------------------
    def _model_fn(self, condition: torch.Tensor | None, batch: int) -> Any:
        if condition is None:
            return self.loaded.model_fn(batch, device=self.device)
        return self.loaded.mask_model_fn(condition.to(self.device), guidance=self.guidance)

    def paint_model_grid(self, image: np.ndarray, region: np.ndarray, label_map: np.ndarray | None,
                         seed: int) -> tuple[np.ndarray, int]:
        """RePaint on the model grid: ``region`` (bool ``(X, Y, Z)``) is painted, the rest of
        ``image`` kept; ``label_map`` (the model's labels) conditions a mask-conditioned model.

        Returns:
            ``(painted image (X, Y, Z), network evaluations per run)``.
        """
        from medidiff.data.labels import one_hot
        from medidiff.diffusion.repaint import repaint

        out = np.array(image, dtype=np.float32, copy=True)
        n_labels = len(self.labels)
        runs = []  # (slice index or None, x0, known, condition)
        if self.loaded.spatial_dims == 2:
            for z in np.flatnonzero(region.any(axis=(0, 1))):
                cond = one_hot(label_map[:, :, z], n_labels) if label_map is not None else None
                runs.append((int(z), image[None, :, :, z], ~region[None, :, :, z], cond))
        else:
            cond = one_hot(label_map, n_labels) if label_map is not None else None
            runs.append((None, image[None], ~region[None], cond))
        nfe = 0
        for start in range(0, len(runs), self.batch_size):
            chunk = runs[start:start + self.batch_size]
            x0 = torch.from_numpy(np.stack([r[1] for r in chunk])).float().to(self.device)
            known = torch.from_numpy(np.stack([r[2] for r in chunk]).astype(np.float32)).to(self.device)
            condition = None
            if chunk[0][3] is not None:
                condition = torch.from_numpy(np.stack([r[3] for r in chunk]))
            seeds = [int(seed) * 4099 + (r[0] if r[0] is not None else 0) for r in chunk]
            result = repaint(
                self._model_fn(condition, len(chunk)), self.loaded.schedule, x0, known,
                steps=self.steps, resample=self.resample, seeds=seeds,
                noise_spec=self.loaded.noise_spec, prediction_type=self.loaded.prediction_type,
                clip_range=self.clip_range, progress=self.progress,
            )
            nfe = result.nfe
            painted = result.sample[:, 0].float().cpu().numpy()
            for r, values in zip(chunk, painted):
                if r[0] is None:
                    out[:] = values
                else:
                    out[:, :, r[0]] = values
        return out, nfe

    # ---- the scan -------------------------------------------------------------------------
    def inpaint(self, scan: Volume, lesion: np.ndarray, *, seed: int, kind: str | None = None,
                brain: Volume | None = None) -> PairedScan:
        """Paint a lesion into ``scan`` where ``lesion`` (on the scan's grid) is non-zero.

        Args:
            scan: the (healthy) scan.
            lesion: the lesion mask on the scan's grid.
            seed: fixes all noise.
            kind: the lesion kind, for a model whose labels name kinds (``tumor``, ...).
            brain: the brain mask on the scan's grid; default the scan's foreground.

        Returns:
            The :class:`PairedScan`; outside the lesion dilated by ``margin`` voxels the
            image equals the input.

        Raises:
            DataError: an empty lesion, a lesion on another grid, or a kind the model does
                not know.
        """
        from scipy.ndimage import binary_dilation

        from medidiff.data.labels import BRAIN, LESION, compose_label_map
        from medidiff.data.transforms import intensity_to_native, preprocess, to_model, to_native

        began = time.perf_counter()
        lesion = np.asarray(lesion) > 0
        source = str(scan.meta.get("source", "scan"))
        if lesion.shape != tuple(scan.shape):
            raise DataError(f"{source}: lesion mask shape {lesion.shape} differs from the scan's {tuple(scan.shape)}")
        if not lesion.any():
            raise DataError(f"{source}: the lesion mask is empty; nothing to paint")
        if self.conditioning.mask_conditional and kind is not None and kind not in self.labels \
                and LESION not in self.labels:
            raise DataError(
                f"lesion kind {kind!r} is not a label of this model ({', '.join(self.labels)})"
            )
        if self.conditioning.mask_conditional and kind is None and LESION not in self.labels:
            kinds = [n for n in self.labels if n != BRAIN]
            raise DataError(f"this model paints lesions by kind; give one of {', '.join(kinds)}")
        pre = preprocess(scan, self.preprocessing, mask=brain)
        lesion_model = to_model(lesion.astype(np.float32), pre, interpolation="linear") > 0.3
        if not lesion_model.any():  # smaller than the model grid's voxels: its nearest voxel
            lesion_model = to_model(lesion.astype(np.uint8), pre, interpolation="nearest") > 0
        if not lesion_model.any():
            raise DataError(f"{source}: the lesion lies outside the model's field of view")
        native_spacing = max(float(s) for s in scan.spacing)
        model_spacing = min(float(s) for s in self.preprocessing.spacing)
        grow = 1 + math.ceil(self.margin * native_spacing / model_spacing)
        region = binary_dilation(lesion_model, iterations=grow)
        label_map = None
        if self.conditioning.mask_conditional:
            brain_model = pre.mask > 0 if pre.mask is not None else pre.foreground
            label_map = compose_label_map(self.labels, brain=brain_model, lesion=lesion_model, kind=kind)
        painted, nfe = self.paint_model_grid(pre.image, region, label_map, seed)

        synth = intensity_to_native(to_native(painted, pre, interpolation="linear"), pre)
        inside_fov = to_native(np.ones(pre.image.shape, np.uint8), pre, interpolation="nearest") > 0
        weights = blend_weights(lesion, self.margin) * inside_fov
        changed = weights > 0
        original = np.asarray(scan.array, dtype=np.float32)
        image = original.copy()  # outside `changed`: the input's values themselves
        w = weights[changed]
        image[changed] = w * synth[changed] + (1.0 - w) * original[changed]
        return PairedScan(
            image=scan.with_array(image), label=scan.with_array(lesion.astype(np.uint8)),
            changed=changed, nfe=nfe, seconds=time.perf_counter() - began,
        )


def synthesize_from_label_map(inpainter: Inpainter, label_map: Volume, *, seed: int) -> PairedScan:
    """Generate a whole scan from a label map alone with a mask-conditioned model.

    The map (values ``i + 1`` for the model's ``labels[i]``) is brought onto the model grid
    (nearest neighbour, centred on its labelled voxels); a 2D model generates every axial
    slice of the model grid that holds labels, a 3D model the whole volume; the result is
    resampled back onto the map's grid. The label written with it is the map's lesion
    voxels (every label but ``brain``), uint8 0/1.

    Raises:
        ConfigError: an unconditional model.
        DataError: a map with values the model does not know.
    """
    from medidiff.data.labels import check_label_map, lesion_values
    from medidiff.data.transforms import intensity_to_native, preprocess_label_map, to_native

    began = time.perf_counter()
    loaded = inpainter.loaded
    if not loaded.conditioning.mask_conditional:
        raise ConfigError(
            f"{loaded.provenance.path} is an unconditional model; --mask needs a mask-conditioned "
            "model (trained with conditioning.mask)"
        )
    source = str(label_map.meta.get("source", "label map"))
    values = check_label_map(label_map.array, inpainter.labels, source)
    pre = preprocess_label_map(label_map.with_array(values), inpainter.preprocessing)
    model_map = pre.mask.astype(np.uint8)
    region = model_map > 0
    if loaded.spatial_dims == 3:
        region = np.ones_like(region)
    # the painted region is everything labelled; the background stays at the model's 0
    painted, nfe = inpainter.paint_model_grid(np.zeros(model_map.shape, np.float32), region, model_map, seed)
    reference = loaded.intensity_reference
    native = to_native(painted, pre, interpolation="linear")
    if reference is not None:
        native = intensity_to_native(native, reference)
    lesion = np.isin(values, lesion_values(inpainter.labels)).astype(np.uint8)
    return PairedScan(
        image=label_map.with_array(native.astype(np.float32)), label=label_map.with_array(lesion),
        changed=np.ones(values.shape, bool), nfe=nfe, seconds=time.perf_counter() - began,
    )
