"""Latent models: a frozen autoencoder in front of a diffusion U-Net, in one file.

A latent diffusion model (Rombach et al. 2022, https://arxiv.org/abs/2112.10752; the brain
LDM of Pinaya et al. 2022, https://arxiv.org/abs/2209.07162; MAISI for CT) runs its
diffusion process on ``z = scale_factor * mu(x)``, the scaled posterior mean of a
KL autoencoder (or the scaled pre-quantisation encoder output ``z_e(x)`` of a VQ one,
Rombach et al.'s "VQ-reg." models, decoded through the quantiser), and decodes samples back
to images. medidiff keeps both stages in one
``model.safetensors``: the network is a :class:`LatentDiffusionNetwork` holding the U-Net
(state-dict keys ``unet.*``) and the autoencoder (``autoencoder.*``); its stored kwargs are
``{"unet": ..., "autoencoder": ..., "autoencoder_kind": "kl" | "vq"}`` (files without the
kind hold KL autoencoders) and the ``extra`` record carries the scale factor, the
down-sampling factor, the latent shape and the autoencoder file it came from. ``synthesize``,
``anomaly`` and ``calibrate`` take it like any checkpoint.

:class:`LatentCodec` is what inference uses of the autoencoder: ``encode`` (image to scaled
latent) and ``decode`` (back), both in overlapping tiles when a tile size is set, so that a
1 mm whole-brain volume or a 512 x 512 x N CT passes within a fixed memory budget
(:func:`medidiff.models.autoencoder.encode_tiled`).

Example:
    >>> import torch
    >>> from medidiff.models.autoencoder import autoencoder_kwargs, build_autoencoder
    >>> from medidiff.models.unet import model_kwargs
    >>> kwargs = latent_model_kwargs(model_kwargs(3, "tiny", in_channels=3, out_channels=3),
    ...                              autoencoder_kwargs(3, "tiny"))
    >>> net = build_latent_network(kwargs)
    >>> codec = LatentCodec(net.autoencoder, scale_factor=1.0)
    >>> z = codec.encode(torch.rand(1, 1, 16, 16, 16))
    >>> tuple(z.shape), tuple(codec.decode(z).shape)
    ((1, 3, 8, 8, 8), (1, 1, 16, 16, 16))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medidiff.errors import ConfigError

__all__ = ["LatentCodec", "LatentDiffusionNetwork", "build_latent_network", "latent_model_kwargs"]


class LatentDiffusionNetwork(nn.Module):
    """The two networks of a latent model, as one module (one state dict, one file).

    Attributes:
        unet: the ``DiffusionModelUNet`` that denoises latents.
        autoencoder: the frozen ``AutoencoderKL`` or ``VQVAE``.
    """

    def __init__(self, unet: nn.Module, autoencoder: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.autoencoder = autoencoder

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The U-Net's forward (the autoencoder is used through :class:`LatentCodec`)."""
        return self.unet(*args, **kwargs)


def latent_model_kwargs(
    unet_kwargs: Mapping[str, Any], autoencoder_kwargs: Mapping[str, Any], kind: str = "kl"
) -> dict:
    """The stored kwargs of a latent model, checked for agreement of the two stages.

    Args:
        unet_kwargs: the ``DiffusionModelUNet`` kwargs.
        autoencoder_kwargs: the autoencoder's kwargs.
        kind: the autoencoder's kind, ``"kl"`` or ``"vq"``.

    Raises:
        ConfigError: the U-Net's channels differ from the latent channels, or the spatial
            dimensions differ, or the kind is unknown.
    """
    from medidiff.constants import AUTOENCODER_KINDS
    from medidiff.models.autoencoder import latent_channels

    if kind not in AUTOENCODER_KINDS:
        raise ConfigError(f"unknown autoencoder kind {kind!r}; choose one of {', '.join(AUTOENCODER_KINDS)}")
    latent = latent_channels(autoencoder_kwargs)
    if int(unet_kwargs["in_channels"]) != latent or int(unet_kwargs["out_channels"]) != latent:
        raise ConfigError(
            f"the latent U-Net must take and return {latent} channels (the autoencoder's latent "
            f"channels); it has {unet_kwargs['in_channels']} in, {unet_kwargs['out_channels']} out"
        )
    if int(unet_kwargs["spatial_dims"]) != int(autoencoder_kwargs["spatial_dims"]):
        raise ConfigError(
            f"the U-Net is {unet_kwargs['spatial_dims']}D but the autoencoder "
            f"{autoencoder_kwargs['spatial_dims']}D; model.spatial_dims must match the autoencoder's"
        )
    return {"unet": dict(unet_kwargs), "autoencoder": dict(autoencoder_kwargs), "autoencoder_kind": kind}


