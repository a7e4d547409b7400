"""A frozen diffusion U-Net steered by a MONAI ``ControlNet`` on label maps (one file).

ControlNet (Zhang, Rao & Agrawala 2023, https://arxiv.org/abs/2302.05543; used by MAISI for
CT label maps) keeps a trained base model frozen and trains a copy of its encoder that
reads the condition; the copy's outputs are added, through zero-initialised convolutions,
to the base U-Net's skip connections and middle block. At initialisation the sum is the
base model exactly, so one healthy base model serves many label sets.

:class:`ControlledUNet` is the pair as one module: ``forward(x_t, timesteps, condition)``
with the condition ``(B, L, *spatial)`` the one-hot label channels on the image grid
(:mod:`medidiff.data.labels`). Its state dict holds ``unet.*`` (the base) and
``controlnet.*``, so one ``model.safetensors`` stores both (network name
``controlled_diffusion``, kwargs ``{"unet": ..., "controlnet": ...}``), as a latent
model stores ``unet.*`` and ``autoencoder.*``.

Pixel-space models only: the condition embedding here has a single level (no striding),
so the condition lives on the network's own grid.

Example:
    >>> import torch
    >>> from medidiff.models.unet import build_model, model_kwargs
    >>> base = build_model(2, "tiny").eval()
    >>> net = build_controlled_network(controlled_model_kwargs(model_kwargs(2, "tiny"), 3))
    >>> net.unet.load_state_dict(base.state_dict()); net.init_controlnet_from_base()
    <All keys matched successfully>
    >>> x, t, c = torch.randn(1, 1, 16, 16), torch.tensor([9]), torch.rand(1, 3, 16, 16)
    >>> bool(torch.allclose(net.eval()(x, t, c), base(x, t), atol=1e-6))  # zero-initialised
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from medidiff.errors import ConfigError

__all__ = ["ControlledUNet", "build_controlled_network", "controlled_model_kwargs", "EMBEDDING_CHANNELS"]

#: channels of the condition embedding's single level (MONAI's default has four strided
#: levels, for a latent grid 8x smaller than the label map)
EMBEDDING_CHANNELS = 32

# DiffusionModelUNet arguments a ControlNet shares (it has no out_channels or dropout_cattn)
_SHARED = ("spatial_dims", "in_channels", "num_res_blocks", "channels", "attention_levels",
           "norm_num_groups", "norm_eps", "resblock_updown", "num_head_channels", "with_conditioning",
           "transformer_num_layers", "cross_attention_dim", "num_class_embeds", "upcast_attention",
           "include_fc", "use_combined_linear", "use_flash_attention")


def controlled_model_kwargs(unet_kwargs: Mapping[str, Any], num_labels: int) -> dict[str, Any]:
    """``{"unet": unet_kwargs, "controlnet": ...}`` for a base U-Net and ``num_labels`` label channels.

    Raises:
        ConfigError: no labels.
    """
    if num_labels < 1:
        raise ConfigError("a ControlNet needs at least one label channel")
    unet = dict(unet_kwargs)
    control = {k: unet[k] for k in _SHARED if k in unet}
    control["use_flash_attention"] = False
    control["conditioning_embedding_in_channels"] = int(num_labels)
    control["conditioning_embedding_num_channels"] = [EMBEDDING_CHANNELS]
    return {"unet": unet, "controlnet": control}


class ControlledUNet(nn.Module):
    """A base ``DiffusionModelUNet`` plus a ``ControlNet`` that reads label maps.

    Args:
        unet: the base model (frozen by the trainer).
        controlnet: the MONAI ``ControlNet`` of the same architecture.
    """

    def __init__(self, unet: nn.Module, controlnet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet

    def init_controlnet_from_base(self) -> None:
        """Copy the base's encoder weights into the ControlNet (its zero convolutions and
        condition embedding keep their initialisation), as Zhang et al. do."""
        own = self.controlnet.state_dict()
        shared = {k: v for k, v in self.unet.state_dict().items() if k in own and own[k].shape == v.shape}
        own.update(shared)
        self.controlnet.load_state_dict(own)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, conditioning_scale: float = 1.0) -> torch.Tensor:
        """eps_theta(x_t, t | condition): ``(B, C, *spatial)`` with the condition ``(B, L, *spatial)``."""
        if condition is None:
            raise ConfigError("a ControlNet model needs a condition (label-map channels)")
        down, mid = self.controlnet(x, timesteps, controlnet_cond=condition.to(x.dtype),
                                    conditioning_scale=conditioning_scale, class_labels=class_labels)
        return self.unet(x, timesteps, class_labels=class_labels,
                         down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid)


def build_controlled_network(kwargs: Mapping[str, Any]) -> ControlledUNet:
    """Rebuild a :class:`ControlledUNet` from ``{"unet": ..., "controlnet": ...}`` kwargs.

    Raises:
        ConfigError: missing parts or kwargs MONAI refuses.
    """
    from monai.networks.nets import ControlNet

    from medidiff.models.unet import build_model_from_kwargs

    if not isinstance(kwargs, Mapping) or not {"unet", "controlnet"} <= set(kwargs):
        raise ConfigError("controlled_diffusion kwargs need 'unet' and 'controlnet' parts")
    unet = build_model_from_kwargs(kwargs["unet"])
    try:
        controlnet = ControlNet(**dict(kwargs["controlnet"]))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"MONAI cannot build the stored ControlNet: {exc}") from None
    return ControlledUNet(unet, controlnet)
