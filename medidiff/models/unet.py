"""U-Net presets over MONAI's :class:`~monai.networks.nets.DiffusionModelUNet`.

medidiff does not define its own denoising network: it picks MONAI's time-conditioned
U-Net (Ho et al. 2020, https://arxiv.org/abs/2006.11239, with the attention layout of
Rombach et al. 2022, https://arxiv.org/abs/2112.10752) and offers a few named sizes:

========  ===========================================================================
preset    intended use
========  ===========================================================================
``tiny``  tests and smoke runs: a forward+backward pass in well under a second on a CPU
``small`` the default 2D brain model, trainable on 2 CPU cores in about two hours
          (64x64 to 96x96 slices, batch 16); in 3D a model for CPU smoke training
``base``  GPU scale, as in MONAI's generative tutorials
========  ===========================================================================

The network predicts eps_theta(x_t, t) (or v, or x_0: the diffusion module decides) with
the same shape as its input x_t ``(B, C, H, W[, D])``.

Every spatial size fed to a model must be divisible by ``2 ** (len(channels) - 1)``
(:func:`spatial_multiple`): each level but the last halves the grid.

A model is fully described by :func:`model_kwargs`, a JSON-serialisable dict that
checkpoints store, so ``DiffusionModelUNet(**kwargs)`` rebuilds the identical
architecture. Flash attention (PyTorch's ``scaled_dot_product_attention``) changes no
weights; it is switched on only for models that run on CUDA
(:func:`enable_flash_attention`) and is always stored as ``False``.

Example:
    >>> import torch
    >>> from medidiff.models.unet import build_model, describe
    >>> model = build_model(2, "tiny")
    >>> x_t = torch.randn(2, 1, 32, 32)                       # (B, C, H, W)
    >>> model(x_t, timesteps=torch.tensor([10, 500])).shape
    torch.Size([2, 1, 32, 32])
    >>> describe(model).split(":")[0]
    'DiffusionModelUNet 2D tiny'
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from medidiff.errors import ConfigError

__all__ = [
    "PRESET_NAMES",
    "ModelPreset",
    "get_preset",
    "build_model",
    "model_kwargs",
    "build_model_from_kwargs",
    "enable_flash_attention",
    "flash_attention_supported",
    "spatial_multiple",
    "count_parameters",
    "describe",
]


@dataclass(frozen=True)
class ModelPreset:
    """The architecture choices a preset fixes; everything else uses MONAI's defaults.

    Attributes:
        channels: output channels of each U-Net level, from full resolution down.
        attention_levels: whether each level has self-attention blocks (the middle block
            always has one, at the lowest resolution).
        num_res_blocks: residual blocks per level on the way down (the way up has one more).
        num_head_channels: channels per attention head (heads = channels // this).
        norm_num_groups: GroupNorm groups; every entry of ``channels`` is a multiple of it.
    """

    channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    num_res_blocks: int
    num_head_channels: int
    norm_num_groups: int


# 2D small: 1.11 M parameters; one training step (batch 16, AdamW, 2 CPU cores, measured by
# pipelines/benchmark_model_presets.py on an unloaded machine) takes ~1.1-1.2 s at 64x64
# and ~2.9-3.0 s at 96x96, i.e. ~6000 or ~2400 steps in two hours. Wider variants cost
# more per step for little gain at this budget: (32, 64, 96) 1.8 M ~1.3x at 96x96,
# (32, 64, 128) 2.7 M ~1.6x, two res blocks 1.6 M ~1.5x; a single 64-channel head is
# cheaper than MONAI's tutorial default of 32-channel heads. MONAI's generative tutorials
# use (128, 256, 256) with attention at the two lower levels for 2D DDPM on 64x64 MedNIST
# ("base" here) and (64, 64, 128) with attention at the lowest level for 3D DDPM on
# 32x40x32 BraTS.
_PRESETS: dict[tuple[int, str], ModelPreset] = {
    (2, "tiny"): ModelPreset((8, 16), (False, False), 1, 8, 8),
    (3, "tiny"): ModelPreset((8, 16), (False, False), 1, 8, 8),
    (2, "small"): ModelPreset((32, 64, 64), (False, False, True), 1, 64, 32),
    (3, "small"): ModelPreset((16, 32, 64), (False, False, True), 1, 32, 16),
    (2, "base"): ModelPreset((128, 256, 256), (False, True, True), 2, 64, 32),
    # 3D: attention only at the lowest level; at 96^3 input the second level has 48^3
    # tokens, far too many for dense attention.
    (3, "base"): ModelPreset((64, 128, 256), (False, False, True), 2, 64, 32),
}

PRESET_NAMES: tuple[str, ...] = ("tiny", "small", "base")

# Keys of build_model(**overrides) and the architecture fields they replace.
_OVERRIDABLE = (
    "channels",
    "attention_levels",
    "num_res_blocks",
    "num_head_channels",
    "norm_num_groups",
    "resblock_updown",
    "transformer_num_layers",
)

# Constructor arguments of the installed MONAI DiffusionModelUNet.
_UNET_ARGS = tuple(
    name for name in inspect.signature(DiffusionModelUNet.__init__).parameters if name != "self"
)


def get_preset(spatial_dims: int, preset: str) -> ModelPreset:
    """Return the architecture of a named preset.

    Args:
        spatial_dims: 2 or 3.
        preset: one of :data:`PRESET_NAMES`.

    Returns:
        The :class:`ModelPreset`.

    Raises:
        ConfigError: unknown ``spatial_dims`` or ``preset``.
    """
    _check_spatial_dims(spatial_dims)
    if not isinstance(preset, str) or (spatial_dims, preset) not in _PRESETS:
        raise ConfigError(
            f"model preset {preset!r} is unknown; use one of {', '.join(PRESET_NAMES)}"
        )
    return _PRESETS[(spatial_dims, preset)]


def model_kwargs(
    spatial_dims: int,
    preset: str = "small",
    *,
    in_channels: int = 1,
    out_channels: int = 1,
    num_class_embeds: int | None = None,
    cross_attention_dim: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Resolve a preset and overrides into the full ``DiffusionModelUNet`` constructor kwargs.

    The result names every constructor argument of the installed MONAI version, holds only
    JSON types (lists, not tuples) and survives ``json.loads(json.dumps(kwargs))`` unchanged,
    so a checkpoint can store it and ``DiffusionModelUNet(**kwargs)`` rebuilds the same
    architecture. ``use_flash_attention`` is always ``False`` here: it changes no weights
    and is a property of the device (see :func:`enable_flash_attention`).

    Args:
        spatial_dims: 2 for slices ``(B, C, H, W)``, 3 for volumes ``(B, C, H, W, D)``.
        preset: ``"tiny"``, ``"small"`` or ``"base"``.
        in_channels: image channels C of x_t.
        out_channels: channels of the prediction (normally equal to ``in_channels``).
        num_class_embeds: number of classes for class conditioning, or None.
        cross_attention_dim: context dimension for cross-attention conditioning, or None;
            when given, the attention levels become cross-attention transformers
            (``with_conditioning=True``).
        **overrides: any of ``channels``, ``attention_levels``, ``num_res_blocks``,
            ``num_head_channels``, ``norm_num_groups``, ``resblock_updown``,
            ``transformer_num_layers``.

    Returns:
        The resolved keyword arguments.

    Raises:
        ConfigError: unknown preset or override key, or an inconsistent architecture.
    """
    base = get_preset(spatial_dims, preset)
    unknown = sorted(set(overrides) - set(_OVERRIDABLE))
    if unknown:
        raise ConfigError(
            f"model setting {unknown[0]!r} cannot be overridden; "
            f"overridable settings are {', '.join(_OVERRIDABLE)}"
        )
    kwargs: dict[str, Any] = {
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "num_res_blocks": base.num_res_blocks,
        "channels": list(base.channels),
        "attention_levels": list(base.attention_levels),
        "norm_num_groups": base.norm_num_groups,
        "norm_eps": 1e-6,
        "resblock_updown": False,
        "num_head_channels": base.num_head_channels,
        "with_conditioning": cross_attention_dim is not None,
        "transformer_num_layers": 1,
        "cross_attention_dim": cross_attention_dim,
        "num_class_embeds": num_class_embeds,
        "upcast_attention": False,
        "dropout_cattn": 0.0,
        "include_fc": True,
        "use_combined_linear": False,
        "use_flash_attention": False,
    }
    kwargs.update(overrides)
    kwargs = _normalise(kwargs)
    _validate(kwargs)
    return kwargs


def build_model(
    spatial_dims: int,
    preset: str = "small",
    *,
    in_channels: int = 1,
    out_channels: int = 1,
    num_class_embeds: int | None = None,
    cross_attention_dim: int | None = None,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> DiffusionModelUNet:
    """Build a denoising U-Net from a preset.

    Args:
        spatial_dims: 2 for slices ``(B, C, H, W)``, 3 for volumes ``(B, C, H, W, D)``.
        preset: ``"tiny"``, ``"small"`` or ``"base"``.
        in_channels: image channels C of x_t.
        out_channels: channels of the prediction.
        num_class_embeds: number of classes for class conditioning, or None.
        cross_attention_dim: context dimension for cross-attention conditioning, or None.
        device: where to put the model; on a CUDA device flash attention is switched on.
            None leaves it on the CPU.
        **overrides: architecture overrides, see :func:`model_kwargs`.

    Returns:
        The untrained ``DiffusionModelUNet``; ``model(x_t, timesteps)`` maps
        ``(B, C_in, *spatial)`` to ``(B, C_out, *spatial)``.

    Raises:
        ConfigError: unknown preset or override, or an inconsistent architecture.
    """
    kwargs = model_kwargs(
        spatial_dims,
        preset,
        in_channels=in_channels,
        out_channels=out_channels,
        num_class_embeds=num_class_embeds,
        cross_attention_dim=cross_attention_dim,
        **overrides,
    )
    return build_model_from_kwargs(kwargs, device=device)


def build_model_from_kwargs(
    kwargs: Mapping[str, Any], *, device: str | torch.device | None = None
) -> DiffusionModelUNet:
    """Rebuild a model from kwargs stored by :func:`model_kwargs` (e.g. in a checkpoint).

    Args:
        kwargs: ``DiffusionModelUNet`` constructor arguments.
        device: where to put the model; on a CUDA device flash attention is switched on.

    Returns:
        The model, with freshly initialised weights.

    Raises:
        ConfigError: unknown or missing keys, or an inconsistent architecture.
    """
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"model kwargs must be a mapping, got {type(kwargs).__name__}")
    unknown = sorted(set(kwargs) - set(_UNET_ARGS))
    if unknown:
        raise ConfigError(
            f"model kwargs contain {unknown[0]!r}, which the installed MONAI DiffusionModelUNet "
            "does not accept; the checkpoint may need a newer MONAI"
        )
    for required in ("spatial_dims", "in_channels", "out_channels"):
        if required not in kwargs:
            raise ConfigError(f"model kwargs lack {required!r}; store kwargs from model_kwargs()")
    resolved = _normalise(dict(kwargs))
    _validate(resolved)
    model = DiffusionModelUNet(**resolved)
    if device is not None:
        model = model.to(device)
        enable_flash_attention(model, device)
    return model


def flash_attention_supported(device: str | torch.device) -> bool:
    """Whether flash attention should be used for a model on ``device``.

    Args:
        device: the device the model runs on.

    Returns:
        True only for a CUDA device on a machine where CUDA is available.
    """
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def enable_flash_attention(model: nn.Module, device: str | torch.device) -> bool:
    """Switch MONAI's attention blocks to ``scaled_dot_product_attention`` on CUDA.

    Flash attention computes the same softmax(q k^T / sqrt(d)) v as the dense path with less
    memory; it has no weights of its own, so it can be toggled on a built model.

    Args:
        model: a ``DiffusionModelUNet`` (or any module holding MONAI attention blocks).
        device: the device the model runs on; nothing changes unless it is CUDA.

    Returns:
        True if flash attention was switched on.
    """
    if not flash_attention_supported(device):
        return False
    switched = False
    for module in model.modules():
        # MONAI's SABlock and CrossAttentionBlock read this flag in forward().
        if hasattr(module, "use_flash_attention") and not getattr(module, "save_attn", False):
            if getattr(module, "attention_dtype", None) is not None:
                continue  # upcast attention casts q, k only; keep the dense path
            module.use_flash_attention = True
            switched = True
    return switched


def prepare_for_inference(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Eval mode on ``device``, in the fastest memory layout for it.

    On the CPU a 2D network runs about 20 % faster in ``channels_last`` layout (oneDNN
    convolutions; measured on the small preset, batch 32 of 64x80 slices, same outputs to
    1e-5). Other cases keep the default layout.

    Args:
        model: a ``DiffusionModelUNet``.
        device: where it will run.

    Returns:
        The same module, moved and switched to eval mode.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    if device.type == "cpu" and getattr(model, "conv_in", None) is not None:
        conv = getattr(model.conv_in, "conv", model.conv_in)
        if getattr(conv, "weight", None) is not None and conv.weight.ndim == 4:
            model = model.to(memory_format=torch.channels_last)
    return model


def spatial_multiple(kwargs_or_model: Mapping[str, Any] | nn.Module) -> int:
    """The number every spatial size of the input must be divisible by.

    Args:
        kwargs_or_model: model kwargs or a built ``DiffusionModelUNet``.

    Returns:
        ``2 ** (len(channels) - 1)``: each level but the last halves the grid.
    """
    if isinstance(kwargs_or_model, nn.Module):
        channels = kwargs_or_model.block_out_channels
    else:
        channels = kwargs_or_model["channels"]
    return 2 ** (len(channels) - 1)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Count the scalar parameters of a model.

    Args:
        model: any module.
        trainable_only: count only parameters with ``requires_grad``.

    Returns:
        The number of scalars.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe(model: nn.Module) -> str:
    """One line naming the architecture of a ``DiffusionModelUNet``.

    Args:
        model: a ``DiffusionModelUNet``.

    Returns:
        For example ``"DiffusionModelUNet 2D small: 1.11 M parameters, channels (32, 64,
        64), attention (False, False, True), 1 res block per level, 64 channels per head"``.
        The preset is ``custom`` when the architecture matches none.
    """
    spatial_dims = model.conv_in.conv.weight.ndim - 2
    channels = tuple(int(c) for c in model.block_out_channels)
    attention = tuple(bool(a) for a in model.attention_levels)
    res_blocks = tuple(int(r) for r in model.num_res_blocks)
    heads = tuple(int(h) for h in model.num_head_channels)
    norm_groups = model.out[0].num_groups
    name = "custom"
    for (dims, preset_name), preset in _PRESETS.items():
        if (
            dims == spatial_dims
            and preset.channels == channels
            and preset.attention_levels == attention
            and res_blocks == (preset.num_res_blocks,) * len(channels)
            and heads == (preset.num_head_channels,) * len(channels)
            and norm_groups == preset.norm_num_groups
        ):
            name = preset_name
    res_text = str(res_blocks[0]) if len(set(res_blocks)) == 1 else str(res_blocks)
    head_text = str(heads[0]) if len(set(heads)) == 1 else str(heads)
    extras = ""
    if model.num_class_embeds is not None:
        extras += f", {model.num_class_embeds} classes"
    if model.with_conditioning:
        extras += ", cross-attention conditioning"
    return (
        f"DiffusionModelUNet {spatial_dims}D {name}: "
        f"{count_parameters(model) / 1e6:.2f} M parameters, channels {channels}, "
        f"attention {attention}, {res_text} res block(s) per level, "
        f"{head_text} channels per head{extras}"
    )


# ---------------------------------------------------------------------------- helpers


def _check_spatial_dims(spatial_dims: Any) -> None:
    if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
        raise ConfigError(
            f"model spatial_dims={spatial_dims!r} is not supported; use 2 (slices) or 3 (volumes)"
        )


def _normalise(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Turn tuples into lists so the kwargs equal their own JSON round trip."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _per_level(kwargs: dict[str, Any], key: str, n_levels: int) -> list[int]:
    """Expand an int-or-list setting to one positive int per level."""
    value = kwargs[key]
    if _is_int(value):
        values = [value] * n_levels
    elif isinstance(value, list) and all(_is_int(v) for v in value):
        values = value
        if len(values) != n_levels:
            raise ConfigError(
                f"model {key}={value} has {len(values)} entries but channels has {n_levels}; "
                "give one integer or one per level"
            )
    else:
        raise ConfigError(f"model {key}={value!r} must be an integer or a list of integers")
    if any(v < 1 for v in values):
        raise ConfigError(f"model {key}={value!r} must be positive")
    return values


def _validate(kwargs: dict[str, Any]) -> None:
    """Check a kwargs dict, raising ConfigError naming the key and the fix."""
    _check_spatial_dims(kwargs["spatial_dims"])
    for key in ("in_channels", "out_channels"):
        if not _is_int(kwargs[key]) or kwargs[key] < 1:
            raise ConfigError(f"model {key}={kwargs[key]!r} must be a positive integer")

    channels = kwargs.get("channels")
    if (
        not isinstance(channels, list)
        or not channels
        or not all(_is_int(c) and c > 0 for c in channels)
    ):
        raise ConfigError(
            f"model channels={channels!r} must be a non-empty list of positive integers, "
            "e.g. [32, 64, 64]"
        )
    n_levels = len(channels)

    attention = kwargs.get("attention_levels")
    if not isinstance(attention, list) or not all(isinstance(a, bool) for a in attention):
        raise ConfigError(
            f"model attention_levels={attention!r} must be a list of true/false, one per level"
        )
    if len(attention) != n_levels:
        raise ConfigError(
            f"model attention_levels has {len(attention)} entries but channels has {n_levels}; "
            f"give one true/false per entry of channels {channels}"
        )

    groups = kwargs.get("norm_num_groups")
    if not _is_int(groups) or groups < 1:
        raise ConfigError(f"model norm_num_groups={groups!r} must be a positive integer")
    bad = [c for c in channels if c % groups]
    if bad:
        raise ConfigError(
            f"model channels {channels}: {bad[0]} is not divisible by norm_num_groups={groups}; "
            f"use multiples of {groups} or a norm_num_groups that divides every entry"
        )

    _per_level(kwargs, "num_res_blocks", n_levels)
    heads = _per_level(kwargs, "num_head_channels", n_levels)
    # Attention runs at every level with attention_levels True and always in the middle
    # block (lowest resolution); each needs channels divisible by the head width.
    for level, (c, h) in enumerate(zip(channels, heads)):
        if (attention[level] or level == n_levels - 1) and c % h:
            raise ConfigError(
                f"model num_head_channels={h} does not divide channels[{level}]={c} "
                "(an attention level); choose a divisor of it"
            )

    for key in ("num_class_embeds", "cross_attention_dim"):
        value = kwargs.get(key)
        if value is not None and (not _is_int(value) or value < 1):
            raise ConfigError(f"model {key}={value!r} must be a positive integer or null")
    if kwargs.get("with_conditioning", False) != (kwargs.get("cross_attention_dim") is not None):
        raise ConfigError(
            "model with_conditioning must be true exactly when cross_attention_dim is set; "
            "set both or neither"
        )
    for key in ("resblock_updown", "upcast_attention", "include_fc", "use_combined_linear",
                "use_flash_attention"):
        if key in kwargs and not isinstance(kwargs[key], bool):
            raise ConfigError(f"model {key}={kwargs[key]!r} must be true or false")
    if "transformer_num_layers" in kwargs and (
        not _is_int(kwargs["transformer_num_layers"]) or kwargs["transformer_num_layers"] < 1
    ):
        raise ConfigError(
            f"model transformer_num_layers={kwargs['transformer_num_layers']!r} "
            "must be a positive integer"
        )
    try:
        json.dumps(kwargs, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model kwargs are not JSON-serialisable: {exc}") from None
