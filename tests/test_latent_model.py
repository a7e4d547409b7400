"""Latent models through the Python API: the codec, a 2D latent model end to end, resume checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medidiff.config import Config
from medidiff.errors import CheckpointError, ConfigError
from medidiff.models.autoencoder import autoencoder_kwargs, build_autoencoder
from medidiff.models.latent import LatentCodec, build_latent_network, latent_model_kwargs
from medidiff.models.unet import model_kwargs

COMMON = {
    "model": {"spatial_dims": 2, "preset": "tiny"},
    "autoencoder": {"preset": "tiny", "scale_batches": 2},
    "data": {"preprocessing": {"shape": [16, 16, 4], "spacing": [3.0, 3.0, 3.0]}},
    "diffusion": {"prediction_type": "flow"},
    "train": {"max_steps": 2, "batch_size": 2, "checkpoint_every": 1, "preview_every": 0, "log_every": 1},
}


def _data(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 16, 16, generator=g) for _ in range(n)]


def _autoencoder(tmp_path, name: str = "ae", steps: int = 2):
    from medidiff.training.autoencoder import AutoencoderTrainer

    cfg = Config.from_dict({**COMMON, "stage": "autoencoder",
                            "train": {**COMMON["train"], "max_steps": steps}})
    return AutoencoderTrainer(cfg, tmp_path / name, dataset=_data(), progress=False).fit().model_path


def _latent_config(ae_path, **train) -> Config:
    return Config.from_dict({**COMMON, "stage": "latent",
                             "autoencoder": {"preset": "tiny", "checkpoint": str(ae_path)},
                             "train": {**COMMON["train"], **train}})


def test_codec_round_trip_shapes_and_tiling():
    torch.manual_seed(0)
    ae = build_autoencoder(autoencoder_kwargs(3, "tiny"))
    codec = LatentCodec(ae, scale_factor=2.0)
    x = torch.rand(1, 1, 16, 24, 16)
    z = codec.encode(x)
    assert z.shape == (1, 3, 8, 12, 8) and codec.latent_shape((16, 24, 16)) == (3, 8, 12, 8)
    with torch.no_grad():
        mu = ae.encode(x)[0]
    assert torch.allclose(z, 2.0 * mu, atol=1e-6)  # scaled posterior mean
    tiled = codec.with_tile(8, overlap=0.5)
    zt, xt = tiled.encode(x), tiled.decode(z)
    assert zt.shape == z.shape and xt.shape == x.shape and torch.isfinite(xt).all()
    with pytest.raises(ConfigError, match="divisible by 2"):
        codec.encode(torch.rand(1, 1, 15, 16, 16))


def test_latent_kwargs_must_agree():
    ae = autoencoder_kwargs(3, "tiny")
    with pytest.raises(ConfigError, match="3 channels"):
        latent_model_kwargs(model_kwargs(3, "tiny"), ae)
    with pytest.raises(ConfigError, match="spatial_dims must match"):
        latent_model_kwargs(model_kwargs(2, "tiny", in_channels=3, out_channels=3), ae)
    with pytest.raises(ConfigError, match="'unet' and 'autoencoder'"):
        build_latent_network({"unet": {}})
    unet = model_kwargs(3, "tiny", in_channels=3, out_channels=3)
    with pytest.raises(ConfigError, match="unknown autoencoder kind"):
        latent_model_kwargs(unet, ae, kind="vqgan")
    vq = autoencoder_kwargs(3, "tiny", kind="vq")
    kwargs = latent_model_kwargs(unet, vq, kind="vq")
    assert kwargs["autoencoder_kind"] == "vq"
    codec = LatentCodec(build_latent_network(kwargs).autoencoder, scale_factor=1.0)
    assert codec.kind == "vq" and codec.factor == 4 and codec.latent_channels == 3
    # files written before the kind was stored hold KL autoencoders
    old = {k: v for k, v in latent_model_kwargs(unet, ae).items() if k != "autoencoder_kind"}
    assert LatentCodec(build_latent_network(old).autoencoder, scale_factor=1.0).kind == "kl"


def test_2d_latent_model_synthesises_and_scores(tmp_path):
    from medidiff.anomaly.detector import AnomalyDetector
    from medidiff.anomaly.methods import MethodConfig
    from medidiff.models.loaded import load_model
    from medidiff.synthesis.synthesizer import Synthesizer
    from medidiff.training.latent import LatentTrainer

    ae = _autoencoder(tmp_path)
    result = LatentTrainer(_latent_config(ae), tmp_path / "ldm", dataset=_data(), progress=False).fit()
    loaded = load_model(result.model_path)
    assert loaded.is_latent and loaded.spatial_dims == 2 and loaded.input_shape == (8, 8)
    synth = Synthesizer(loaded, device="cpu", steps=2, batch_size=2)
    assert synth.sampler == "euler"  # a flow model's default
    samples = list(synth.generate([0, 1], seed=0))
    assert samples[0].array.shape == (16, 16) and samples[0].volume.shape == (16, 16, 1)
    assert 0 <= samples[0].array.min() and samples[0].array.max() <= 1  # decoded, clipped
    from medidiff.anomaly.postprocess import PostprocessConfig

    det = AnomalyDetector(loaded, MethodConfig("latent", t_start=300, steps=2),
                          PostprocessConfig(erode=0), device="cpu", batch_size=8)
    image = np.random.default_rng(0).random((16, 16, 4)).astype(np.float32)
    mask = np.zeros_like(image, dtype=bool)
    mask[2:14, 2:14, :3] = True
    grid = det.score_grid(image, mask, "scan")
    assert grid.anomaly_map.shape == image.shape
    assert grid.network_evaluations == 3 * 2  # three slices with brain, two steps each
    assert np.array_equal(grid.reconstruction[:, :, 3], image[:, :, 3])  # no brain: input kept
    with pytest.raises(ConfigError, match="works on images"):
        AnomalyDetector(loaded, MethodConfig("patched"), device="cpu")


def test_resume_refuses_a_changed_autoencoder_file(tmp_path):
    import shutil

    from medidiff.training.latent import LatentTrainer

    ae = _autoencoder(tmp_path)
    keep = tmp_path / "ae_first.safetensors"
    shutil.copy(ae, keep)
    run = tmp_path / "ldm"
    LatentTrainer(_latent_config(ae), run, dataset=_data(), progress=False).fit()
    other = _autoencoder(tmp_path, "ae2", steps=3)
    shutil.copy(other, ae)  # same path, other weights
    with pytest.raises(CheckpointError, match="not the one this run started with"):
        LatentTrainer(_latent_config(ae, max_steps=3), run, dataset=_data(), progress=False).fit(resume=True)
    shutil.copy(keep, ae)
    again = LatentTrainer(_latent_config(ae, max_steps=3), run, dataset=_data(), progress=False).fit(resume=True)
    assert again.steps == 3 and again.resumed_from == 2


def test_latent_stage_refuses_patches_and_other_dimensions(tmp_path):
    from medidiff.training.latent import LatentTrainer

    ae = _autoencoder(tmp_path)
    cfg = Config.from_dict({**COMMON, "stage": "latent", "model": {"spatial_dims": 3, "preset": "tiny"},
                            "autoencoder": {"checkpoint": str(ae)}})
    with pytest.raises(ConfigError, match="autoencoder .* is 2D"):
        LatentTrainer(cfg, tmp_path / "x", dataset=_data(), progress=False)
    cfg = Config.from_dict({**COMMON, "stage": "latent", "autoencoder": {"checkpoint": str(ae)},
                            "data": {"patch_size": [8, 8, 2], **COMMON["data"]}})
    with pytest.raises(ConfigError, match="patch_size does not apply"):
        LatentTrainer(cfg, tmp_path / "x", dataset=_data(), progress=False)
    with pytest.raises(ConfigError, match="autoencoder.checkpoint' is needed"):
        Config.from_dict({**COMMON, "stage": "latent"})
