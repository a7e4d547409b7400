"""Autoencoder presets over MONAI's :class:`~monai.networks.nets.AutoencoderKL` and
:class:`~monai.networks.nets.VQVAE`, with tiling.

Latent diffusion (Rombach et al. 2022, https://arxiv.org/abs/2112.10752) trains the
denoising U-Net on the latent of a frozen autoencoder instead of on voxels: a
KL-regularised autoencoder compresses the volume by ``2 ** (len(channels) - 1)`` per
axis (4x for two down-samplings: 96 x 112 x 96 at 2 mm -> 24 x 28 x 24), and the decoder
brings samples and reconstructions back. The brain LDM of Pinaya et al. 2022
(https://arxiv.org/abs/2209.07162; 160 x 224 x 160 -> 3 x 20 x 28 x 20) and NVIDIA's MAISI
(CT, 4-channel latent at 1/4 per axis) are built the same way.

Two kinds of autoencoder (``autoencoder.kind``, :data:`medidiff.constants.AUTOENCODER_KINDS`):

* ``kl``: MONAI ``AutoencoderKL`` (:data:`AUTOENCODER_PRESETS`); its latent is the
  posterior mean ``mu(x)``.
* ``vq``: MONAI ``VQVAE`` (van den Oord et al. 2017, https://arxiv.org/abs/1711.00937; the
  3D brain VQ-VAE of Tudosiu et al. 2022, https://arxiv.org/abs/2209.03177) with an EMA
  codebook (:data:`VQ_AUTOENCODER_PRESETS`). Every level halves the grid (stride-2
  convolutions), so two levels give 4x. As in Rombach et al.'s "VQ-reg." models, the
  diffusion model works on the continuous encoder output ``z_e(x)`` *before*
  quantisation, and a latent is decoded by quantising it to the nearest codebook
  vectors, then decoding (the quantiser is folded into the decoder).

:func:`to_latent` and :func:`from_latent` are the two functions that differ by kind;
everything downstream (tiling, :class:`~medidiff.models.latent.LatentCodec`, the latent
stage) goes through them.

========  ===========================================================================
preset    intended use
========  ===========================================================================
``tiny``  tests and smoke runs (8/16 channels, one residual block per level; KL 2x,
          VQ 4x)
``small`` the default 2 mm brain model, trainable on a CPU (KL 16/32/64 channels, VQ
          32/64; both 4x with a 4-channel latent)
``base``  GPU scale for 1 mm MRI and CT (KL 64/128/256, VQ 128/256; 4x, MAISI-like width)
========  ===========================================================================

Large volumes are encoded and decoded in overlapping tiles (:func:`encode_tiled`,
:func:`decode_tiled`) with Gaussian blending (MONAI's sliding-window inferer, whose
output may be zoomed relative to its input), so the memory a 1 mm whole-brain volume or a
512 x 512 x N CT needs is set by the tile size, not by the volume.

The latent fed to the diffusion model is ``z = scale_factor * mu(x)`` (``z_e(x)`` for a
VQ autoencoder), with ``scale_factor = 1 / std`` of these over the training latents (:func:`latent_scale_factor`;
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
    >>> vq = build_autoencoder(autoencoder_kwargs(3, "tiny", kind="vq"), kind="vq").eval()
    >>> z = encode_tiled(vq, x)                                # z_e, before quantisation
    >>> tuple(z.shape), tuple(decode_tiled(vq, z).shape)
    ((1, 3, 8, 6, 4), (1, 1, 32, 24, 16))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from medidiff.constants import AUTOENCODER_KINDS
from medidiff.errors import ConfigError

__all__ = [
    "AUTOENCODER_NETWORKS",
    "AUTOENCODER_PRESETS",
    "VQ_AUTOENCODER_PRESETS",
    "AutoencoderPreset",
    "VQAutoencoderPreset",
    "autoencoder_kwargs",
    "build_autoencoder",
    "downsample_factor",
    "latent_channels",
    "latent_shape",
    "network_kind",
    "network_factor",
    "network_latent_channels",
    "to_latent",
    "from_latent",
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


@dataclass(frozen=True)
class VQAutoencoderPreset:
    """The architecture a VQ preset fixes (MONAI ``VQVAE`` arguments).

    Attributes:
        channels: feature channels per level; *every* level halves the grid (a stride-2,
            kernel-4 convolution), so the down-sampling factor is ``2 ** len(channels)``.
        embedding_dim: channels of the latent (and of each codebook vector).
        num_embeddings: codebook size.
        num_res_layers: residual units per level.
    """

    channels: tuple[int, ...]
    embedding_dim: int
    num_embeddings: int
    num_res_layers: int


VQ_AUTOENCODER_PRESETS: dict[str, VQAutoencoderPreset] = {
    "tiny": VQAutoencoderPreset(channels=(8, 16), embedding_dim=3, num_embeddings=16, num_res_layers=1),
    # the same 4 x 24 x 28 x 24 latent of a 96 x 112 x 96 grid as the KL "small" preset
    "small": VQAutoencoderPreset(channels=(32, 64), embedding_dim=4, num_embeddings=256, num_res_layers=1),
    "base": VQAutoencoderPreset(channels=(128, 256), embedding_dim=4, num_embeddings=1024, num_res_layers=2),
}

#: The network name an inference file stores for each autoencoder kind
#: (a key of :data:`medidiff.models.checkpoint.NETWORK_BUILDERS`).
AUTOENCODER_NETWORKS: dict[str, str] = {"kl": "autoencoder_kl", "vq": "autoencoder_vq"}


def _check_kind(kind: str) -> None:
    if kind not in AUTOENCODER_KINDS:
        raise ConfigError(f"unknown autoencoder kind {kind!r}; choose one of {', '.join(AUTOENCODER_KINDS)}")


def autoencoder_kwargs(
    spatial_dims: int, preset: str = "small", *, kind: str = "kl", in_channels: int = 1, **overrides: Any
) -> dict[str, Any]:
    """The JSON-serialisable ``AutoencoderKL`` (``kind="kl"``) or ``VQVAE`` (``kind="vq"``)
    kwargs of a preset (checkpoints store them).

    KL: no attention (attention at full 3D resolution is the memory cost tiling avoids) and
    no non-local blocks, so every layer is local and tiles blend without seams beyond the
    convolutions' reach. VQ: MONAI's VQVAE is attention-free and norm-free; the codebook is
    updated by exponential moving averages (decay 0.99) and the commitment cost is 0.25
    (van den Oord et al. 2017).

    Args:
        spatial_dims: 2 or 3.
        preset: a key of :data:`AUTOENCODER_PRESETS` (:data:`VQ_AUTOENCODER_PRESETS`).
        kind: ``"kl"`` or ``"vq"``.
        in_channels: image channels (also the output channels).
        **overrides: any argument of the MONAI network, e.g. ``latent_channels=4`` (KL),
            ``num_embeddings=512`` (VQ); for VQ, ``channels`` also sets the residual
            channels and the per-level strides unless those are given too.

    Raises:
        ConfigError: unknown kind, preset or spatial_dims.
    """
    _check_kind(kind)
    if spatial_dims not in (2, 3):
        raise ConfigError(f"autoencoder spatial_dims must be 2 or 3; got {spatial_dims!r}")
    presets = VQ_AUTOENCODER_PRESETS if kind == "vq" else AUTOENCODER_PRESETS
    if preset not in presets:
        raise ConfigError(f"unknown autoencoder preset {preset!r}; choose one of {sorted(presets)}")
    p = asdict(presets[preset])
    channels = tuple(overrides.pop("channels", p["channels"]))
    kwargs: dict[str, Any]
    if kind == "vq":
        kwargs = {
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "out_channels": in_channels,
            "channels": list(channels),
            "num_res_layers": p["num_res_layers"],
            "num_res_channels": list(channels),
            "downsample_parameters": [[2, 4, 1, 1]] * len(channels),
            "upsample_parameters": [[2, 4, 1, 1, 0]] * len(channels),
            "num_embeddings": p["num_embeddings"],
            "embedding_dim": p["embedding_dim"],
            "commitment_cost": 0.25,
            "decay": 0.99,
        }
    else:
        kwargs = {
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


def build_autoencoder(kwargs: Mapping[str, Any], kind: str = "kl") -> nn.Module:
    """``AutoencoderKL(**kwargs)`` or ``VQVAE(**kwargs)``; MONAI's own argument errors become
    a ConfigError."""
    from monai.networks.nets import VQVAE, AutoencoderKL

    _check_kind(kind)
    cls = VQVAE if kind == "vq" else AutoencoderKL
    try:
        return cls(**dict(kwargs))
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"cannot build the {kind} autoencoder from {dict(kwargs)}: {exc}") from None


def downsample_factor(kwargs: Mapping[str, Any]) -> int:
    """How many voxels per axis one latent voxel covers: ``2 ** (levels - 1)`` for KL kwargs,
    the product of the per-level strides for VQ kwargs."""
    if "downsample_parameters" in kwargs:
        return _stride_product(kwargs["downsample_parameters"], len(kwargs["channels"]))
    return 2 ** (len(kwargs["channels"]) - 1)


def latent_channels(kwargs: Mapping[str, Any]) -> int:
    """Channels of the latent: ``latent_channels`` (KL) or ``embedding_dim`` (VQ) of the kwargs."""
    return int(kwargs["embedding_dim"] if "embedding_dim" in kwargs else kwargs["latent_channels"])


def _stride_product(parameters: Any, levels: int) -> int:
    # MONAI accepts one (stride, kernel, dilation, padding) for all levels or one per level
    per_level = [parameters] * levels if all(isinstance(v, int) for v in parameters) else parameters
    return int(math.prod(int(p[0]) for p in per_level))


def network_kind(autoencoder: nn.Module) -> str:
    """``"vq"`` for a MONAI ``VQVAE``, ``"kl"`` otherwise (``AutoencoderKL``)."""
    from monai.networks.nets import VQVAE

    return "vq" if isinstance(autoencoder, VQVAE) else "kl"


def network_factor(autoencoder: nn.Module) -> int:
    """The down-sampling factor per axis of a built autoencoder (see :func:`downsample_factor`)."""
    if network_kind(autoencoder) == "vq":
        return _stride_product(autoencoder.encoder.downsample_parameters, len(autoencoder.channels))
    return 2 ** (len(autoencoder.encoder.channels) - 1)


def network_latent_channels(autoencoder: nn.Module) -> int:
    """Channels of a built autoencoder's latent."""
    if network_kind(autoencoder) == "vq":
        return int(autoencoder.embedding_dim)
    return int(autoencoder.latent_channels)


