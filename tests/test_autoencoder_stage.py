"""The autoencoder stage of a latent model through `medidiff train` (tiny, 3D, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medidiff.cli.main import main
from medidiff.errors import CheckpointError
from medidiff.models.checkpoint import load_inference
from medidiff.models.loaded import load_autoencoder, load_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "brain_mri_3d_autoencoder.yaml"
TINY = [
    "data.preprocessing.spacing=[6,6,6]", "data.preprocessing.shape=[32,40,32]",
    "data.patch_size=[16,16,16]", "autoencoder.preset=tiny", "autoencoder.scale_batches=2",
    "train.batch_size=2", "train.checkpoint_every=2", "train.log_every=1", "train.preview_every=2",
    "train.preview_samples=2",
]


def _train(out: Path, steps: int, *extra: str) -> int:
    args = ["train", "--config", str(CONFIG), "--out", str(out), "--no-progress", "--device", "cpu"]
    for item in [*TINY, f"train.max_steps={steps}", *extra]:
        args += ["--set", item]
    return main(args)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae") / "run"
    assert _train(out, 3) == 0
    return out


def test_writes_an_autoencoder_checkpoint_with_its_scale(run_dir):
    ckpt = load_inference(run_dir / "model.safetensors")
    assert ckpt.network == "autoencoder_kl"
    assert ckpt.extra["step"] == 3 and ckpt.extra["downsample_factor"] == 2
    assert 0 < ckpt.extra["scale_factor"] < 100
    assert (run_dir / "previews" / "step_0000002.png").is_file()
    ae = load_autoencoder(run_dir / "model.safetensors")
    assert ae.scale_factor == ckpt.extra["scale_factor"] and ae.downsample_factor == 2
    assert ae.preprocessing.shape == (32, 40, 32)
    x = torch.rand(1, 1, 32, 40, 32)
    with torch.no_grad():
        assert ae.network.reconstruct(x).shape == x.shape


def test_load_model_refuses_an_autoencoder_by_name(run_dir):
    with pytest.raises(CheckpointError, match="holds an autoencoder"):
        load_model(run_dir / "model.safetensors")


def test_resume_continues_and_refuses_a_changed_autoencoder(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    assert main(["train", "--config", str(CONFIG), "--out", str(copy), "--no-progress", "--resume",
                 *sum([["--set", s] for s in [*TINY, "train.max_steps=5"]], [])]) == 0
    assert load_inference(copy / "model.safetensors").extra["step"] == 5
    code = main(["train", "--config", str(CONFIG), "--out", str(copy), "--no-progress", "--resume",
                 *sum([["--set", s] for s in [*TINY, "train.max_steps=6", "autoencoder.kl_weight=0.1"]], [])])
    assert code != 0
    assert "'autoencoder' section differs" in capsys.readouterr().err


def test_adversarial_term_trains_a_discriminator(tmp_path):
    out = tmp_path / "adv"
    assert _train(out, 2, "autoencoder.adversarial_weight=0.01", "autoencoder.adversarial_start=1",
                  "autoencoder.discriminator_channels=8", "autoencoder.discriminator_layers=2") == 0
    from medidiff.models.training_state import load_training_state

    state = load_training_state(out / "checkpoints" / "last.pt")
    assert "discriminator" in state and state["disc_optimizer"]["state"]


def test_vq_autoencoder_trains_and_loads(tmp_path):
    out = tmp_path / "vq"
    assert _train(out, 3, "autoencoder.kind=vq", "autoencoder.num_embeddings=8",
                  "autoencoder.quantization_weight=0.5") == 0
    ckpt = load_inference(out / "model.safetensors")
    assert ckpt.network == "autoencoder_vq" and ckpt.model_kwargs["num_embeddings"] == 8
    assert ckpt.extra["step"] == 3 and ckpt.extra["downsample_factor"] == 4
    assert 0 < ckpt.extra["scale_factor"] < 100
    usage = ckpt.extra["codebook"]
    assert usage["num_embeddings"] == 8 and 1 <= usage["codes_used"] <= 8
    assert 1 <= usage["perplexity"] <= 8 + 1e-6
    assert (out / "previews" / "step_0000002.png").is_file()
    ae = load_autoencoder(out / "model.safetensors")
    assert ae.kind == "vq" and ae.downsample_factor == 4 and ae.latent_channels == 3
    x = torch.rand(1, 1, 32, 40, 32)
    with torch.no_grad():
        assert ae.network(x)[0].shape == x.shape
    with pytest.raises(CheckpointError, match="holds an autoencoder"):
        load_model(out / "model.safetensors")
