"""``stage: controlnet``: train a ControlNet on label maps over a frozen base model.

The base (``base.checkpoint``: a pixel-space diffusion U-Net, e.g. the shipped
``brain_mri_2d``) is loaded and frozen; its architecture, forward process and model grid
are the run's (the config's ``model``, ``diffusion`` and ``data.preprocessing`` grid must
agree with it, or the run is refused naming the key). A MONAI ``ControlNet`` of the same
architecture, initialised from the base's encoder with zero output convolutions
(:mod:`medidiff.models.controlnet`), learns eps_theta(x_t, t | label map) with the same loss
and condition dropout as the ``concat`` models. Only the ControlNet's parameters are
optimised; the saved ``model.safetensors`` holds both networks (``unet.*`` and
``controlnet.*``), so it loads and samples alone.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from medidiff.errors import CheckpointError, ConfigError
from medidiff.training.trainer import Trainer, resolve_config_checkpoint

__all__ = ["ControlNetTrainer"]

_DIFFUSION_KEYS = ("num_train_timesteps", "schedule", "beta_start", "beta_end", "prediction_type", "noise")
_GRID_KEYS = ("spacing", "shape", "modality")


class ControlNetTrainer(Trainer):
    """Trains the ControlNet of ``stage: controlnet`` (see the module doc).

    Raises:
        CheckpointError: the base is missing, latent, or not a diffusion U-Net.
        ConfigError: the config's model, diffusion or grid differ from the base's.
    """

    network_name = "controlled_diffusion"

    def __init__(self, config: Any, run_dir: str | os.PathLike, *,
                 config_dir: str | os.PathLike | None = None, **kwargs: Any) -> None:
        from pathlib import Path

        from medidiff.models.loaded import load_model

        path = resolve_config_checkpoint(config.base.checkpoint, Path(config_dir) if config_dir else None)
        self.base = load_model(path, "cpu")
        if self.base.checkpoint.network != "diffusion_unet":
            raise CheckpointError(
                f"{path}: base.checkpoint must be a pixel-space diffusion U-Net; it holds a "
                f"{self.base.checkpoint.network}"
            )
        self._check_base(config, path)
        super().__init__(config, run_dir, config_dir=config_dir, **kwargs)

    def _check_base(self, config: Any, path: Any) -> None:
        base = self.base.config
        if int(config.model.spatial_dims) != self.base.spatial_dims:
            raise ConfigError(f"model.spatial_dims is {config.model.spatial_dims}; the base {path} is "
                              f"{self.base.spatial_dims}D")
        for key in _DIFFUSION_KEYS:
            ours, theirs = getattr(config.diffusion, key), getattr(base.diffusion, key)
            if ours != theirs:
                raise ConfigError(f"diffusion.{key} is {ours!r} but the base {path} was trained with {theirs!r}")
        stored = self.base.checkpoint.preprocessing
        for key in _GRID_KEYS:
            ours = (config.data.preprocessing or {}).get(key)
            if ours is not None and stored.get(key) is not None and list(_as_list(ours)) != list(_as_list(stored[key])):
                raise ConfigError(
                    f"data.preprocessing.{key} is {ours} but the base {path} works on {stored[key]}"
                )

    def _build_network(self) -> tuple[dict, nn.Module]:
        from medidiff.models.controlnet import build_controlled_network, controlled_model_kwargs

        kwargs = controlled_model_kwargs(self.base.unet_kwargs, len(self.config.conditioning.labels))
        network = build_controlled_network(kwargs)
        network.unet.load_state_dict(self.base.model.state_dict())
        network.init_controlnet_from_base()
        for p in network.unet.parameters():  # frozen base
            p.requires_grad_(False)
        return kwargs, network

    def _fresh_network(self) -> nn.Module:
        from medidiff.models.controlnet import build_controlled_network

        return build_controlled_network(self.model_kwargs)

    def _training_state(self) -> dict:
        state = super()._training_state()
        state["base_sha256"] = self.base.provenance.sha256
        return state

    def _restore_extra(self, state: dict) -> None:
        saved = state.get("base_sha256")
        if saved is not None and saved != self.base.provenance.sha256:
            raise CheckpointError(
                f"--resume: the base {self.base.provenance.path} is not the one this run started with"
            )

    def _inference_extra(self) -> dict:
        extra = super()._inference_extra()
        p = self.base.provenance
        extra["base"] = {"path": str(p.path), "sha256": p.sha256, "step": p.step}
        if extra.get("intensity_reference") is None:
            extra["intensity_reference"] = self.base.intensity_reference
        return extra

    def trainable_parameters(self) -> int:
        """Scalars the optimiser updates (the ControlNet's)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
