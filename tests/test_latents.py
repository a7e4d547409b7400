"""Latent caching for latent diffusion (medidiff.training.latents)."""

from __future__ import annotations

import pytest
import torch

from medidiff.models.autoencoder import autoencoder_kwargs, build_autoencoder, encode_tiled
from medidiff.training.latents import LatentCache, cache_key, encode_volumes


@pytest.fixture(scope="module")
def tiny_ae():
    torch.manual_seed(0)
    return build_autoencoder(autoencoder_kwargs(3, "tiny")).eval()


def test_encode_volumes_scales_to_unit_std_and_round_trips(tiny_ae, tmp_path):
    g = torch.Generator().manual_seed(0)
    vols = [torch.rand(1, 16, 16, 8, generator=g) for _ in range(3)]
    cache = encode_volumes(tiny_ae, vols, ["a", "b", "c"])
    assert cache.latents.shape == (3, 3, 8, 8, 4)
    assert cache.latents.double().std().item() == pytest.approx(1.0, rel=1e-6)
    expected = encode_tiled(tiny_ae, vols[1][None]) * cache.scale_factor
    assert torch.allclose(cache[1]["image"], expected[0], atol=1e-6)
    path = cache.save(tmp_path / "latents.pt")
    again = LatentCache.load(path)
    assert again.names == ("a", "b", "c") and again.scale_factor == cache.scale_factor
    assert torch.equal(again.latents, cache.latents)


def test_given_scale_factor_is_kept(tiny_ae):
    vols = [torch.rand(1, 16, 16, 8)]
    cache = encode_volumes(tiny_ae, vols, ["a"], scale_factor=0.5)
    assert cache.scale_factor == 0.5
    assert torch.allclose(cache.latents, encode_tiled(tiny_ae, vols[0][None]) * 0.5, atol=1e-6)


def test_cache_key_depends_on_weights_scans_and_tiling():
    base = cache_key("ab" * 32, ["x", "y"], None)
    assert base == cache_key("ab" * 32, ["x", "y"], None)
    assert base != cache_key("cd" * 32, ["x", "y"], None)
    assert base != cache_key("ab" * 32, ["x", "z"], None)
    assert base != cache_key("ab" * 32, ["x", "y"], 64)
