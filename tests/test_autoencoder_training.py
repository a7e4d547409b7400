"""Autoencoder-stage losses (medidiff.training.autoencoder)."""

from __future__ import annotations

import pytest
import torch

from medidiff.training.autoencoder import (
    AutoencoderLossWeights,
    build_discriminator,
    codebook_usage,
    discriminator_loss,
    generator_loss,
    kl_divergence,
    vq_generator_loss,
)


def test_kl_closed_form():
    mu = torch.zeros(2, 3, 4, 4)
    sigma = torch.ones(2, 3, 4, 4)
    assert kl_divergence(mu, sigma).item() == pytest.approx(0.0, abs=1e-7)
    # mu = 1, sigma = 1: 0.5 per latent value; 48 values per sample
    assert kl_divergence(mu + 1, sigma).item() == pytest.approx(0.5 * 48)
    # mu = 0, sigma = 2: 0.5 (4 - log 4 - 1) per value
    expected = 0.5 * (4 - torch.log(torch.tensor(4.0)).item() - 1) * 48
    assert kl_divergence(mu, sigma * 2).item() == pytest.approx(expected, rel=1e-6)


def test_generator_loss_terms_and_adversarial_gate():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 16, 16, generator=g)
    rec = x + 0.1
    mu, sigma = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    weights = AutoencoderLossWeights(kl=1e-3, adversarial=0.5, adv_start=10)
    disc = build_discriminator(2, channels=8, num_layers=2)
    before, terms = generator_loss(x, rec, mu + 1, sigma, weights, step=9, discriminator=disc)
    assert set(terms) == {"l1", "kl"}
    # the KL (0.5 per latent element, 48 elements) is weighed per input voxel (256)
    assert before.item() == pytest.approx(0.1 + 1e-3 * 0.5 * 48 / 256, rel=1e-5)
    after, terms = generator_loss(x, rec, mu + 1, sigma, weights, step=10, discriminator=disc)
    assert "adv_g" in terms
    assert after.item() == pytest.approx(before.item() + 0.5 * terms["adv_g"], rel=1e-5)


def test_discriminator_learns_real_from_fake():
    torch.manual_seed(0)
    disc = build_discriminator(2, channels=8, num_layers=2)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    real = torch.rand(4, 1, 16, 16)
    fake = torch.zeros(4, 1, 16, 16) + 0.5
    first = discriminator_loss(disc, real, fake).item()
    for _ in range(20):
        opt.zero_grad()
        discriminator_loss(disc, real, fake).backward()
        opt.step()
    assert discriminator_loss(disc, real, fake).item() < 0.5 * first


def test_vq_loss_adds_the_weighted_quantisation_term():
    x = torch.rand(2, 1, 8, 8)
    weights = AutoencoderLossWeights(quantization=2.0)
    loss, terms = vq_generator_loss(x, x + 0.25, torch.tensor(0.1), weights, step=0)
    assert set(terms) == {"l1", "quantization"}
    assert loss.item() == pytest.approx(0.25 + 2.0 * 0.1, rel=1e-5)


def test_codebook_usage_counts_codes_and_perplexity():
    from medidiff.models.autoencoder import autoencoder_kwargs, build_autoencoder

    ae = build_autoencoder(autoencoder_kwargs(2, "tiny", kind="vq"), "vq").eval()
    book = ae.quantizer.quantizer.embedding.weight.detach()  # (16, 3)
    # two codebook vectors, each at half of the 4 x 4 latent positions
    z = torch.stack([book[3]] * 8 + [book[5]] * 8, dim=1).reshape(1, 3, 4, 4)
    usage = codebook_usage(ae, [z])
    assert usage["num_embeddings"] == 16 and usage["codes_used"] == 2
    assert usage["fraction_used"] == pytest.approx(2 / 16)
    assert usage["perplexity"] == pytest.approx(2.0, rel=1e-6)
