"""Training: the diffusion Trainer, the autoencoder stage of latent models, EMA, latents."""

from __future__ import annotations

from typing import Any

__all__ = ["build_trainer"]


def build_trainer(config: Any, run_dir: Any, **kwargs: Any) -> Any:
    """The trainer for ``config.stage``: :class:`~medidiff.training.trainer.Trainer` for a
    diffusion model, :class:`~medidiff.training.autoencoder.AutoencoderTrainer` for the
    autoencoder stage of a latent model,
    :class:`~medidiff.training.latent.LatentTrainer` for its diffusion U-Net on latents,
    :class:`~medidiff.training.controlnet.ControlNetTrainer` for a ControlNet on label maps;
    ``kwargs`` go to its constructor."""
    if config.stage == "autoencoder":
        from medidiff.training.autoencoder import AutoencoderTrainer, VQAutoencoderTrainer

        cls = VQAutoencoderTrainer if config.autoencoder.kind == "vq" else AutoencoderTrainer
        return cls(config, run_dir, **kwargs)
    if config.stage == "controlnet":
        from medidiff.training.controlnet import ControlNetTrainer

        return ControlNetTrainer(config, run_dir, **kwargs)
    if config.stage == "latent":
        from medidiff.training.latent import LatentTrainer

        return LatentTrainer(config, run_dir, **kwargs)
    from medidiff.training.trainer import Trainer

    return Trainer(config, run_dir, **kwargs)
