"""Start a new U-Net from a trained one (``init.checkpoint``): fine-tuning, e.g. a healthy
model turned into a mask-conditioned one.

The architectures must agree except for the number of input channels: a ``concat`` model
has the label channels after the image channels. Their new columns of the first
convolution start at exactly zero, so before the first step the new network computes the
same function as the old one whatever the label channels hold, and training only has to
learn how to use them (the zero-initialised input of ControlNet, Zhang et al. 2023,
applied to the input layer).

Example:
    >>> import tempfile, pathlib, torch
    >>> from medidiff.models.checkpoint import save_inference
    >>> from medidiff.models.unet import build_model, model_kwargs
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "old.safetensors"
    >>> old = build_model(2, "tiny")
    >>> _ = save_inference(path, old, model_kwargs=model_kwargs(2, "tiny"), config={}, preprocessing={})
    >>> new = build_model(2, "tiny", in_channels=3)
    >>> load_init_weights(new, model_kwargs(2, "tiny", in_channels=3), path)
    2
    >>> x, t = torch.randn(1, 1, 16, 16), torch.tensor([5])
    >>> bool(torch.allclose(new(torch.cat([x, torch.rand(1, 2, 16, 16)], 1), t), old.eval()(x, t), atol=1e-5))
    True
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from medidiff.errors import CheckpointError

__all__ = ["load_init_weights"]

_FIRST_CONV = "conv_in.conv.weight"


def load_init_weights(model: nn.Module, kwargs: Mapping[str, Any], path: str | os.PathLike) -> int:
    """Copy a trained U-Net's weights into ``model``; extra input channels start at zero.

    Args:
        model: the new ``DiffusionModelUNet``.
        kwargs: its constructor kwargs (:func:`medidiff.models.unet.model_kwargs`).
        path: the trained model's ``model.safetensors`` (a pixel-space diffusion U-Net).

    Returns:
        The number of input channels that were added (0 when the inputs agree).

    Raises:
        CheckpointError: the file is not a diffusion U-Net, or its architecture differs in
            more than the input channels (named).
    """
    from medidiff.models.checkpoint import load_inference, load_state_dict_checked

    checkpoint = load_inference(path)
    if checkpoint.network != "diffusion_unet":
        raise CheckpointError(
            f"{path}: init.checkpoint must be a pixel-space diffusion U-Net; it holds a {checkpoint.network}"
        )
    theirs = dict(checkpoint.model_kwargs)
    ours = dict(kwargs)
    differ = sorted(
        k for k in set(ours) | set(theirs)
        if k not in ("in_channels", "use_flash_attention") and ours.get(k) != theirs.get(k)
    )
    if differ:
        key = differ[0]
        raise CheckpointError(
            f"{path}: init.checkpoint has another architecture ({key}: {theirs.get(key)!r}, the "
            f"config gives {ours.get(key)!r}); use the same model preset and overrides"
        )
    old_in, new_in = int(theirs["in_channels"]), int(ours["in_channels"])
    if new_in < old_in:
        raise CheckpointError(
            f"{path}: init.checkpoint takes {old_in} input channels, the new model only {new_in}"
        )
    state = dict(checkpoint.state_dict)
    if new_in > old_in:
        old = state[_FIRST_CONV]
        grown = torch.zeros((old.shape[0], new_in, *old.shape[2:]), dtype=old.dtype)
        grown[:, :old_in] = old
        state[_FIRST_CONV] = grown
    load_state_dict_checked(model, state, source=str(path))
    return new_in - old_in
