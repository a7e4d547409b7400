"""``medidiff synthesize`` and ``medidiff evaluate-synthesis`` end to end, and their bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "sample_data" / "val" / "images"


@pytest.mark.parametrize("dims", [2, 3])
def test_synthesize_then_evaluate(dims, request, run_cli, tmp_path):
    ckpt = request.getfixturevalue("tiny_checkpoint_2d" if dims == 2 else "tiny_checkpoint_3d")
    out = tmp_path / "synth"
    r = run_cli(["synthesize", "--checkpoint", ckpt, "--num", 4, "--out", out, "--steps", 2,
                 "--batch-size", 3, "--seed", 3, "--no-progress", "--device", "cpu"])
    assert r.rc == 0, r.err
    last = r.out.strip().splitlines()[-1]
    assert str(out) in last and "4 sample(s) generated" in last
    assert len(list(out.glob("synth_*.nii.gz"))) == 4
    assert (out / "manifest.csv").exists() and (out / "montage.png").exists()

    # the same command again resumes: nothing to do
    again = run_cli(["synthesize", "--checkpoint", ckpt, "--num", 4, "--out", out, "--steps", 2,
                     "--seed", 3, "--no-progress", "--device", "cpu"])
    assert again.rc == 0 and "0 sample(s) generated, 4 already present" in again.out

    metrics = tmp_path / "metrics.json"
    r = run_cli(["evaluate-synthesis", "--real", REAL, "--synthetic", out, "--out", metrics,
                 "--max-pairs", 20])
    assert r.rc == 0, r.err
    assert "MS-SSIM synthetic" in r.out and "NOT FID" in r.out and str(metrics) in r.out
    data = json.loads(metrics.read_text(encoding="utf-8"))
    assert data["n_synthetic"] == 4
    assert data["kind"] == ("2d-slice" if dims == 2 else "3d-volume")
    assert data["n_real"] >= 6  # 6 validation scans: their training-filtered slices in 2D
    assert data["frechet"]["extractor"] == "medidiff-stats-v1"
    assert len(data["memorisation"]["nearest_ssim"]) == 4
    # 4 samples: the Fréchet value comes with its small-sample warning (table, stderr, JSON)
    assert r.out.startswith("WARNING: Frechet distance from only 4 synthetic")
    assert "medidiff: warning: Frechet distance from only 4 synthetic" in r.err
    assert len(data["warnings"]) == 1 and "biased upwards" in data["warnings"][0]
    assert not list(tmp_path.glob(".metrics.json*"))  # atomic: no temporary left


def test_missing_checkpoint_is_one_clear_line(run_cli, tmp_path, monkeypatch):
    import medidiff.models.pretrained as pretrained

    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", tmp_path / "no_weights")
    r = run_cli(["synthesize", "--num", 2, "--out", tmp_path / "o"])
    assert r.rc == 1
    assert r.err.startswith("medidiff: error:") and "brain_mri_3d" in r.err and "missing" in r.err
    assert r.err.count("\n") == 1 and not (tmp_path / "o").exists()

    r = run_cli(["synthesize", "--checkpoint", tmp_path / "nope.safetensors", "--num", 2,
                 "--out", tmp_path / "o"])
    assert r.rc == 1 and "checkpoint not found" in r.err and not (tmp_path / "o").exists()


def test_label_on_unconditional_model_is_refused(tiny_checkpoint_2d, run_cli, tmp_path):
    r = run_cli(["synthesize", "--checkpoint", tiny_checkpoint_2d, "--num", 1, "--out", tmp_path / "o",
                 "--label", "tumor", "--device", "cpu"])
    assert r.rc == 1 and "unconditional model" in r.err and "--label" in r.err
    assert r.err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_unknown_label_lists_the_known_ones(tiny_checkpoint_2d_conditional, run_cli, tmp_path):
    r = run_cli(["synthesize", "--checkpoint", tiny_checkpoint_2d_conditional, "--num", 1,
                 "--out", tmp_path / "o", "--label", "c", "--device", "cpu"])
    assert r.rc == 1 and "known labels: 0=a, 1=b" in r.err


def test_conditional_cli_run(tiny_checkpoint_2d_conditional, run_cli, tmp_path):
    r = run_cli(["synthesize", "--checkpoint", tiny_checkpoint_2d_conditional, "--num", 2,
                 "--out", tmp_path / "o", "--label", "b", "--guidance", 2, "--steps", 2,
                 "--no-progress", "--device", "cpu"])
    assert r.rc == 0, r.err
    assert "label b (guidance 2)" in r.out


def test_other_configuration_needs_overwrite(tiny_checkpoint_2d, run_cli, tmp_path):
    base = ["synthesize", "--checkpoint", tiny_checkpoint_2d, "--num", 1, "--out", tmp_path / "o",
            "--steps", 2, "--no-progress", "--device", "cpu"]
    assert run_cli(base).rc == 0
    r = run_cli([*base, "--seed", 4])
    assert r.rc == 1 and "another configuration" in r.err and "--overwrite" in r.err
    assert run_cli([*base, "--seed", 4, "--overwrite"]).rc == 0


def test_evaluate_needs_a_grid(run_cli, tmp_path, tmp_nifti):
    folder = tmp_path / "foreign"
    folder.mkdir()
    tmp_nifti(name="foreign/a.nii.gz", shape=(8, 8, 8))
    r = run_cli(["evaluate-synthesis", "--real", REAL, "--synthetic", folder])
    assert r.rc == 1 and "--checkpoint" in r.err and r.err.count("\n") == 1
    r = run_cli(["evaluate-synthesis", "--real", REAL, "--synthetic", tmp_path / "missing"])
    assert r.rc == 1 and "no such folder" in r.err


def test_docstrings_no_longer_say_not_implemented():
    from medidiff.cli.commands import evaluate_synthesis, synthesize

    for module in (synthesize, evaluate_synthesis):
        assert "NOT IMPLEMENTED YET" not in (module.__doc__ or "")


def test_real_folder_without_volumes_points_to_its_images_subfolder(
    tiny_checkpoint_2d, run_cli, tmp_path
):
    """sample_data/val holds images/ and brainmasks/: the error names the folder to pass."""
    synth = tmp_path / "synth"
    r = run_cli(["synthesize", "--checkpoint", tiny_checkpoint_2d, "--num", 2, "--out", synth,
                 "--steps", 2, "--no-progress", "--device", "cpu"])
    assert r.rc == 0, r.err
    r = run_cli(["evaluate-synthesis", "--real", ROOT / "sample_data" / "val", "--synthetic",
                 synth])
    assert r.rc != 0 and r.err.count("\n") == 1
    assert "no volume files" in r.err and "images/ (6)" in r.err
    assert f"e.g. {ROOT / 'sample_data' / 'val' / 'images'}" in r.err
