"""Losses of the autoencoder stage of latent diffusion (KL autoencoder, patch-adversarial).

The first stage of a latent diffusion model (Rombach et al. 2022,
https://arxiv.org/abs/2112.10752; in 3D medical imaging Pinaya et al. 2022,
https://arxiv.org/abs/2209.07162) is trained with

    L_G = w_rec |x - D(z)|_1 + w_kl KL(q(z|x) || N(0, I)) + w_adv L_adv(Disc(D(z)))
    L_D = 1/2 [L_adv(Disc(x), real) + L_adv(Disc(D(z).detach()), fake)]

with z = mu + sigma * eps drawn from the encoder's posterior q(z|x) = N(mu, sigma^2). The
KL term is kept tiny (1e-6 in MONAI's latent-diffusion tutorials) so that it only keeps
the latent's scale bounded; the latent is rescaled to unit variance afterwards
(:func:`medidiff.models.autoencoder.latent_scale_factor`). The adversarial term (least
squares, MONAI's :class:`~monai.losses.PatchAdversarialLoss` against a
:class:`~monai.networks.nets.PatchDiscriminator`) sharpens textures and is switched on
only after ``adv_start`` steps of plain reconstruction training.

The tutorials also add a perceptual loss (LPIPS or MedicalNet/RadImageNet features); its
networks' weights must be downloaded, which medidiff does not do at run time, so it is
not offered. L1 + KL (+ adversarial) needs no downloaded weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AutoencoderLossWeights", "kl_divergence", "generator_loss", "discriminator_loss", "build_discriminator"]


@dataclass(frozen=True)
class AutoencoderLossWeights:
    """Weights of the autoencoder loss terms.

    Attributes:
        reconstruction: weight of the L1 reconstruction term.
        kl: weight of the KL term (per-sample sum over latent voxels, batch mean).
        adversarial: weight of the generator's adversarial term (0 disables the
            discriminator altogether).
        adv_start: step from which the adversarial terms are used.
    """

    reconstruction: float = 1.0
    kl: float = 1e-6
    adversarial: float = 0.0
    adv_start: int = 0

    def adversarial_on(self, step: int) -> bool:
        return self.adversarial > 0 and step >= self.adv_start


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)), summed over latent channels and voxels, batch mean.

    ``0.5 * sum(mu^2 + sigma^2 - log(sigma^2) - 1)`` per sample.

    Args:
        z_mu, z_sigma: ``(B, C, h, w[, d])`` posterior mean and standard deviation.
    """
    var = z_sigma.float().pow(2)
    kl = 0.5 * (z_mu.float().pow(2) + var - torch.log(var.clamp_min(1e-12)) - 1.0)
    return kl.flatten(1).sum(1).mean()


def build_discriminator(spatial_dims: int, channels: int = 16, num_layers: int = 3) -> nn.Module:
    """A MONAI ``PatchDiscriminator`` (PatchGAN, instance norm) for one-channel images."""
    from monai.networks.nets import PatchDiscriminator

    return PatchDiscriminator(
        spatial_dims=spatial_dims, num_layers_d=num_layers, channels=channels, in_channels=1,
        out_channels=1, norm="INSTANCE",
    )


def _adversarial(logits: list[torch.Tensor] | torch.Tensor, target_is_real: bool) -> torch.Tensor:
    from monai.losses import PatchAdversarialLoss

    loss = PatchAdversarialLoss(criterion="least_squares")
    # MONAI's PatchDiscriminator returns every layer's output; the last is the patch map
    last = logits[-1] if isinstance(logits, (list, tuple)) else logits
    return loss(last.float(), target_is_real=target_is_real, for_discriminator=False)


def generator_loss(
    image: torch.Tensor,
    reconstruction: torch.Tensor,
    z_mu: torch.Tensor,
    z_sigma: torch.Tensor,
    weights: AutoencoderLossWeights,
    step: int,
    discriminator: nn.Module | None = None,
) -> tuple[torch.Tensor, Mapping[str, float]]:
    """The autoencoder's loss ``L_G`` and its terms (for logging).

    Args:
        image: ``(B, C, *spatial)`` input.
        reconstruction: the decoder's output for it.
        z_mu, z_sigma: the posterior the latent was drawn from.
        weights: the term weights.
        step: the optimisation step (gates the adversarial term).
        discriminator: needed when the adversarial term is on.
    """
    rec = F.l1_loss(reconstruction.float(), image.float())
    kl = kl_divergence(z_mu, z_sigma)
    total = weights.reconstruction * rec + weights.kl * kl
    terms = {"l1": float(rec.detach()), "kl": float(kl.detach())}
    if discriminator is not None and weights.adversarial_on(step):
        adv = _adversarial(discriminator(reconstruction.contiguous().float()), target_is_real=True)
        total = total + weights.adversarial * adv
        terms["adv_g"] = float(adv.detach())
    return total, terms


def discriminator_loss(
    discriminator: nn.Module, image: torch.Tensor, reconstruction: torch.Tensor
) -> torch.Tensor:
    """``L_D``: real scans towards 1, reconstructions (detached) towards 0, averaged."""
    from monai.losses import PatchAdversarialLoss

    loss = PatchAdversarialLoss(criterion="least_squares")
    fake = discriminator(reconstruction.detach().contiguous().float())[-1]
    real = discriminator(image.contiguous().float())[-1]
    return 0.5 * (
        loss(fake.float(), target_is_real=False, for_discriminator=True)
        + loss(real.float(), target_is_real=True, for_discriminator=True)
    )
