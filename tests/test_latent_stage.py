"""Latent diffusion end to end from the CLI: a tiny autoencoder, then a tiny latent model on
its latents, then synthesis, calibration and latent anomaly scoring (3D, CPU, a few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medidiff.models.checkpoint import checkpoint_network, load_inference
from medidiff.models.loaded import load_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
AE_CONFIG = ROOT / "configs" / "brain_mri_3d_autoencoder.yaml"
LATENT_CONFIG = ROOT / "configs" / "brain_mri_3d_latent.yaml"
GRID = ["data.preprocessing.spacing=[6,6,6]", "data.preprocessing.shape=[32,40,32]"]
TRAIN = ["train.batch_size=2", "train.log_every=1", "train.preview_samples=2"]
SCAN = SAMPLE / "test" / "images" / "tumor-000.nii.gz"

pytestmark = pytest.mark.skipif(not (SAMPLE / "dataset.json").exists(), reason="sample_data not built")


def _sets(items: list[str]) -> list[str]:
    return sum([["--set", s] for s in items], [])


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """(autoencoder run, latent run) trained 3 steps each."""
    from medidiff.cli.main import main

    root = tmp_path_factory.mktemp("latent")
    ae = root / "ae"
    assert main(["train", "--config", str(AE_CONFIG), "--out", str(ae), "--no-progress", "--device", "cpu",
                 *_sets([*GRID, *TRAIN, "data.patch_size=[16,16,16]", "autoencoder.preset=tiny",
                         "autoencoder.scale_batches=2", "train.max_steps=3", "train.checkpoint_every=0",
                         "train.preview_every=0"])]) == 0
    latent = root / "ldm"
    assert main(["train", "--config", str(LATENT_CONFIG), "--out", str(latent), "--no-progress",
                 "--device", "cpu",
                 *_sets([*GRID, *TRAIN, "model.preset=tiny", f"autoencoder.checkpoint={ae / 'model.safetensors'}",
                         "train.max_steps=3", "train.checkpoint_every=2", "train.preview_every=3",
                         "train.preview_steps=2"])]) == 0
    return ae, latent


def test_one_file_holds_both_stages(latent_run):
    ae, latent = latent_run
    path = latent / "model.safetensors"
    assert checkpoint_network(path) == "latent_diffusion"
    ckpt = load_inference(path)
    assert {k.split(".")[0] for k in ckpt.state_dict} == {"unet", "autoencoder"}
    record = ckpt.extra["latent"]
    assert record["factor"] == 2 and record["latent_shape"] == [3, 16, 20, 16]
    assert record["autoencoder"]["sha256"] == load_inference(ae / "model.safetensors").sha256
    assert 0 < record["scale_factor"] < 100
    loaded = load_model(path)
    assert loaded.is_latent and loaded.channels == 3
    assert loaded.input_shape == (16, 20, 16) and loaded.image_shape == (32, 40, 32)
    # the stored autoencoder is the trained one, weight for weight
    trained = load_inference(ae / "model.safetensors").state_dict
    for key, value in loaded.autoencoder.autoencoder.state_dict().items():
        assert torch.equal(value, trained[key]), key
    assert (latent / "previews" / "step_0000003.png").is_file()
    assert list((latent / "cache").glob("latents-*.pt"))


def test_resume_reuses_cached_latents_and_refuses_another_autoencoder(latent_run, tmp_path, run_cli):
    import shutil

    ae, latent = latent_run
    copy = tmp_path / "ldm"
    shutil.copytree(latent, copy)
    common = ["train", "--config", LATENT_CONFIG, "--out", copy, "--no-progress", "--resume",
              *_sets([*GRID, *TRAIN, "model.preset=tiny", "train.checkpoint_every=2",
                      "train.preview_every=0"])]
    res = run_cli([*common, "--set", f"autoencoder.checkpoint={ae / 'model.safetensors'}",
                   "--set", "train.max_steps=4"])
    assert res.rc == 0, res.err
    assert load_inference(copy / "model.safetensors").extra["step"] == 4
    other = tmp_path / "other.safetensors"
    shutil.copy(ae / "model.safetensors", other)
    res = run_cli([*common, "--set", f"autoencoder.checkpoint={other}", "--set", "train.max_steps=5"])
    assert res.rc == 1 and "'autoencoder' section differs" in res.err


def test_refuses_missing_or_wrong_autoencoder(run_cli, tmp_path, tiny_checkpoint_3d, latent_run):
    base = ["train", "--config", LATENT_CONFIG, "--out", tmp_path / "x", "--no-progress",
            *_sets([*GRID, "model.preset=tiny", "train.max_steps=1"])]
    res = run_cli([*base, "--set", f"autoencoder.checkpoint={tmp_path / 'none.safetensors'}"])
    assert res.rc == 1 and "autoencoder.checkpoint not found" in res.err
    res = run_cli([*base, "--set", f"autoencoder.checkpoint={tiny_checkpoint_3d}"])
    assert res.rc == 1 and "not an autoencoder" in res.err
    ae = latent_run[0] / "model.safetensors"  # trained on a 32 x 40 x 32 grid
    res = run_cli([*base, "--set", f"autoencoder.checkpoint={ae}", "--set", "data.preprocessing.shape=[32,48,32]"])
    assert res.rc == 1 and "a latent model uses its autoencoder's grid" in res.err
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_synthesize_decodes_whole_volumes(latent_run, run_cli, tmp_path):
    _, latent = latent_run
    out = tmp_path / "synth"
    res = run_cli(["synthesize", "--checkpoint", latent / "model.safetensors", "--out", out, "--num", "2",
                   "--steps", "2", "--device", "cpu", "--seed", "3"])
    assert res.rc == 0, res.err
    files = sorted(out.glob("*.nii.gz"))
    assert len(files) == 2
    img = nib.load(files[0])
    assert img.shape == (32, 40, 32)
    assert np.allclose(np.abs(np.diag(img.affine)[:3]), 6.0)
    settings = json.loads((out / "synthesis_config.json").read_text())
    settings = settings.get("settings", settings)
    assert settings["latent"]["latent_shape"] == [3, 16, 20, 16]
    # the same seed gives the same decoded sample
    again = tmp_path / "again"
    assert run_cli(["synthesize", "--checkpoint", latent / "model.safetensors", "--out", again, "--num", "1",
                    "--steps", "2", "--device", "cpu", "--seed", "3"]).rc == 0
    a = np.asarray(nib.load(sorted(again.glob("*.nii.gz"))[0]).dataobj)
    b = np.asarray(img.dataobj)  # equal up to float rounding of batched vs single convolutions
    assert np.abs(a - b).max() <= 1e-4 * (np.ptp(b) + 1e-6)


def test_latent_anomaly_scoring_with_calibration(latent_run, run_cli, tmp_path):
    _, latent = latent_run
    ckpt = latent / "model.safetensors"
    healthy = sorted((SAMPLE / "val" / "images").glob("*.nii.gz"))[:2]
    thresholds = tmp_path / "t.json"
    fast = ["--t-start", "100", "--steps", "2"]
    res = run_cli(["calibrate", "--checkpoint", ckpt, "--healthy", *healthy, "--out", thresholds,
                   "--device", "cpu", *fast, "--allow-few"])
    assert res.rc == 0, res.err
    record = json.loads(thresholds.read_text())
    assert record["method"]["method"] == "latent" and record["method"]["clip"] is False
    out = tmp_path / "scores"
    res = run_cli(["anomaly", "--checkpoint", ckpt, "--input", SCAN, "--out", out, "--thresholds",
                   thresholds, "--device", "cpu", "--no-overlay", *fast])
    assert res.rc == 0, res.err
    amap = nib.load(out / "tumor-000_anomaly.nii.gz")
    assert amap.shape == nib.load(SCAN).shape
    assert (out / "tumor-000_seg.nii.gz").is_file()
    values = np.asarray(amap.dataobj)
    assert np.isfinite(values).all() and values.max() > 0


def test_latent_method_needs_a_latent_model(run_cli, tiny_checkpoint_3d, tmp_path):
    res = run_cli(["anomaly", "--checkpoint", tiny_checkpoint_3d, "--input", SCAN, "--out", tmp_path / "o",
                   "--method", "latent", "--device", "cpu"])
    assert res.rc == 1 and "needs a latent model" in res.err


def test_vq_latent_model_trains_synthesises_and_scores(run_cli, tmp_path):
    """A latent model on a VQ autoencoder's pre-quantisation latents (4x: 8 x 10 x 8)."""
    ae, latent = tmp_path / "vq", tmp_path / "ldm"
    res = run_cli(["train", "--config", AE_CONFIG, "--out", ae, "--no-progress", "--device", "cpu",
                   *_sets([*GRID, *TRAIN, "data.patch_size=[16,16,16]", "autoencoder.kind=vq",
                           "autoencoder.preset=tiny", "autoencoder.scale_batches=2", "train.max_steps=2",
                           "train.checkpoint_every=0", "train.preview_every=0"])])
    assert res.rc == 0, res.err
    res = run_cli(["train", "--config", LATENT_CONFIG, "--out", latent, "--no-progress", "--device", "cpu",
                   *_sets([*GRID, *TRAIN, "model.preset=tiny", f"autoencoder.checkpoint={ae / 'model.safetensors'}",
                           "train.max_steps=2", "train.checkpoint_every=0", "train.preview_every=0"])])
    assert res.rc == 0, res.err
    ckpt = load_inference(latent / "model.safetensors")
    assert ckpt.model_kwargs["autoencoder_kind"] == "vq"
    assert ckpt.extra["latent"]["kind"] == "vq" and ckpt.extra["latent"]["latent_shape"] == [3, 8, 10, 8]
    loaded = load_model(latent / "model.safetensors")
    assert loaded.autoencoder.kind == "vq" and loaded.input_shape == (8, 10, 8)
    out = tmp_path / "synth"
    res = run_cli(["synthesize", "--checkpoint", latent / "model.safetensors", "--out", out, "--num", "1",
                   "--steps", "2", "--device", "cpu", "--seed", "0"])
    assert res.rc == 0, res.err
    assert nib.load(min(out.glob("*.nii.gz"))).shape == (32, 40, 32)
    scores = tmp_path / "scores"
    res = run_cli(["anomaly", "--checkpoint", latent / "model.safetensors", "--input", SCAN, "--out", scores,
                   "--device", "cpu", "--no-overlay", "--method", "latent", "--t-start", "100", "--steps", "2"])
    assert res.rc == 0, res.err
    amap = nib.load(scores / "tumor-000_anomaly.nii.gz")
    assert amap.shape == nib.load(SCAN).shape and np.isfinite(np.asarray(amap.dataobj)).all()
