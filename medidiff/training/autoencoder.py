"""Losses of the autoencoder stage of latent diffusion (KL or VQ autoencoder, patch-adversarial).

The first stage of a latent diffusion model (Rombach et al. 2022,
https://arxiv.org/abs/2112.10752; in 3D medical imaging Pinaya et al. 2022,
https://arxiv.org/abs/2209.07162) is trained with

    L_G = w_rec mean|x - D(z)| + (w_kl / N_x) KL(q(z|x) || N(0, I)) + w_adv L_adv(Disc(D(z)))
    L_D = 1/2 [L_adv(Disc(x), real) + L_adv(Disc(D(z).detach()), fake)]

with z = mu + sigma * eps drawn from the encoder's posterior q(z|x) = N(mu, sigma^2) and N_x
the voxels of one input. ``w_kl`` has the meaning of Rombach et al.'s 1e-6: there the KL
(summed over latent elements) is weighed against the reconstruction error *summed* over
pixels; the reconstruction term here is a mean, so the KL is divided by N_x to keep that
ratio. MONAI's latent-diffusion tutorials weigh the summed KL against the mean L1 with
1e-6, which on a 48^3 patch (110,592 voxels) makes the KL 1e5 times stronger than in
Rombach et al.: measured in medidiff, after 1,500 steps the posterior sigma was 0.64
against a latent-mean std of 0.85, a latent too noisy to carry detail, and reconstructions
were blurred (SSIM 0.66). The KL is kept tiny so that it only keeps the latent's scale
bounded; the latent is rescaled to unit variance afterwards
(:func:`medidiff.models.autoencoder.latent_scale_factor`). The adversarial term (least
squares, MONAI's :class:`~monai.losses.PatchAdversarialLoss` against a
:class:`~monai.networks.nets.PatchDiscriminator`) sharpens textures and is switched on
only after ``adv_start`` steps of plain reconstruction training.

A vector-quantised autoencoder (``autoencoder.kind: vq``, MONAI ``VQVAE``;
:class:`VQAutoencoderTrainer`) replaces the KL term by the quantiser's loss (van den Oord
et al. 2017, https://arxiv.org/abs/1711.00937):

    L_G = w_rec mean|x - D(q(z_e))| + w_q beta mean||z_e - sg[q(z_e)]||^2 + w_adv L_adv(...)

with ``beta`` the commitment cost stored in the network (0.25) and ``sg`` the stop-gradient;
the codebook itself is not trained by gradients but follows the encoder outputs assigned to
it by exponential moving averages (MONAI's ``EMAQuantizer``), and the decoder's gradient
reaches the encoder through the straight-through estimator. How much of the codebook the
trained encoder uses is recorded with the inference weights (``extra["codebook"]``: codes
used and the perplexity ``exp(entropy)`` of their frequencies over the training items).

The tutorials also add a perceptual loss (LPIPS or MedicalNet/RadImageNet features); its
networks' weights must be downloaded, which medidiff does not do at run time, so it is
not offered. L1 + KL (+ adversarial) needs no downloaded weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medidiff.errors import ConfigError
from medidiff.training.trainer import Trainer

__all__ = [
    "AutoencoderTrainer",
    "VQAutoencoderTrainer",
    "AutoencoderLossWeights",
    "kl_divergence",
    "generator_loss",
    "vq_generator_loss",
    "discriminator_loss",
    "build_discriminator",
    "codebook_usage",
]


@dataclass(frozen=True)
class AutoencoderLossWeights:
    """Weights of the autoencoder loss terms.

    Attributes:
        reconstruction: weight of the L1 reconstruction term.
        kl: weight of the KL term (per-sample sum over latent voxels, batch mean),
            relative to the reconstruction error summed over an input's voxels
            (Rombach et al.'s convention; see the module docstring).
        adversarial: weight of the generator's adversarial term (0 disables the
            discriminator altogether).
        adv_start: step from which the adversarial terms are used.
        quantization: weight of a VQ autoencoder's quantisation (commitment) loss.
    """

    reconstruction: float = 1.0
    kl: float = 1e-6
    adversarial: float = 0.0
    adv_start: int = 0
    quantization: float = 1.0

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


def _least_squares() -> nn.Module:
    from monai.losses import PatchAdversarialLoss

    return PatchAdversarialLoss(criterion="least_squares")


def _adversarial(logits: list[torch.Tensor] | torch.Tensor, target_is_real: bool) -> torch.Tensor:
    # MONAI's PatchDiscriminator returns every layer's output; the last is the patch map
    last = logits[-1] if isinstance(logits, (list, tuple)) else logits
    return _least_squares()(last.float(), target_is_real=target_is_real, for_discriminator=False)


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
    voxels = image[0].numel()  # the KL per input voxel, see the module docstring
    total = weights.reconstruction * rec + weights.kl * kl / voxels
    terms = {"l1": float(rec.detach()), "kl": float(kl.detach())}
    return _with_adversarial(total, terms, reconstruction, weights, step, discriminator)


def vq_generator_loss(
    image: torch.Tensor,
    reconstruction: torch.Tensor,
    quantization_loss: torch.Tensor,
    weights: AutoencoderLossWeights,
    step: int,
    discriminator: nn.Module | None = None,
) -> tuple[torch.Tensor, Mapping[str, float]]:
    """A VQ autoencoder's loss: L1 reconstruction + the quantiser's commitment loss (as MONAI's
    ``VQVAE`` returns it, commitment cost included) + the optional adversarial term.

    Args:
        image: ``(B, C, *spatial)`` input.
        reconstruction: the decoder's output for it.
        quantization_loss: the scalar second output of ``VQVAE.forward``.
        weights: the term weights (``quantization`` weighs the commitment loss).
        step: the optimisation step (gates the adversarial term).
        discriminator: needed when the adversarial term is on.
    """
    rec = F.l1_loss(reconstruction.float(), image.float())
    q = quantization_loss.float().mean()
    total = weights.reconstruction * rec + weights.quantization * q
    terms = {"l1": float(rec.detach()), "quantization": float(q.detach())}
    return _with_adversarial(total, terms, reconstruction, weights, step, discriminator)


def _with_adversarial(
    total: torch.Tensor,
    terms: dict[str, float],
    reconstruction: torch.Tensor,
    weights: AutoencoderLossWeights,
    step: int,
    discriminator: nn.Module | None,
) -> tuple[torch.Tensor, Mapping[str, float]]:
    if discriminator is not None and weights.adversarial_on(step):
        adv = _adversarial(discriminator(reconstruction.contiguous().float()), target_is_real=True)
        total = total + weights.adversarial * adv
        terms["adv_g"] = float(adv.detach())
    return total, terms


def codebook_usage(network: nn.Module, latents: list[torch.Tensor]) -> dict[str, float | int]:
    """How much of a VQ autoencoder's codebook its latents use.

    Args:
        network: a MONAI ``VQVAE`` in eval mode (the quantiser's EMA updates only in training).
        latents: pre-quantisation encoder outputs ``z_e``, each ``(B, C, *spatial)``.

    Returns:
        ``num_embeddings``; ``codes_used`` (codes chosen at least once) and their
        ``fraction_used``; ``perplexity``, ``exp`` of the entropy of the code frequencies
        (``num_embeddings`` for a uniformly used codebook, 1 for a collapsed one).
    """
    n = int(network.num_embeddings)
    counts = torch.zeros(n, dtype=torch.float64)
    with torch.no_grad():
        for z in latents:
            indices = network.quantizer.quantize(z.to(next(network.parameters()).device))
            counts += torch.bincount(indices.flatten().cpu(), minlength=n).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    used = int((counts > 0).sum())
    return {"num_embeddings": n, "codes_used": used, "fraction_used": used / n,
            "perplexity": float(entropy.exp())}


def discriminator_loss(
    discriminator: nn.Module, image: torch.Tensor, reconstruction: torch.Tensor
) -> torch.Tensor:
    """``L_D``: real scans towards 1, reconstructions (detached) towards 0, averaged."""
    loss = _least_squares()
    fake = discriminator(reconstruction.detach().contiguous().float())[-1]
    real = discriminator(image.contiguous().float())[-1]
    return 0.5 * (
        loss(fake.float(), target_is_real=False, for_discriminator=True)
        + loss(real.float(), target_is_real=True, for_discriminator=True)
    )


# ----------------------------------------------------------------------------- the trainer


class AutoencoderTrainer(Trainer):
    """Trains the autoencoder stage of a latent model (``stage: autoencoder`` in the config).

    The loop, resume, EMA, AMP, DDP, logging and checkpoints are the diffusion
    :class:`~medidiff.training.trainer.Trainer`'s; what differs is the network (MONAI
    ``AutoencoderKL`` from the ``autoencoder`` section), the loss (:func:`generator_loss`,
    plus a discriminator step when the adversarial term is on), the previews (inputs above
    their reconstructions) and the inference file, which is stored as an ``autoencoder_kl``
    network with its latent ``scale_factor`` (1 / std of the EMA encoder's latent means over
    ``autoencoder.scale_batches`` training items). 3D volumes train on random patches
    (``data.patch_size``), so memory does not grow with the volume; the decoder and encoder
    are fully convolutional and apply to whole volumes (or tiles) afterwards.

    Example:
        >>> import tempfile, torch
        >>> from medidiff.config import Config
        >>> cfg = Config.from_dict({"stage": "autoencoder", "model": {"spatial_dims": 2},
        ...     "autoencoder": {"preset": "tiny", "scale_batches": 2},
        ...     "train": {"max_steps": 2, "batch_size": 2, "checkpoint_every": 0,
        ...               "preview_every": 0, "log_every": 1}})
        >>> data = [torch.rand(1, 16, 16) for _ in range(4)]
        >>> AutoencoderTrainer(cfg, tempfile.mkdtemp(), dataset=data, progress=False).fit().steps
        2
    """

    network_name = "autoencoder_kl"
    #: the ``autoencoder.kind`` this class trains
    kind = "kl"

    def _build_network(self) -> tuple[dict, nn.Module]:
        from medidiff.models.autoencoder import autoencoder_kwargs, build_autoencoder

        a = self.config.autoencoder
        if a.kind != self.kind:
            raise ConfigError(
                f"autoencoder.kind is {a.kind!r} but {type(self).__name__} trains {self.kind!r} "
                "autoencoders; use medidiff.training.build_trainer"
            )
        overrides = {
            name: getattr(a, key) for key, name in self._overrides.items() if getattr(a, key) is not None
        }
        kwargs = autoencoder_kwargs(self.config.model.spatial_dims, a.preset, kind=self.kind, **overrides)
        return kwargs, build_autoencoder(kwargs, self.kind)

    #: config keys of the ``autoencoder`` section -> the network argument they override
    _overrides: ClassVar[dict[str, str]] = {k: k for k in ("channels", "latent_channels", "num_res_blocks", "norm_num_groups")}

    def _build_process(self) -> None:
        a = self.config.autoencoder
        self.loss_weights = AutoencoderLossWeights(
            kl=a.kl_weight, adversarial=a.adversarial_weight, adv_start=a.adversarial_start,
            quantization=a.quantization_weight,
        )
        self.discriminator = None
        self.disc_optimizer = None
        if a.adversarial_weight > 0:
            self.discriminator = build_discriminator(
                self.config.model.spatial_dims, channels=a.discriminator_channels,
                num_layers=a.discriminator_layers,
            ).to(self.device)
            self.disc_optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=a.discriminator_lr)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def _loss(self, batch: dict, step: int) -> torch.Tensor:
        x = batch["image"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            reconstruction, z_mu, z_sigma = self.ddp_model(x)
        loss, _terms = generator_loss(
            x, reconstruction, z_mu, z_sigma, self.loss_weights, step, self.discriminator
        )
        self._pending = (x, reconstruction.detach()) if self.discriminator is not None else None
        return loss

    def _optim_step(self, loss: torch.Tensor) -> float:
        grad_norm = super()._optim_step(loss)
        if self._pending is not None and self.loss_weights.adversarial_on(self.step):
            x, reconstruction = self._pending
            self.disc_optimizer.zero_grad(set_to_none=True)
            discriminator_loss(self.discriminator, x, reconstruction).backward()
            self.disc_optimizer.step()
        self._pending = None
        return grad_norm

    def _training_state(self) -> dict:
        state = super()._training_state()
        if self.discriminator is not None:
            state["discriminator"] = self.discriminator.state_dict()
            state["disc_optimizer"] = self.disc_optimizer.state_dict()
        return state

    def _restore_extra(self, state: dict) -> None:
        if self.discriminator is not None and "discriminator" in state:
            self.discriminator.load_state_dict(state["discriminator"])
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])

    def _inference_network(self) -> nn.Module:
        from medidiff.models.autoencoder import build_autoencoder

        network = build_autoencoder(self.model_kwargs, self.kind).to(self.device).eval()
        network.load_state_dict(self.inference_state_dict())
        return network

    def _inference_extra(self) -> dict:
        extra, _network, _latents = self._scale_record()
        return extra

    def _scale_record(self) -> tuple[dict, nn.Module, list[torch.Tensor]]:
        """The inference extra with the latent scale factor, the EMA network and the latents
        of ``autoencoder.scale_batches`` training items it was measured on."""
        from medidiff.models.autoencoder import downsample_factor, encode_tiled, latent_scale_factor

        extra = super()._inference_extra()
        network = self._inference_network()
        n = min(len(self.dataset), self.config.autoencoder.scale_batches)
        latents = [encode_tiled(network, self._item(i)[None].to(self.device)) for i in range(n)]
        extra["scale_factor"] = latent_scale_factor(latents)
        extra["downsample_factor"] = downsample_factor(self.model_kwargs)
        return extra, network, latents

    @staticmethod
    def _reconstruct(network: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return network.reconstruct(images)

    def _item(self, index: int) -> torch.Tensor:
        item = self.dataset[index]
        return torch.as_tensor(item["image"] if isinstance(item, dict) else item, dtype=torch.float32)

    def preview(self):
        """A PNG of a few training items (top row) above their reconstructions (bottom)."""
        c = self.config.train
        if not self.info.is_main or c.preview_samples == 0:
            return None
        from medidiff.io.images import save_image_grid

        network = self._inference_network()
        n = min(len(self.dataset), c.preview_samples)
        inputs = torch.stack([self._item(i) for i in range(n)]).to(self.device)
        with torch.no_grad():
            outputs = self._reconstruct(network, inputs)
        grid = torch.cat([inputs, outputs.clamp(0, 1)]).float().cpu().numpy()
        path = self.run_dir / "previews" / f"step_{self.step:07d}.png"
        save_image_grid(grid, path, columns=n, title=f"step {self.step}: inputs / reconstructions")
        return path


class VQAutoencoderTrainer(AutoencoderTrainer):
    """Trains a vector-quantised autoencoder (``autoencoder.kind: vq``, MONAI ``VQVAE``).

    Everything but the network and its loss is :class:`AutoencoderTrainer`'s (patches,
    optional patch-adversarial term, previews, EMA, resume). The loss is
    :func:`vq_generator_loss`; the inference file is an ``autoencoder_vq`` network whose
    ``scale_factor`` is 1 / std of the pre-quantisation latents ``z_e`` and whose
    ``extra["codebook"]`` is :func:`codebook_usage` over the same items. The EMA of the
    weights averages the codebook with the encoder and decoder.

    Example:
        >>> import tempfile, torch
        >>> from medidiff.config import Config
        >>> cfg = Config.from_dict({"stage": "autoencoder", "model": {"spatial_dims": 2},
        ...     "autoencoder": {"kind": "vq", "preset": "tiny", "scale_batches": 2},
        ...     "train": {"max_steps": 2, "batch_size": 2, "checkpoint_every": 0,
        ...               "preview_every": 0, "log_every": 1}})
        >>> data = [torch.rand(1, 16, 16) for _ in range(4)]
        >>> VQAutoencoderTrainer(cfg, tempfile.mkdtemp(), dataset=data, progress=False).fit().steps
        2
    """

    network_name = "autoencoder_vq"
    kind = "vq"

    _overrides: ClassVar[dict[str, str]] = {"channels": "channels", "latent_channels": "embedding_dim",
                                             "num_res_blocks": "num_res_layers",
                                             "num_embeddings": "num_embeddings"}

    def _loss(self, batch: dict, step: int) -> torch.Tensor:
        x = batch["image"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            reconstruction, quantization_loss = self.ddp_model(x)
        loss, _terms = vq_generator_loss(
            x, reconstruction, quantization_loss, self.loss_weights, step, self.discriminator
        )
        self._pending = (x, reconstruction.detach()) if self.discriminator is not None else None
        return loss

    def _inference_extra(self) -> dict:
        extra, network, latents = self._scale_record()
        extra["codebook"] = codebook_usage(network, latents)
        return extra

    @staticmethod
    def _reconstruct(network: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return network(images)[0]
