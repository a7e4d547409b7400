"""Autoencoder presets over MONAI's :class:`~monai.networks.nets.AutoencoderKL`, with tiling.

Latent diffusion (Rombach et al. 2022, https://arxiv.org/abs/2112.10752) trains the
denoising U-Net on the latent of a frozen autoencoder instead of on voxels: a
KL-regularised autoencoder compresses the volume by ``2 ** (len(channels) - 1)`` per
axis (4x for two down-samplings: 96 x 112 x 96 at 2 mm -> 24 x 28 x 24), and the decoder
brings samples and reconstructions back. The brain LDM of Pinaya et al. 2022
(https://arxiv.org/abs/2209.07162; 160 x 224 x 160 -> 3 x 20 x 28 x 20) and NVIDIA's MAISI
(CT, 4-channel latent at 1/4 per axis) are built the same way.

========  ===========================================================================
preset    intended use
========  ===========================================================================
``tiny``  tests and smoke runs (8/16 channels, one residual block per level)
``small`` the default 2 mm brain model, trainable on a CPU (16/32/64 channels, 4x)
``base``  GPU scale for 1 mm MRI and CT (64/128/256 channels, 4x, MAISI-like width)
========  ===========================================================================

Large volumes are encoded and decoded in overlapping tiles (:func:`encode_tiled`,
:func:`decode_tiled`) with Gaussian blending (MONAI's sliding-window inferer, whose
output may be zoomed relative to its input), so the memory a 1 mm whole-brain volume or a
512 x 512 x N CT needs is set by the tile size, not by the volume.

The latent fed to the diffusion model is ``z = scale_factor * mu(x)``, with
``scale_factor = 1 / std(mu)`` over the training latents (:func:`latent_scale_factor`;
Rombach et al. Sec. 4.3.2 and MONAI's latent-diffusion tutorial), so that the latent has
about unit variance like the diffusion noise.

Example:
    >>> import torch
    >>> from medidiff.models.autoencoder import (
    ...     autoencoder_kwargs, build_autoencoder, decode_tiled, encode_tiled)
    >>> ae = build_autoencoder(autoencoder_kwargs(3, "tiny"))
    >>> x = torch.rand(1, 1, 32, 24, 16)                       # (B, C, X, Y, Z)
    >>> z = encode_tiled(ae, x, tile=(16, 16, 16))
    >>> tuple(z.shape), tuple(decode_tiled(ae, z, tile=(4, 4, 4)).shape)
    ((1, 3, 16, 12, 8), (1, 1, 32, 24, 16))
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from medidiff.errors import ConfigError

__all__ = [
    "AUTOENCODER_PRESETS",
    "AutoencoderPreset",
    "autoencoder_kwargs",
    "build_autoencoder",
    "downsample_factor",
    "latent_shape",
    "encode_tiled",
    "decode_tiled",
    "latent_scale_factor",
]


@dataclass(frozen=True)
class AutoencoderPreset:
    """The architecture a preset fixes (MONAI ``AutoencoderKL`` arguments).

    Attributes:
        channels: feature channels per level, full resolution first; each level after the
            first halves the grid.
        latent_channels: channels of the latent.
        num_res_blocks: residual blocks per level.
        norm_num_groups: GroupNorm groups (divides every entry of ``channels``).
    """

    channels: tuple[int, ...]
    latent_channels: int
    num_res_blocks: int
    norm_num_groups: int


AUTOENCODER_PRESETS: dict[str, AutoencoderPreset] = {
    "tiny": AutoencoderPreset(channels=(8, 16), latent_channels=3, num_res_blocks=1, norm_num_groups=8),
    "small": AutoencoderPreset(channels=(16, 32, 64), latent_channels=4, num_res_blocks=1, norm_num_groups=16),
    "base": AutoencoderPreset(channels=(64, 128, 256), latent_channels=4, num_res_blocks=2, norm_num_groups=32),
}


def autoencoder_kwargs(
    spatial_dims: int, preset: str = "small", *, in_channels: int = 1, **overrides: Any
) -> dict[str, Any]:
    """The JSON-serialisable ``AutoencoderKL`` kwargs of a preset (checkpoints store them).

    No attention (attention at full 3D resolution is the memory cost tiling avoids) and
    no non-local blocks, so every layer is local and tiles blend without seams beyond the
    convolutions' reach.

    Args:
        spatial_dims: 2 or 3.
        preset: a key of :data:`AUTOENCODER_PRESETS`.
        in_channels: image channels (also the output channels).
        **overrides: any ``AutoencoderKL`` argument, e.g. ``latent_channels=4``.

    Raises:
        ConfigError: unknown preset or spatial_dims.
    """
    if spatial_dims not in (2, 3):
        raise ConfigError(f"autoencoder spatial_dims must be 2 or 3; got {spatial_dims!r}")
    if preset not in AUTOENCODER_PRESETS:
        raise ConfigError(
            f"unknown autoencoder preset {preset!r}; choose one of {sorted(AUTOENCODER_PRESETS)}"
        )
    p = asdict(AUTOENCODER_PRESETS[preset])
    channels = tuple(overrides.pop("channels", p["channels"]))
    kwargs: dict[str, Any] = {
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "channels": list(channels),
        "latent_channels": p["latent_channels"],
        "num_res_blocks": p["num_res_blocks"],
        "norm_num_groups": p["norm_num_groups"],
        "attention_levels": [False] * len(channels),
        "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False,
    }
    kwargs.update(overrides)
    return kwargs


def build_autoencoder(kwargs: Mapping[str, Any]) -> nn.Module:
    """``AutoencoderKL(**kwargs)``; MONAI's own argument errors become a ConfigError."""
    from monai.networks.nets import AutoencoderKL

    try:
        return AutoencoderKL(**dict(kwargs))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build the autoencoder from {dict(kwargs)}: {exc}") from None


