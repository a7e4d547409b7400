"""Reconstructors: what turns a model-grid scan into a pseudo-healthy reconstruction.

A reconstructor is the one part of an :class:`~medidiff.anomaly.detector.AnomalyDetector`
that differs between a diffusion method and the no-network intensity baseline
(:class:`~medidiff.anomaly.baseline.ConstantReconstructor`): everything else (preprocessing,
post-processing, thresholds, native-grid outputs) is the detector's, shared by both.

:class:`DiffusionReconstructor` noises a scan part of the way and denoises it with a model
trained on healthy scans (:func:`medidiff.anomaly.methods.reconstruct`): a 2D model gets the
axial slices (the last axis of the RAS grid) that contain brain, in batches (other slices:
the input itself); a 3D model gets the whole volume, or MONAI's
``sliding_window_inference`` windows of the trained size when the grid is larger (Gaussian
blending). Noise is seeded per network input (:mod:`medidiff.anomaly.seeds`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from medidiff.anomaly.methods import MethodConfig, reconstruct
from medidiff.anomaly.results import Reconstruction
from medidiff.anomaly.seeds import input_seed
from medidiff.errors import VolumeContentError

__all__ = ["DiffusionReconstructor", "LatentReconstructor", "ProgressFn", "Reconstructor", "windows_per_axis"]

#: ``progress(done, total)``: network inputs evaluated so far of those planned for a scan
ProgressFn = Callable[[int, int], None]


class Reconstructor(Protocol):
    """Turns a model-grid image into reconstructions and counts its network evaluations.

    Attributes:
        method: the method's record (``to_dict()``, ``t_starts``), kept in thresholds.
        seed: the noise seed (0 where there is no noise).
        input_shape: the spatial size of one network input.
        nfe_per_input: network evaluations per network input (0 without a network).
        model: the network, or ``None``.
    """

    method: Any
    seed: int
    input_shape: tuple[int, ...]
    nfe_per_input: int
    model: Any

    def reconstruct(
        self, image: np.ndarray, region: np.ndarray, name: str, *, progress: ProgressFn | None = None
    ) -> Reconstruction:
        """``(K, X, Y, Z)`` reconstructions of ``image`` (``region``: where the brain is)."""
        ...


def windows_per_axis(n: int, roi: int, overlap: float) -> int:
    """How many sliding windows MONAI places along an axis of size n (for progress bars)."""
    if n <= roi:
        return 1
    interval = max(1, int(roi * (1 - overlap)))
    return math.ceil((n - roi) / interval) + 1


class DiffusionReconstructor:
    """Partial-diffusion reconstruction with a trained network.

    Args:
        model: the network (eval mode, on ``device``).
        schedule: the checkpoint's :class:`~medidiff.diffusion.schedules.NoiseSchedule`, on ``device``.
        method: the resolved :class:`~medidiff.anomaly.methods.MethodConfig`.
        noise_spec: the noise (:class:`~medidiff.diffusion.noise.NoiseSpec`).
        prediction_type: what the model outputs.
        spatial_dims: 2 (slices) or 3 (volumes).
        input_shape: the spatial size the network was trained on.
        null_label: the null class of a class-conditional model (unconditional calls), or ``None``.
        device: where the network runs.
        batch_size: network inputs per network call.
        seed: the noise seed.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        schedule: Any,
        method: MethodConfig,
        noise_spec: Any,
        *,
        prediction_type: str,
        spatial_dims: int,
        input_shape: tuple[int, ...],
        null_label: int | None,
        device: torch.device,
        batch_size: int,
        seed: int,
    ) -> None:
        self.model = model
        self.schedule = schedule
        self.method = method
        self.noise_spec = noise_spec
        self.prediction_type = prediction_type
        self.spatial_dims = spatial_dims
        self.input_shape = input_shape
        self.null_label = null_label
        self.device = device
        self.batch_size = batch_size
        self.seed = seed
        self.nfe_per_input = method.nfe_per_image(input_shape)

    def _model_fn(self, counter: list[int], progress: ProgressFn | None, total: int) -> Any:
        """``model_fn(x_t, t)`` for the samplers: unconditional (the null class for a
        class-conditional model), counting the network inputs it evaluates in ``counter``."""

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            counter[0] += int(x_t.shape[0])
            if progress is not None:
                progress(counter[0], total)
            if self.null_label is not None:
                labels = torch.full(
                    (x_t.shape[0],), self.null_label, dtype=torch.long, device=x_t.device
                )
                return self.model(x_t, t, class_labels=labels)
            return self.model(x_t, t)

        return model_fn

    def _inputs(self, image: np.ndarray, region: np.ndarray) -> tuple[list[int], torch.Tensor]:
        """The network inputs: the axial slices with brain ``(N, 1, X, Y)`` (2D), or the
        volume ``(1, 1, X, Y, Z)`` (3D), and their slice indices."""
        if self.spatial_dims == 2:
            ids = [z for z in range(image.shape[2]) if region[:, :, z].any()]
            slices = np.ascontiguousarray(np.moveaxis(image[:, :, ids], 2, 0))
            return ids, torch.from_numpy(slices)[:, None].to(self.device)
        return [0], torch.from_numpy(image)[None, None].to(self.device)

    @torch.no_grad()
    def reconstruct(
        self, image: np.ndarray, region: np.ndarray, name: str, *, progress: ProgressFn | None = None
    ) -> Reconstruction:
        """Reconstruct a scan on the model grid (or any larger RAS grid).

        Args:
            image: x, ``(X, Y, Z)`` on the model's intensity scale.
            region: ``(X, Y, Z)`` bool; a 2D model skips axial slices without any voxel of
                it (their reconstruction is the input itself).
            name: the scan's name, part of the noise seeds.
            progress: called with (inputs evaluated, inputs planned) after every network call.

        Returns:
            ``(K, X, Y, Z)`` float32, one reconstruction per start of the method, and the
            number of network inputs evaluated.
        """
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 3:
            raise VolumeContentError(
                f"{name}: expected a 3D model-grid array, got shape {image.shape}"
            )
        out = np.repeat(image[None], len(self.method.t_starts), axis=0)  # type: ignore[arg-type]
        if self.spatial_dims == 2 and not any(region[:, :, z].any() for z in range(image.shape[2])):
            return Reconstruction(out, 0)
        ids, inputs = self._inputs(image, region)
        counter = [0]
        recon = self._reconstruct_inputs(inputs, ids, name, counter, progress)
        recon = recon.float().cpu().numpy()  # (N, K, *spatial)
        if self.spatial_dims == 2:
            out[:, :, :, ids] = np.moveaxis(recon, 0, -1)  # (K, X, Y, N)
        else:
            out = recon[0]
        return Reconstruction(out.astype(np.float32, copy=False), counter[0])

    def _reconstruct_inputs(
        self, inputs: torch.Tensor, ids: list[int], name: str, counter: list[int],
        progress: ProgressFn | None,
    ) -> torch.Tensor:
        """``(N, K * C, *spatial)`` reconstructions of the network inputs ``(N, C, *spatial)``,
        in sliding windows of :attr:`input_shape` where the inputs are larger."""
        from monai.inferers import sliding_window_inference

        spatial = tuple(inputs.shape[2:])
        overlap = self.method.window_overlap
        windows = int(np.prod([windows_per_axis(n, r, overlap)
                               for n, r in zip(spatial, self.input_shape)]))
        model_fn = self._model_fn(counter, progress, windows * len(ids) * self.nfe_per_input)

        def predictor(windows: torch.Tensor, where: Sequence[Sequence[slice]]) -> torch.Tensor:
            seeds = [
                input_seed(self.seed, name, ids[w[0].start], [int(s.start or 0) for s in w[2:]])
                for w in where
            ]
            return reconstruct(
                model_fn, self.schedule, windows, self.method, seeds=seeds,
                noise_spec=self.noise_spec, prediction_type=self.prediction_type,
                batch_size=self.batch_size,
            )

        return sliding_window_inference(
            inputs, roi_size=self.input_shape, sw_batch_size=self.batch_size,
            predictor=predictor, overlap=overlap, mode="gaussian", with_coord=True,
        )