def to_latent(autoencoder: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The unscaled latent of ``image``: the posterior mean ``mu(x)`` of a KL autoencoder, the
    continuous encoder output ``z_e(x)`` (before quantisation) of a VQ one."""
    if network_kind(autoencoder) == "vq":
        return autoencoder.encode(image)
    return autoencoder.encode(image)[0]


def from_latent(autoencoder: nn.Module, latent: torch.Tensor) -> torch.Tensor:
    """The image of an unscaled latent: decoded (KL), or quantised to the nearest codebook
    vectors and then decoded (VQ; MONAI's ``decode_stage_2_outputs``)."""
    if network_kind(autoencoder) == "vq":
        return autoencoder.decode(autoencoder.quantize(latent)[0])
    return autoencoder.decode(latent)


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
    return (latent_channels(kwargs), *(s // f for s in image_shape))


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
    """The (scaled) latent of ``image`` (:func:`to_latent`), computed in overlapping tiles.

    Args:
        autoencoder: an ``AutoencoderKL`` or ``VQVAE`` (eval mode).
        image: ``(B, C, H, W[, D])``, every axis divisible by the down-sampling factor.
        tile: window in voxels (per axis or one int); ``None``: the whole volume at once.
        overlap: fraction of a window shared with its neighbour (Gaussian-weighted).
        scale_factor: multiplies the latent (see :func:`latent_scale_factor`).
        sw_batch_size: windows per forward pass.

    Returns:
        ``scale_factor * mu(image)`` (``z_e`` for VQ), ``(B, C_latent, H/f, W/f[, D/f])``.
    """
    roi = _tile(tile, image.shape[2:], network_factor(autoencoder))
    encode = functools.partial(to_latent, autoencoder)
    if roi == tuple(image.shape[2:]):
        with torch.no_grad():
            return encode(image) * scale_factor
    return _sliding(encode, image, roi, overlap, sw_batch_size) * scale_factor


def decode_tiled(
    autoencoder: nn.Module,
    latent: torch.Tensor,
    *,
    tile: int | Sequence[int] | None = None,
    overlap: float = 0.25,
    scale_factor: float = 1.0,
    sw_batch_size: int = 1,
) -> torch.Tensor:
    """Decode a (scaled) latent in overlapping latent tiles (:func:`from_latent`; a VQ latent
    is quantised voxel by voxel, so tiles quantise as the whole would).

    Args:
        autoencoder: an ``AutoencoderKL`` or ``VQVAE`` (eval mode).
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
    decode = functools.partial(from_latent, autoencoder)
    if roi == tuple(z.shape[2:]):
        with torch.no_grad():
            return decode(z)
    return _sliding(decode, z, roi, overlap, sw_batch_size)


def latent_scale_factor(latents: Iterable[torch.Tensor]) -> float:
    """``1 / std`` over all values of the given (unscaled) training latents.

    Args:
        latents: tensors of latents (means, or ``z_e`` for VQ), e.g. one ``(1, C, h, w, d)`` per training scan.

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