def downsample_factor(kwargs: Mapping[str, Any]) -> int:
    """How many voxels per axis one latent voxel covers: ``2 ** (levels - 1)``."""
    return 2 ** (len(kwargs["channels"]) - 1)


def latent_shape(kwargs: Mapping[str, Any], image_shape: Sequence[int]) -> tuple[int, ...]:
    """``(C_latent, *spatial)`` of the latent of an image of spatial ``image_shape``.

    Raises:
        ConfigError: an axis not divisible by the down-sampling factor.
    """
    f = downsample_factor(kwargs)
    bad = [s for s in image_shape if s % f]
    if bad:
        raise ConfigError(
            f"image shape {tuple(image_shape)} must be divisible by {f} on every axis for this "
            "autoencoder; pad or crop it (preprocessing.shape)"
        )
    return (int(kwargs["latent_channels"]), *(s // f for s in image_shape))


def _tile(tile: int | Sequence[int] | None, shape: Sequence[int], multiple: int) -> tuple[int, ...]:
    """The window per axis: at most the volume, a multiple of ``multiple`` where the volume allows."""
    dims = len(shape)
    wanted = [10**9] * dims if tile is None else ([tile] * dims if isinstance(tile, int) else list(tile))
    if len(wanted) != dims:
        raise ConfigError(f"tile {tile!r} has {len(wanted)} entries for a {dims}D volume")
    out = []
    for w, s in zip(wanted, shape):
        w = min(int(w), int(s))
        if w >= multiple:
            w -= w % multiple
        out.append(max(1, w))
    return tuple(out)


def _sliding(
    fn, x: torch.Tensor, roi: tuple[int, ...], overlap: float, sw_batch_size: int
) -> torch.Tensor:
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        out = sliding_window_inference(
            x, roi_size=roi, sw_batch_size=sw_batch_size, predictor=fn, overlap=overlap,
            mode="gaussian", sigma_scale=0.125, padding_mode="replicate", progress=False,
        )
    return out.as_tensor() if hasattr(out, "as_tensor") else out


def encode_tiled(
    autoencoder: nn.Module,
    image: torch.Tensor,
    *,
    tile: int | Sequence[int] | None = None,
    overlap: float = 0.25,
    scale_factor: float = 1.0,
    sw_batch_size: int = 1,
) -> torch.Tensor:
    """Latent mean of ``image`` (scaled), computed in overlapping tiles.

    Args:
        autoencoder: an ``AutoencoderKL`` (eval mode).
        image: ``(B, C, H, W[, D])``, every axis divisible by the down-sampling factor.
        tile: window in voxels (per axis or one int); ``None``: the whole volume at once.
        overlap: fraction of a window shared with its neighbour (Gaussian-weighted).
        scale_factor: multiplies the latent (see :func:`latent_scale_factor`).
        sw_batch_size: windows per forward pass.

    Returns:
        ``scale_factor * mu(image)``, ``(B, C_latent, H/f, W/f[, D/f])``.
    """
    roi = _tile(tile, image.shape[2:], 2 ** (len(autoencoder.encoder.channels) - 1))
    if roi == tuple(image.shape[2:]):
        with torch.no_grad():
            return autoencoder.encode(image)[0] * scale_factor
    return _sliding(lambda t: autoencoder.encode(t)[0], image, roi, overlap, sw_batch_size) * scale_factor


def decode_tiled(
    autoencoder: nn.Module,
    latent: torch.Tensor,
    *,
    tile: int | Sequence[int] | None = None,
    overlap: float = 0.25,
    scale_factor: float = 1.0,
    sw_batch_size: int = 1,
) -> torch.Tensor:
    """Decode a (scaled) latent in overlapping latent tiles.

    Args:
        autoencoder: an ``AutoencoderKL`` (eval mode).
        latent: ``(B, C_latent, h, w[, d])`` as given by :func:`encode_tiled`.
        tile: window in latent voxels; ``None``: the whole latent at once.
        overlap: fraction of a window shared with its neighbour.
        scale_factor: the factor the latent was multiplied by (divided out here).
        sw_batch_size: windows per forward pass.

    Returns:
        The image ``(B, C, h*f, w*f[, d*f])``.
    """
    z = latent / scale_factor
    roi = _tile(tile, z.shape[2:], 1)
    if roi == tuple(z.shape[2:]):
        with torch.no_grad():
            return autoencoder.decode(z)
    return _sliding(autoencoder.decode, z, roi, overlap, sw_batch_size)


def latent_scale_factor(latents: Iterable[torch.Tensor]) -> float:
    """``1 / std`` over all values of the given (unscaled) training latents.

    Args:
        latents: tensors of latent means, e.g. one ``(1, C, h, w, d)`` per training scan.

    Raises:
        ValueError: no latents, or they are constant.
    """
    count, total, total_sq = 0, 0.0, 0.0
    for z in latents:
        z = z.detach().double()
        count += z.numel()
        total += float(z.sum())
        total_sq += float((z * z).sum())
    if count < 2:
        raise ValueError("latent_scale_factor needs at least two latent values")
    var = (total_sq - total * total / count) / (count - 1)
    if not math.isfinite(var) or var <= 0:
        raise ValueError(f"training latents have variance {var}: cannot scale them")
    return 1.0 / math.sqrt(var)
