"""Autoencoder presets and tiled encoding/decoding (medidiff.models.autoencoder)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medidiff.errors import ConfigError
from medidiff.models.autoencoder import (
    autoencoder_kwargs,
    build_autoencoder,
    decode_tiled,
    downsample_factor,
    encode_tiled,
    latent_scale_factor,
    latent_shape,
    network_factor,
    network_kind,
    network_latent_channels,
)


@pytest.mark.parametrize("dims", [2, 3])
def test_tiny_preset_round_trip_shapes(dims):
    kwargs = autoencoder_kwargs(dims, "tiny")
    ae = build_autoencoder(kwargs).eval()
    shape = (16, 24, 8)[:dims]
    x = torch.rand(2, 1, *shape)
    z = encode_tiled(ae, x)
    assert tuple(z.shape) == (2, *latent_shape(kwargs, shape))
    assert tuple(decode_tiled(ae, z).shape) == tuple(x.shape)


def test_latent_shape_refuses_indivisible_grid():
    kwargs = autoencoder_kwargs(3, "small")
    assert downsample_factor(kwargs) == 4
    assert latent_shape(kwargs, (96, 112, 96)) == (4, 24, 28, 24)
    with pytest.raises(ConfigError, match="divisible by 4"):
        latent_shape(kwargs, (96, 110, 96))


def test_unknown_preset_and_bad_kwargs_are_config_errors():
    with pytest.raises(ConfigError, match="unknown autoencoder preset"):
        autoencoder_kwargs(3, "huge")
    with pytest.raises(ConfigError, match="cannot build"):
        build_autoencoder({**autoencoder_kwargs(3, "tiny"), "norm_num_groups": 5})


def test_vq_kwargs_are_json_and_the_latent_is_z_e_quantised_on_decode():
    import json

    kwargs = autoencoder_kwargs(3, "tiny", kind="vq")
    assert json.loads(json.dumps(kwargs)) == kwargs
    torch.manual_seed(0)
    ae = build_autoencoder(kwargs, "vq").eval()
    assert network_kind(ae) == "vq" and network_factor(ae) == downsample_factor(kwargs) == 4
    assert network_latent_channels(ae) == 3
    x = torch.rand(1, 1, 16, 24, 8)
    z = encode_tiled(ae, x)
    assert tuple(z.shape) == (1, *latent_shape(kwargs, (16, 24, 8))) == (1, 3, 4, 6, 2)
    with torch.no_grad():
        assert torch.equal(z, ae.encode(x))  # the continuous latent, before quantisation
        quantised = ae.quantize(z)[0]
        unquantised = ae.decode(z)
    decoded = decode_tiled(ae, z)
    assert decoded.shape == x.shape
    assert torch.allclose(decoded, decode_tiled(ae, quantised), atol=1e-6)  # decoding quantises
    assert not torch.allclose(decoded, unquantised, atol=1e-4)
    assert decode_tiled(ae, z, tile=2, overlap=0.5).shape == x.shape  # tiles decode too


def test_vq_small_preset_has_the_kl_small_latent_and_kinds_are_checked():
    grid = (96, 112, 96)
    vq = autoencoder_kwargs(3, "small", kind="vq")
    assert latent_shape(vq, grid) == latent_shape(autoencoder_kwargs(3, "small"), grid) == (4, 24, 28, 24)
    assert downsample_factor(autoencoder_kwargs(2, "tiny", kind="vq", channels=[8, 8, 16])) == 8
    with pytest.raises(ConfigError, match="unknown autoencoder kind 'vqgan'"):
        autoencoder_kwargs(3, "tiny", kind="vqgan")
    with pytest.raises(ConfigError, match="unknown autoencoder kind"):
        build_autoencoder(vq, "gan")
    with pytest.raises(ConfigError, match="cannot build the vq autoencoder"):
        build_autoencoder({**vq, "num_res_channels": [8]}, "vq")


class _LocalCodec(nn.Module):
    """A stand-in autoencoder whose every output voxel depends on one input voxel, so tiling
    with any windows must reproduce the whole-volume result exactly (up to float error)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.channels = (4, 4, 4)  # two down-samplings: factor 4

    def encode(self, x):
        mu = nn.functional.avg_pool3d(x, 4) * 2.0 + 1.0
        return mu, torch.ones_like(mu)

    def decode(self, z):
        return nn.functional.interpolate(z, scale_factor=4, mode="nearest") - 0.5


def test_tiles_blend_to_the_whole_volume_result():
    codec = _LocalCodec()
    x = torch.rand(1, 1, 40, 32, 24)
    whole = encode_tiled(codec, x)
    tiled = encode_tiled(codec, x, tile=16, overlap=0.5)
    assert torch.allclose(tiled, whole, atol=1e-5)
    z = torch.randn(1, 1, 10, 8, 6)
    assert torch.allclose(decode_tiled(codec, z, tile=4, overlap=0.5), decode_tiled(codec, z), atol=1e-5)


def test_scale_factor_is_applied_and_undone():
    codec = _LocalCodec()
    x = torch.rand(1, 1, 16, 16, 16)
    z = encode_tiled(codec, x, scale_factor=0.5)
    assert torch.allclose(z, encode_tiled(codec, x) * 0.5)
    assert torch.allclose(decode_tiled(codec, z, scale_factor=0.5), decode_tiled(codec, z * 2.0))


def test_latent_scale_factor_is_inverse_std():
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(1, 3, 8, 8, 8, generator=g) * 2.5 + 1.0 for _ in range(4)]
    expected = 1.0 / torch.cat([z.flatten() for z in latents]).double().std().item()
    assert latent_scale_factor(latents) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="variance"):
        latent_scale_factor([torch.zeros(1, 3, 4, 4, 4)])


def test_benchmark_ssim_is_one_for_identical_volumes_and_drops_with_noise():
    import importlib.util
    from pathlib import Path

    import numpy as np

    path = Path(__file__).resolve().parents[1] / "pipelines" / "benchmark_autoencoder.py"
    spec = importlib.util.spec_from_file_location("benchmark_autoencoder", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(0)
    x = rng.random((12, 12, 12))
    assert np.allclose(bench.local_ssim(x, x), 1.0)
    noisy = np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1)
    assert bench.local_ssim(x, noisy).mean() < 0.9
