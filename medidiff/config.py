"""Typed, validated run configuration (YAML in, frozen dataclasses out).

A config has four sections — ``data``, ``model``, ``diffusion``, ``train`` — each a
frozen dataclass below. Unknown keys and wrong types are refused with one line naming
the key (``ConfigError: config key 'train.max_stepz' is unknown; known keys: ...``);
nothing is silently corrected. ``--set section.key=value`` overrides are parsed as YAML
scalars, so ``--set train.max_steps=20`` gives an int and
``--set data.preprocessing.spacing=[2,2,2]`` a list.

Example:
    >>> from medidiff.config import Config
    >>> cfg = Config.from_dict({"train": {"max_steps": 20}})
    >>> cfg.train.max_steps, cfg.model.spatial_dims
    (20, 2)
    >>> cfg.with_overrides(["train.batch_size=4"]).train.batch_size
    4
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

from medidiff.constants import (
    AUTOENCODER_KINDS,
    FLOW_TIME_SAMPLINGS,
    NOISE_KINDS,
    PREDICTION_TYPES,
    SCHEDULES,
    STAGES,
)
from medidiff.errors import ConfigError

#: The ``data.cache`` choices.
CACHE_MODES = ("memory", "disk", "none")


@dataclass(frozen=True)
class DataConfig:
    """Where the training scans are and how they are preprocessed.

    Attributes:
        datalist: folder, glob, CSV or Decathlon ``dataset.json`` (relative paths are
            resolved against the config file's folder, then the working directory).
        split: the Decathlon split (``training``, ``validation``, ...).
        preprocessing: keys of :class:`medidiff.data.datasets.Preprocessing` (modality, spacing,
            shape, intensity settings); validated by that class.
        min_foreground: 2D models skip axial slices with less foreground than this.
        patch_size: 3D models train on random patches of this size (None: whole volumes).
        cache: ``memory`` (CacheDataset), ``disk`` (PersistentDataset) or ``none``.
        cache_dir: folder for ``disk`` caching (default: ``RUN_DIR/cache``).
        num_workers: DataLoader workers.
    """

    datalist: str = "sample_data/dataset.json"
    split: str = "training"
    preprocessing: dict = field(default_factory=dict)
    min_foreground: float = 0.1
    patch_size: Union[list[int], None] = None
    cache: str = "memory"
    cache_dir: Union[str, None] = None
    num_workers: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net: a preset of :func:`medidiff.models.unet.build_model` plus overrides."""

    spatial_dims: int = 2
    preset: str = "small"
    channels: Union[list[int], None] = None
    attention_levels: Union[list[bool], None] = None
    num_res_blocks: Union[int, None] = None
    num_head_channels: Union[int, None] = None
    norm_num_groups: Union[int, None] = None
    num_class_embeds: Union[int, None] = None


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and what the network predicts.

    Attributes:
        num_train_timesteps: T.
        schedule: one of :data:`medidiff.constants.SCHEDULES` (``linear_beta``,
            ``scaled_linear_beta``, ``sigmoid_beta``, ``cosine``).
        beta_start, beta_end: endpoints of the linear-type schedules.
        prediction_type: one of :data:`medidiff.constants.PREDICTION_TYPES` (``epsilon``,
            ``v_prediction``, ``sample``, or ``flow``: a rectified-flow model that learns
            the velocity x_0 - eps on the straight path (1 - s) x_0 + s eps and is sampled
            with the ``euler`` sampler; the schedule and betas are then unused, T only
            scales the network's timestep input).
        noise: one of :data:`medidiff.constants.NOISE_KINDS` (``gaussian``, or ``simplex``
            as in AnoDDPM) — the noise the model learns to remove.
        simplex_octaves, simplex_persistence, simplex_frequency: simplex-noise settings.
        flow_time_sampling: ``flow`` models only: how training times s are drawn, one of
            :data:`medidiff.constants.FLOW_TIME_SAMPLINGS` (``logit-normal``, Esser et al.
            2024; or ``uniform``).
    """

    num_train_timesteps: int = 1000
    schedule: str = "linear_beta"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    noise: str = "gaussian"
    simplex_octaves: int = 6
    simplex_persistence: float = 0.8
    simplex_frequency: Union[float, None] = None
    flow_time_sampling: str = "logit-normal"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, logging and checkpointing.

    Attributes:
        max_steps: optimiser steps in total.
        batch_size: per process (global batch = batch_size x world size).
        lr, weight_decay: AdamW.
        warmup_steps: linear warm-up, then cosine decay to ``lr * min_lr_ratio``.
        grad_clip: max global gradient norm (0 disables).
        ema_decay: EMA of weights used for sampling and saved as inference weights
            (0 disables).
        seed: fixes data order, noise and initialisation.
        checkpoint_every, log_every, preview_every: in steps (0 disables previews).
        amp: mixed precision on CUDA (bf16 where supported, else fp16); ignored on CPU.
        channels_last: memory format on CUDA.
        cond_drop_prob: class-label dropout for classifier-free guidance.
        oversample: mask-conditioned 2D models: ``{label: factor}`` (e.g. ``{ms: 4}``) lists
            each training slice that shows ``label`` ``factor`` times per epoch (the largest
            factor of the labels it shows), so rare, small lesions are seen often enough to
            be learnt (sample_data's MS-like foci show in 8 % of the training slices).
    """

    max_steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    preview_every: int = 500
    preview_samples: int = 4
    preview_steps: int = 25
    amp: bool = True
    channels_last: bool = True
    cond_drop_prob: float = 0.1
    oversample: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AutoencoderConfig:
    """The autoencoder of a latent model: trained when ``stage: autoencoder``, used frozen
    (from ``checkpoint``) when ``stage: latent``.

    Attributes:
        kind: ``kl`` (MONAI ``AutoencoderKL``) or ``vq`` (MONAI ``VQVAE``, a vector-quantised
            autoencoder whose pre-quantisation latent the diffusion model learns; see
            :mod:`medidiff.models.autoencoder`).
        preset: a preset of :mod:`medidiff.models.autoencoder` (``tiny``, ``small``, ``base``).
        channels, latent_channels, num_res_blocks, norm_num_groups: overrides of the preset
            (for ``vq``: ``latent_channels`` is the codebook vectors' dimension,
            ``num_res_blocks`` the residual units per level; ``norm_num_groups`` does not apply).
        num_embeddings: ``vq`` only: codebook size (overrides the preset).
        kl_weight: ``kl`` only: weight of the KL term, relative to the summed reconstruction
            error (Rombach et al. 2022's 1e-6; see :mod:`medidiff.training.autoencoder`).
        quantization_weight: ``vq`` only: weight of the quantiser's commitment loss.
        adversarial_weight: weight of the patch-adversarial term (0: no discriminator).
        adversarial_start: step from which the adversarial term is used.
        discriminator_channels: channels of the first PatchDiscriminator layer.
        discriminator_layers: its strided layers (each halves the patch; 3 needs patches
            of at least 32 voxels per axis).
        discriminator_lr: the discriminator's learning rate.
        scale_batches: training volumes encoded at the end to measure the latent scale
            factor (1 / std of the latents).
        checkpoint: ``stage: latent``: the trained autoencoder (``model.safetensors`` of an
            autoencoder run; relative paths are resolved against the config's folder first).
        tile: encoder/decoder window in image voxels (one int or one per axis; ``None``:
            whole volumes). Set it where a whole volume does not fit in memory.
        overlap: fraction of a window shared with its neighbour when tiling.
    """

    kind: str = "kl"
    preset: str = "small"
    channels: Union[list[int], None] = None
    latent_channels: Union[int, None] = None
    num_res_blocks: Union[int, None] = None
    norm_num_groups: Union[int, None] = None
    num_embeddings: Union[int, None] = None
    kl_weight: float = 1e-6
    quantization_weight: float = 1.0
    adversarial_weight: float = 0.0
    adversarial_start: int = 0
    discriminator_channels: int = 16
    discriminator_layers: int = 3
    discriminator_lr: float = 1e-4
    scale_batches: int = 8
    checkpoint: Union[str, None] = None
    tile: Union[list[int], None] = None
    overlap: float = 0.25


#: The ``conditioning.mask`` choices: no mask conditioning, the label map as extra input
#: channels of the U-Net (Med-DDPM style), or a ControlNet on a frozen base model.
MASK_CONDITIONINGS = ("none", "concat", "controlnet")


@dataclass(frozen=True)
class ConditioningConfig:
    """Conditioning of the denoiser on a label map (mask-conditioned synthesis).

    Attributes:
        mask: ``none``, ``concat`` (the label map's one-hot channels are concatenated to
            the network input x_t; Med-DDPM, Dorjsembe et al. 2024) or ``controlnet``
            (MONAI ``ControlNet`` on a frozen ``base.checkpoint``; Zhang et al. 2023).
        labels: the label names, in order: value ``i + 1`` of a label map is
            ``labels[i]`` and becomes channel ``i``. ``brain`` is the datalist's brain
            mask, ``lesion`` its lesion label of any kind, any other name (e.g. ``tumor``)
            the lesion label of entries of that ``kind`` (see
            :mod:`medidiff.data.labels`).
        dropout: probability of replacing the whole condition by the null condition
            during training, for classifier-free guidance (Ho & Salimans 2022).
    """

    mask: str = "none"
    labels: list[str] = field(default_factory=list)
    dropout: float = 0.1


@dataclass(frozen=True)
class InitConfig:
    """Where the trainable weights start.

    Attributes:
        checkpoint: ``model.safetensors`` (or a shipped model's name, e.g. ``brain_mri_2d``)
            of a diffusion U-Net with the same architecture to start from (fine-tuning).
            Input channels the new model has in addition (the label channels of a
            mask-conditioned model) start at zero, so step 0 equals the old model.
    """

    checkpoint: Union[str, None] = None


@dataclass(frozen=True)
class BaseConfig:
    """``stage: controlnet``: the frozen base model the ControlNet steers.

    Attributes:
        checkpoint: ``model.safetensors`` of a pixel-space diffusion U-Net (or a shipped
            model's name, e.g. ``brain_mri_2d``).
    """

    checkpoint: Union[str, None] = None


@dataclass(frozen=True)
class Config:
    """A whole run: ``stage`` (what is trained) and the ``data``, ``model``, ``diffusion``,
    ``train``, ``autoencoder``, ``conditioning``, ``init`` and ``base`` sections."""

    name: str = "run"
    stage: str = "diffusion"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    init: InitConfig = field(default_factory=InitConfig)
    base: BaseConfig = field(default_factory=BaseConfig)

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Any) -> "Config":
        """Build and validate from a nested dict (e.g. parsed YAML)."""
        cfg = _build(cls, raw, prefix="")
        _check_values(cfg)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: list[str] | None = None) -> "Config":
        """Read a YAML file, apply ``key=value`` overrides, validate."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        raw = _apply_overrides(raw, overrides or [])
        try:
            return cls.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def with_overrides(self, overrides: list[str]) -> "Config":
        """A new config with ``section.key=value`` overrides applied and validated."""
        return Config.from_dict(_apply_overrides(self.to_dict(), overrides))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _apply_overrides(raw: dict, overrides: list[str]) -> dict:
    import copy

    import yaml

    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}': bad key '{key}'")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value
        node = raw
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
            node = child
        node[parts[-1]] = parsed
    return raw


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; only int->float is widened."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=key + ".")
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"'{where}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"config key '{prefix}{key}' is unknown; known keys: {', '.join(sorted(known))}"
            )
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in raw.items()}
    return cls(**kwargs)


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}; got '{value}'")


def _positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"config key '{key}' must be {'>= 0' if allow_zero else '> 0'}; got {value}")


def _check_values(cfg: Config) -> None:
    """Value checks beyond types (ranges and choices)."""
    _choice("stage", cfg.stage, STAGES)
    _choice("model.spatial_dims", str(cfg.model.spatial_dims), ("2", "3"))
    _choice("diffusion.schedule", cfg.diffusion.schedule, SCHEDULES)
    _choice("diffusion.prediction_type", cfg.diffusion.prediction_type, PREDICTION_TYPES)
    _choice("diffusion.noise", cfg.diffusion.noise, NOISE_KINDS)
    _choice("diffusion.flow_time_sampling", cfg.diffusion.flow_time_sampling, FLOW_TIME_SAMPLINGS)
    _choice("data.cache", cfg.data.cache, CACHE_MODES)
    _positive("diffusion.num_train_timesteps", cfg.diffusion.num_train_timesteps)
    if not 0 < cfg.diffusion.beta_start < cfg.diffusion.beta_end < 1:
        raise ConfigError("config keys 'diffusion.beta_start' < 'diffusion.beta_end' must lie in (0, 1)")
    t = cfg.train
    for key in ("max_steps", "batch_size"):
        _positive(f"train.{key}", getattr(t, key))
    _positive("train.lr", t.lr)
    for key in ("warmup_steps", "grad_clip", "weight_decay", "checkpoint_every", "log_every",
                "preview_every", "preview_samples", "preview_steps"):
        _positive(f"train.{key}", getattr(t, key), allow_zero=True)
    a = cfg.autoencoder
    _choice("autoencoder.kind", a.kind, AUTOENCODER_KINDS)
    if a.kind == "vq" and a.norm_num_groups is not None:
        raise ConfigError("config key 'autoencoder.norm_num_groups' does not apply to autoencoder.kind: vq (no norm layers)")
    if a.kind != "vq" and a.num_embeddings is not None:
        raise ConfigError("config key 'autoencoder.num_embeddings' applies to autoencoder.kind: vq only")
    if a.num_embeddings is not None:
        _positive("autoencoder.num_embeddings", a.num_embeddings)
    for key in ("kl_weight", "quantization_weight", "adversarial_weight", "adversarial_start"):
        _positive(f"autoencoder.{key}", getattr(a, key), allow_zero=True)
    for key in ("discriminator_channels", "discriminator_layers", "discriminator_lr", "scale_batches"):
        _positive(f"autoencoder.{key}", getattr(a, key))
    if cfg.stage == "latent" and not a.checkpoint:
        raise ConfigError(
            "config key 'autoencoder.checkpoint' is needed for stage: latent (the model.safetensors "
            "of a trained autoencoder run)"
        )
    _check_conditioning(cfg)
    if a.tile is not None and (len(a.tile) not in (1, 2, 3) or min(a.tile) < 1):
        raise ConfigError(f"config key 'autoencoder.tile' must be 1 to 3 positive integers; got {a.tile}")
    if not 0 <= a.overlap < 1:
        raise ConfigError(f"config key 'autoencoder.overlap' must lie in [0, 1); got {a.overlap}")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"config key 'train.ema_decay' must lie in [0, 1); got {t.ema_decay}")
    if not 0 <= t.cond_drop_prob < 1:
        raise ConfigError(f"config key 'train.cond_drop_prob' must lie in [0, 1); got {t.cond_drop_prob}")
    _check_oversample(cfg)
    if not 0 < t.min_lr_ratio <= 1:
        raise ConfigError(f"config key 'train.min_lr_ratio' must lie in (0, 1]; got {t.min_lr_ratio}")
    if cfg.data.preprocessing:
        from medidiff.data.transforms import Preprocessing

        Preprocessing.from_dict(cfg.data.preprocessing, prefix="data.preprocessing")
    if not 0 <= cfg.data.min_foreground < 1:
        raise ConfigError(f"config key 'data.min_foreground' must lie in [0, 1); got {cfg.data.min_foreground}")


def _check_oversample(cfg: Config) -> None:
    over = cfg.train.oversample
    if not over:
        return
    if not isinstance(over, dict):
        raise ConfigError(f"config key 'train.oversample' must map label names to factors; got {over!r}")
    labels = list(cfg.conditioning.labels)
    if cfg.conditioning.mask == "none" or cfg.model.spatial_dims != 2:
        raise ConfigError("config key 'train.oversample' applies to mask-conditioned 2D models only "
                          "(conditioning.mask concat or controlnet, model.spatial_dims 2)")
    for name, factor in over.items():
        if name not in labels:
            raise ConfigError(f"config key 'train.oversample': {name!r} is not among conditioning.labels {labels}")
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ConfigError(f"config key 'train.oversample.{name}' must be an integer >= 1; got {factor!r}")


def _check_conditioning(cfg: Config) -> None:
    c = cfg.conditioning
    _choice("conditioning.mask", c.mask, MASK_CONDITIONINGS)
    if not 0 <= c.dropout < 1:
        raise ConfigError(f"config key 'conditioning.dropout' must lie in [0, 1); got {c.dropout}")
    if c.mask == "none":
        if c.labels:
            raise ConfigError(
                "config key 'conditioning.labels' needs conditioning.mask: concat or controlnet"
            )
    else:
        if not c.labels:
            raise ConfigError(
                f"config key 'conditioning.labels' must name at least one label for "
                f"conditioning.mask: {c.mask}, e.g. [brain, tumor, ms, stroke]"
            )
        if len(set(c.labels)) != len(c.labels) or not all(n.strip() for n in c.labels):
            raise ConfigError(f"config key 'conditioning.labels' must be distinct names; got {c.labels}")
        if len(c.labels) > 254:
            raise ConfigError("config key 'conditioning.labels' holds more than 254 labels")
    if (cfg.stage == "controlnet") != (c.mask == "controlnet"):
        raise ConfigError(
            "stage: controlnet and conditioning.mask: controlnet go together (a ControlNet "
            "trained on label maps over a frozen base.checkpoint)"
        )
    if cfg.stage == "controlnet" and not cfg.base.checkpoint:
        raise ConfigError("config key 'base.checkpoint' is needed for stage: controlnet (the frozen base model)")
    if cfg.stage != "controlnet" and cfg.base.checkpoint:
        raise ConfigError("config key 'base.checkpoint' applies to stage: controlnet only")
    if c.mask != "none" and cfg.stage in ("latent", "autoencoder"):
        raise ConfigError(
            f"conditioning.mask with stage: {cfg.stage} is not implemented: mask-conditioned models "
            "are pixel-space (stage: diffusion or controlnet)"
        )
    if c.mask != "none" and cfg.model.num_class_embeds:
        raise ConfigError(
            "conditioning.mask and model.num_class_embeds cannot be combined yet; use one kind of "
            "conditioning"
        )
