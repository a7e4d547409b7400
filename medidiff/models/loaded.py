"""One loaded model: a checkpoint turned, once, into everything inference needs.

:func:`load_model` reads an inference checkpoint (``model.safetensors``), rebuilds its
network and parses its records once into typed objects: the training
:class:`~medidiff.config.Config`, the :class:`~medidiff.data.transforms.Preprocessing` of
the model grid, the :class:`~medidiff.diffusion.schedules.NoiseSchedule` and
:class:`~medidiff.diffusion.noise.NoiseSpec` it was trained with, its class conditioning
and its provenance. Synthesis, anomaly detection, training previews and figures take this
one object instead of re-reading the checkpoint's JSON.

A latent model (an autoencoder stage in front of the diffusion U-Net, one file, see
:mod:`medidiff.models.latent`) fills the ``autoencoder`` field with a
:class:`~medidiff.models.latent.LatentCodec`; ``model`` is then its U-Net, which works on
latents, and :attr:`LoadedModel.input_shape` is a latent shape. A pixel-space model leaves
``autoencoder`` ``None``.

Example:
    >>> import tempfile, pathlib
    >>> from medidiff.models.checkpoint import save_inference
    >>> from medidiff.models.unet import build_model, model_kwargs
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> _ = save_inference(path, build_model(2, "tiny"), model_kwargs=model_kwargs(2, "tiny"),
    ...                    config={"diffusion": {"schedule": "cosine"}},
    ...                    preprocessing={"shape": [16, 16, 8]}, extra={"step": 7})
    >>> loaded = load_model(path)
    >>> loaded.schedule.name, loaded.input_shape, loaded.provenance.step
    ('cosine', (16, 16), 7)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medidiff.config import Config
from medidiff.data.profile import InputProfile
from medidiff.data.transforms import Preprocessing
from medidiff.diffusion.guidance import conditional_model_fn, resolve_null_label
from medidiff.diffusion.noise import NoiseSpec
from medidiff.diffusion.sampling import ModelFn
from medidiff.diffusion.schedules import NoiseSchedule
from medidiff.errors import CheckpointError, ConfigError
from medidiff.models.checkpoint import InferenceCheckpoint, build_network, load_inference

__all__ = ["Conditioning", "LoadedAutoencoder", "LoadedModel", "Provenance", "load_autoencoder", "load_model"]


@dataclass(frozen=True)
class Conditioning:
    """The class conditioning of a model.

    Attributes:
        num_classes: the classes it was trained on (``model.num_class_embeds`` of the
            config, without the null class), or ``None`` for an unconditional model.
        class_names: the names of those classes, where training recorded them.
        null_label: the network's "no class" label (the last embedding row, see
            :mod:`medidiff.diffusion.guidance`), or ``None`` when the network has no class
            embedding.
        cond_drop_prob: the training's label dropout; 0 means the model has no
            unconditional mode, so guidance other than 1 is meaningless.
    """

    num_classes: int | None = None
    class_names: tuple[str, ...] = ()
    null_label: int | None = None
    cond_drop_prob: float = 0.0
    mask: str = "none"
    labels: tuple[str, ...] = ()
    mask_dropout: float = 0.0

    @property
    def conditional(self) -> bool:
        """Whether the model takes class labels."""
        return self.num_classes is not None

    @property
    def mask_conditional(self) -> bool:
        """Whether the model takes a label map (``mask`` is ``concat`` or ``controlnet``;
        ``labels`` names the map's values 1, 2, ...)."""
        return self.mask != "none"

    def default_guidance(self, label: int | None) -> float:
        """Guidance when none is asked for: 1 (plain conditional) with a label, else 0."""
        return 1.0 if label is not None else 0.0


@dataclass(frozen=True)
class Provenance:
    """Where the weights came from.

    Attributes:
        path: the checkpoint file.
        sha256: hex SHA-256 of its bytes (ties thresholds and synthesis folders to it).
        version: the medidiff version that wrote it.
        step: the training step it was saved at, when recorded.
        stored_dtype: ``"float16"`` or ``"float32"``.
    """

    path: Path
    sha256: str
    version: str
    step: int | None
    stored_dtype: str


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A checkpoint's network with everything needed to run it, parsed once.

    Attributes:
        model: the ``DiffusionModelUNet`` with the checkpoint's weights, in eval mode.
        checkpoint: the raw :class:`~medidiff.models.checkpoint.InferenceCheckpoint`.
        config: the training config, typed.
        preprocessing: the model grid and intensity scheme, typed.
        schedule: the noise schedule (float64 on the CPU; cast it once where it is used).
        noise_spec: the noise the model was trained to remove.
        prediction_type: what the network outputs.
        conditioning: classes, null label and label dropout; the label-map conditioning
            (``mask``, ``labels``, ``mask_dropout``) of a mask-conditioned model.
        provenance: path, sha256, version and training step.
        intensity_reference: the typical intensity map of the training scans
            (``a_min``/``a_max``, ...) when training recorded one, else ``None``.
        autoencoder: the :class:`~medidiff.models.latent.LatentCodec` of a latent model
            (image <-> scaled latent); ``None`` for pixel-space models.
        input_profile: what the training scans looked like
            (:class:`~medidiff.data.profile.InputProfile`: modality, foreground intensity
            quantiles, extent, volume, skull-stripping, spacing), which ``anomaly`` and
            ``calibrate`` compare every input with; ``None`` for files written before
            profiles were recorded.
    """

    model: nn.Module
    checkpoint: InferenceCheckpoint
    config: Config
    preprocessing: Preprocessing
    schedule: NoiseSchedule
    noise_spec: NoiseSpec
    prediction_type: str
    conditioning: Conditioning
    provenance: Provenance
    intensity_reference: dict[str, Any] | None = None
    autoencoder: Any = None
    input_profile: InputProfile | None = None

    @property
    def is_latent(self) -> bool:
        """Whether the diffusion process runs on an autoencoder's latents."""
        return self.autoencoder is not None

    @property
    def unet_kwargs(self) -> dict[str, Any]:
        """The ``DiffusionModelUNet`` kwargs (the ``unet`` part of a latent model's)."""
        kwargs = self.checkpoint.model_kwargs
        nested = self.is_latent or self.checkpoint.network == "controlled_diffusion"
        return dict(kwargs["unet"]) if nested else dict(kwargs)

    @property
    def spatial_dims(self) -> int:
        """2 (the network sees axial slices) or 3 (volumes)."""
        return int(self.unet_kwargs.get("spatial_dims", self.config.model.spatial_dims))

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The image one network input stands for: a slice ``(X, Y)`` of the model grid for
        2D models, the training patch or the whole grid ``(X, Y, Z)`` for 3D ones (a latent
        model always trains on whole grids)."""
        shape = tuple(int(s) for s in self.preprocessing.shape)
        if self.spatial_dims == 2:
            return shape[:2]
        patch = self.config.data.patch_size
        return tuple(int(p) for p in patch) if patch and not self.is_latent else shape

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The spatial size the network was trained on: :attr:`image_shape`, or for a latent
        model the latent of it (``image_shape / f``)."""
        if self.is_latent:
            return tuple(self.autoencoder.latent_shape(self.image_shape)[1:])
        return self.image_shape

    @property
    def channels(self) -> int:
        """Channels of the image (or latent) the network denoises: 1 for images, the latent
        channels otherwise (a ``concat`` model's label channels are not counted)."""
        return int(self.unet_kwargs.get("out_channels", self.unet_kwargs.get("in_channels", 1)))

    def conditioned_fn(self) -> Any:
        """The mask-conditioned denoiser ``(x_t, t, condition) -> output`` (see
        :func:`~medidiff.diffusion.guidance.mask_guided_model_fn`).

        Raises:
            ConfigError: the model takes no label map.
        """
        from medidiff.diffusion.guidance import concat_condition

        mode = self.conditioning.mask
        if mode == "concat":
            model = self.model
            return lambda x_t, t, condition: model(concat_condition(x_t, condition), timesteps=t)
        if mode == "controlnet":
            model = self.model
            return lambda x_t, t, condition: model(x_t, timesteps=t, condition=condition)
        raise ConfigError(f"{self.provenance.path} is not a mask-conditioned model (trained without conditioning.mask)")

    def mask_model_fn(self, condition: torch.Tensor, *, guidance: float = 1.0) -> ModelFn:
        """The ``model_fn(x_t, t)`` of a mask-conditioned model for a batch of label-map
        conditions ``(B, L, *spatial)`` (one-hot channels, :mod:`medidiff.data.labels`),
        with classifier-free guidance weight ``guidance`` (1: plain conditional)."""
        from medidiff.diffusion.guidance import mask_guided_model_fn

        return mask_guided_model_fn(self.conditioned_fn(), condition, guidance)

    def model_fn(
        self, batch: int, *, label: int | None = None, guidance: float = 0.0,
        device: torch.device | str | None = None,
    ) -> ModelFn:
        """The ``model_fn(x_t, t)`` the samplers call for ``batch`` samples: the network
        as is, or with the class ``label`` (``None``: the null class) and classifier-free
        ``guidance`` for a conditional model (:func:`~medidiff.diffusion.guidance.conditional_model_fn`)."""
        return conditional_model_fn(
            self.model, self.conditioning.num_classes, batch, label=label, guidance=guidance,
            device=device,
        )


def load_model(
    path_or_checkpoint: str | os.PathLike | InferenceCheckpoint,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load an inference checkpoint into one :class:`LoadedModel`.

    Args:
        path_or_checkpoint: a weights file or an already read checkpoint.
        device: where to put the network; on CUDA flash attention is switched on.

    Returns:
        The loaded model; its network is in eval mode on ``device``.

    Raises:
        CheckpointError: the file cannot be read (see
            :func:`~medidiff.models.checkpoint.load_inference`), the weights do not fit the
            stored architecture, or the stored config or preprocessing is invalid (named
            with the file).
    """
    checkpoint = _read(path_or_checkpoint)
    if checkpoint.network in _AUTOENCODER_NETWORKS:
        raise CheckpointError(
            f"{checkpoint.path}: holds an autoencoder (the first stage of a latent model), not a "
            "diffusion model; give it as autoencoder.checkpoint of a latent-stage config"
        )
    model = build_network(checkpoint, device)
    codec = None
    if checkpoint.network == "latent_diffusion":
        model, codec = model.unet, _codec(checkpoint, model.autoencoder)
    config, preprocessing = checkpoint_records(checkpoint)
    d = config.diffusion
    return LoadedModel(
        model=model,
        checkpoint=checkpoint,
        config=config,
        preprocessing=preprocessing,
        schedule=NoiseSchedule.from_config(d),
        noise_spec=NoiseSpec.from_config(d),
        prediction_type=d.prediction_type,
        conditioning=_conditioning(checkpoint, config, model),
        provenance=_provenance(checkpoint),
        intensity_reference=_intensity_reference(checkpoint),
        autoencoder=codec,
        input_profile=InputProfile.from_dict(checkpoint.extra.get("input_profile")),
    )


def _codec(checkpoint: InferenceCheckpoint, autoencoder: nn.Module) -> Any:
    """The :class:`~medidiff.models.latent.LatentCodec` of a latent model's file."""
    from medidiff.models.latent import LatentCodec

    latent = checkpoint.extra.get("latent") or {}
    scale = latent.get("scale_factor")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        raise CheckpointError(f"{checkpoint.path}: a latent model without a valid latent scale_factor")
    return LatentCodec(autoencoder, float(scale), tile=latent.get("tile"),
                       overlap=float(latent.get("overlap", 0.25)))


def checkpoint_records(checkpoint: InferenceCheckpoint) -> tuple[Config, Preprocessing]:
    """The typed training config and preprocessing stored in an inference checkpoint.

    Raises:
        CheckpointError: either record is invalid (named with the file).
    """
    try:
        return Config.from_dict(checkpoint.config), Preprocessing.from_dict(checkpoint.preprocessing)
    except ConfigError as exc:
        raise CheckpointError(f"{checkpoint.path}: stored config is invalid: {exc}") from None


def _conditioning(checkpoint: InferenceCheckpoint, config: Config, model: nn.Module) -> Conditioning:
    names = checkpoint.extra.get("class_names") or []
    c = config.conditioning
    return Conditioning(
        num_classes=config.model.num_class_embeds or None,
        class_names=tuple(str(n) for n in names),
        null_label=resolve_null_label(model) if getattr(model, "num_class_embeds", None) else None,
        cond_drop_prob=float(config.train.cond_drop_prob),
        mask=c.mask,
        labels=tuple(c.labels),
        mask_dropout=float(c.dropout) if c.mask != "none" else 0.0,
    )


def _provenance(checkpoint: InferenceCheckpoint) -> Provenance:
    step = checkpoint.extra.get("step")
    return Provenance(
        path=Path(checkpoint.path),
        sha256=checkpoint.sha256,
        version=checkpoint.version,
        step=int(step) if isinstance(step, int) and not isinstance(step, bool) else None,
        stored_dtype=checkpoint.stored_dtype,
    )


def _intensity_reference(checkpoint: InferenceCheckpoint) -> dict[str, Any] | None:
    ref = checkpoint.extra.get("intensity_reference")
    return dict(ref) if isinstance(ref, Mapping) and "a_min" in ref and "a_max" in ref else None


def _read(path_or_checkpoint: str | os.PathLike | InferenceCheckpoint) -> InferenceCheckpoint:
    if isinstance(path_or_checkpoint, InferenceCheckpoint):
        return path_or_checkpoint
    return load_inference(path_or_checkpoint)


#: the network names of autoencoder files, by kind (see medidiff.models.autoencoder)
_AUTOENCODER_NETWORKS = {"autoencoder_kl": "kl", "autoencoder_vq": "vq"}


@dataclass(frozen=True, eq=False)
class LoadedAutoencoder:
    """A trained autoencoder (the first stage of a latent model), loaded once.

    Attributes:
        network: the MONAI ``AutoencoderKL`` or ``VQVAE`` in eval mode.
        checkpoint: the file it came from.
        preprocessing: the model grid its images live on.
        scale_factor: multiplies the latent (mean, or ``z_e`` for VQ) so training latents
            have unit variance.
        provenance: path, sha256, version and training step.
    """

    network: nn.Module
    checkpoint: InferenceCheckpoint
    preprocessing: Preprocessing
    scale_factor: float
    provenance: Provenance

    @property
    def kind(self) -> str:
        """``"kl"`` (``AutoencoderKL``) or ``"vq"`` (``VQVAE``)."""
        return _AUTOENCODER_NETWORKS[self.checkpoint.network]

    @property
    def latent_channels(self) -> int:
        from medidiff.models.autoencoder import latent_channels

        return latent_channels(self.checkpoint.model_kwargs)

    @property
    def downsample_factor(self) -> int:
        from medidiff.models.autoencoder import downsample_factor

        return downsample_factor(self.checkpoint.model_kwargs)


def load_autoencoder(
    path_or_checkpoint: str | os.PathLike | InferenceCheckpoint, device: str | torch.device = "cpu"
) -> LoadedAutoencoder:
    """Load an autoencoder checkpoint (``autoencoder_kl`` or ``autoencoder_vq``) written by the
    autoencoder stage of ``medidiff train``.

    Raises:
        CheckpointError: the file cannot be read, or holds another kind of network.
    """
    checkpoint = _read(path_or_checkpoint)
    if checkpoint.network not in _AUTOENCODER_NETWORKS:
        raise CheckpointError(
            f"{checkpoint.path}: holds a {checkpoint.network} network, not an autoencoder; "
            "train one with a config whose stage is 'autoencoder'"
        )
    _, preprocessing = checkpoint_records(checkpoint)
    return LoadedAutoencoder(
        network=build_network(checkpoint, device),
        checkpoint=checkpoint,
        preprocessing=preprocessing,
        scale_factor=float(checkpoint.extra.get("scale_factor", 1.0)),
        provenance=_provenance(checkpoint),
    )