def build_latent_network(kwargs: Mapping[str, Any]) -> LatentDiffusionNetwork:
    """Build a :class:`LatentDiffusionNetwork` from :func:`latent_model_kwargs`.

    Raises:
        ConfigError: the kwargs lack either stage.
    """
    from medidiff.models.autoencoder import build_autoencoder
    from medidiff.models.unet import build_model_from_kwargs

    if not isinstance(kwargs, Mapping) or not {"unet", "autoencoder"} <= set(kwargs):
        raise ConfigError("a latent model's kwargs need 'unet' and 'autoencoder' entries")
    return LatentDiffusionNetwork(
        build_model_from_kwargs(kwargs["unet"]),
        build_autoencoder(kwargs["autoencoder"], kwargs.get("autoencoder_kind", "kl")),
    )


class LatentCodec:
    """Image <-> scaled latent with a frozen autoencoder, optionally in tiles.

    Args:
        autoencoder: an ``AutoencoderKL`` or ``VQVAE`` (put in eval mode here).
        scale_factor: multiplies the latent (the posterior mean, or ``z_e`` before
            quantisation; see :func:`medidiff.models.autoencoder.to_latent`): 1 / std of
            the training latents.
        tile: encoder window in image voxels (one int or one per axis); ``None`` encodes
            and decodes whole inputs. The decoder's window is ``tile / f`` latent voxels.
        overlap: fraction of a window shared with its neighbour (Gaussian blending).

    Attributes:
        kind: ``"kl"`` or ``"vq"``.
        factor: the down-sampling factor per axis.
        latent_channels: channels of the latent.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        scale_factor: float,
        *,
        tile: int | Sequence[int] | None = None,
        overlap: float = 0.25,
    ) -> None:
        from medidiff.models.autoencoder import (
            network_factor,
            network_kind,
            network_latent_channels,
        )

        self.autoencoder = autoencoder.eval()
        self.scale_factor = float(scale_factor)
        self.tile = tile
        self.overlap = float(overlap)
        self.kind = network_kind(autoencoder)
        self.factor = network_factor(autoencoder)
        self.latent_channels = network_latent_channels(autoencoder)

    def with_tile(self, tile: int | Sequence[int] | None, overlap: float | None = None) -> LatentCodec:
        """A codec on the same network with another tiling."""
        return LatentCodec(
            self.autoencoder, self.scale_factor, tile=tile,
            overlap=self.overlap if overlap is None else overlap,
        )

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """``(C, *spatial / f)`` of an image's latent.

        Raises:
            ConfigError: an axis not divisible by the down-sampling factor.
        """
        bad = [s for s in image_shape if int(s) % self.factor]
        if bad:
            raise ConfigError(
                f"image shape {tuple(image_shape)} must be divisible by {self.factor} on every "
                "axis for this autoencoder (preprocessing.shape)"
            )
        return (self.latent_channels, *(int(s) // self.factor for s in image_shape))

    def _decoder_tile(self) -> int | tuple[int, ...] | None:
        if self.tile is None:
            return None
        if isinstance(self.tile, int):
            return max(1, self.tile // self.factor)
        return tuple(max(1, int(t) // self.factor) for t in self.tile)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """``scale_factor * mu(image)`` (``z_e`` for VQ): ``(B, 1, *spatial)`` -> ``(B, C, *spatial / f)``."""
        from medidiff.models.autoencoder import encode_tiled

        self.latent_shape(image.shape[2:])
        x = image.to(self.device, torch.float32)
        return encode_tiled(
            self.autoencoder, x, tile=self.tile, overlap=self.overlap, scale_factor=self.scale_factor
        )

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """The image of a scaled latent (quantised first for VQ): ``(B, C, *s)`` -> ``(B, 1, *s * f)``."""
        from medidiff.models.autoencoder import decode_tiled

        z = latent.to(self.device, torch.float32)
        return decode_tiled(
            self.autoencoder, z, tile=self._decoder_tile(), overlap=self.overlap,
            scale_factor=self.scale_factor,
        )

    def describe(self) -> dict[str, Any]:
        """JSON record (settings files, ``info``)."""
        tile = list(self.tile) if isinstance(self.tile, (list, tuple)) else self.tile
        return {"kind": self.kind, "scale_factor": self.scale_factor, "factor": self.factor,
                "latent_channels": self.latent_channels, "tile": tile, "overlap": self.overlap}