class LatentReconstructor(DiffusionReconstructor):
    """Partial diffusion in the latent space of a latent model (method ``latent``).

    The scan (the brain slices of a 2D model, or the volume of a 3D one) is encoded by
    the model's autoencoder (in tiles where the model says so), the latent is noised part
    of the way and denoised with a few steps of the U-Net (in sliding windows of the
    trained latent size where the latent is larger), and each start's latent is decoded
    back; the residual is then taken in image space by the detector, with the same
    post-processing, thresholds and outputs as the pixel-space methods. This is how
    latent anomaly detectors work (MAD-AD, Beizaee et al. IPMI 2025; REFLECT, MICCAI 2025,
    one rectified-flow step), here on whole 3D volumes.

    Args:
        codec: the model's :class:`~medidiff.models.latent.LatentCodec`.
        image_clip: clamp decoded reconstructions to this range (the data's), or ``None``.
        (others): see :class:`DiffusionReconstructor`; ``input_shape`` is the latent size
            the U-Net was trained on.
    """

    def __init__(self, *args: Any, codec: Any, image_clip: tuple[float, float] | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.codec = codec
        self.image_clip = image_clip

    def _reconstruct_inputs(
        self, inputs: torch.Tensor, ids: list[int], name: str, counter: list[int],
        progress: ProgressFn | None,
    ) -> torch.Tensor:
        latents = torch.cat([self.codec.encode(inputs[i : i + self.batch_size])
                             for i in range(0, inputs.shape[0], self.batch_size)])
        recon = super()._reconstruct_inputs(latents, ids, name, counter, progress)
        n, c = latents.shape[:2]
        starts = recon.shape[1] // c
        recon = recon.reshape(n * starts, c, *latents.shape[2:])  # (N * K, C, *latent)
        images = torch.cat([self.codec.decode(recon[i : i + self.batch_size])
                            for i in range(0, recon.shape[0], self.batch_size)])
        if self.image_clip is not None:
            images = images.clamp(*self.image_clip)
        return images.reshape(n, starts, *images.shape[2:])
