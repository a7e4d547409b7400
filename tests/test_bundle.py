"""`medidiff export-bundle`: MONAI bundles that score as `medidiff anomaly` does.

The bundles are run the way MONAI runs them (``monai.bundle.run`` in-process, and
``python -m monai.bundle run`` in a subprocess) and their maps are compared with
``medidiff anomaly`` on the same inputs, to 1e-5.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
RAS = SAMPLE / "test" / "images" / "tumor-000.nii.gz"
PIR = SAMPLE / "test" / "images" / "tumor-001.nii.gz"  # stored PIR
FAST = ["--method", "ddim", "--t-start", "6", "--steps", "2"]
TOL = 1e-5

pytestmark = [
    pytest.mark.skipif(not (SAMPLE / "dataset.json").exists(), reason="sample_data not built"),
    pytest.mark.filterwarnings("ignore:parsing config_file"),  # MONAI's warning on every run
]


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r["name"]: r for r in csv.DictReader(f)}


def _max_diff(a: Path, b: Path, names: list[str], kinds: tuple[str, ...]) -> float:
    """Largest |a - b| over the maps of ``names``; affines and shapes must match exactly."""
    worst = 0.0
    for name in names:
        for kind in kinds:
            x, y = nib.load(a / f"{name}_{kind}.nii.gz"), nib.load(b / f"{name}_{kind}.nii.gz")
            assert x.shape == y.shape and np.array_equal(x.affine, y.affine), (name, kind)
            assert x.get_data_dtype() == y.get_data_dtype(), (name, kind)
            worst = max(worst, float(np.abs(np.asarray(x.dataobj, np.float64)
                                            - np.asarray(y.dataobj, np.float64)).max()))
    return worst


def _run_bundle(bundle: Path, out: Path, inputs, **override):
    """``python -m monai.bundle run`` in this process (MONAI's own entry point)."""
    from monai.bundle import run

    run(config_file=str(bundle / "configs" / "inference.json"), logging_file=False,
        bundle_root=str(bundle), dataset_dir=inputs, output_dir=str(out), **override)


def _thresholds(checkpoint: Path, path: Path) -> Path:
    """Thresholds for the FAST settings, at the median of one scan's own map (so that the
    segmentations are not empty)."""
    from medidiff.anomaly.detector import AnomalyDetector, MethodConfig
    from medidiff.anomaly.thresholds import Thresholds

    det = AnomalyDetector(checkpoint, MethodConfig("ddim", t_start=6, steps=2))
    result = det.score_file(RAS)
    voxels = result.grid.anomaly_map[result.grid.mask]
    Thresholds.from_healthy(det, [voxels], {"tumor-000": result.score}, fpr=0.5).save(path)
    return path


def test_bundle_run_matches_medidiff_anomaly(run_cli, tiny_checkpoint_2d, tmp_path):
    """Export with thresholds, run through monai.bundle.run: every map, segmentation and
    score equals `medidiff anomaly` with the same options (2D model, RAS and PIR inputs)."""
    thresholds = _thresholds(tiny_checkpoint_2d, tmp_path / "t.json")
    cli, bundle, out = tmp_path / "cli", tmp_path / "tiny_2d", tmp_path / "bundle_out"
    res = run_cli(["anomaly", "--checkpoint", tiny_checkpoint_2d, "--input", RAS, PIR,
                   "--out", cli, "--thresholds", thresholds, *FAST])
    assert res.rc == 0, res.err
    res = run_cli(["export-bundle", tiny_checkpoint_2d, bundle, "--thresholds", thresholds, *FAST])
    assert res.rc == 0, res.err
    assert res.out.strip().splitlines()[-1] == f"wrote the MONAI bundle (8 files) to {bundle}/"
    assert "python -m monai.bundle run --config_file" in res.out

    _run_bundle(bundle, out, [str(RAS), str(PIR)])
    names = ["tumor-000", "tumor-001"]
    diff = _max_diff(cli, out, names, ("anomaly", "recon", "seg"))
    assert diff <= TOL, diff
    assert any(np.asarray(nib.load(out / f"{n}_seg.nii.gz").dataobj).any() for n in names)
    assert (out / "tumor-001_overlay.png").read_bytes()[:4] == b"\x89PNG"
    a, b = _rows(cli / "scores.csv"), _rows(out / "scores.csv")
    for name in names:
        assert abs(float(a[name]["score"]) - float(b[name]["score"])) <= TOL
        for key in ("flagged", "voxels_over_threshold", "network_evaluations", "nfe_per_input"):
            assert a[name][key] == b[name][key], key
    from medidiff.anomaly.outputs import run_identity

    identity = [run_identity(json.loads((d / "anomaly_config.json").read_text())) for d in (cli, out)]
    assert identity[0] == identity[1]


def test_bundle_layout_metadata_and_monai_properties(run_cli, tiny_checkpoint_2d, tmp_path):
    """The files MONAI's bundle specification names; metadata that MONAI's inference
    properties accept; the weights copied byte for byte; model.pt loads into network_def."""
    import torch
    from monai.bundle import ConfigParser, ConfigWorkflow

    from medidiff.models.checkpoint import build_network, file_sha256, load_inference

    bundle = tmp_path / "tiny"
    assert run_cli(["export-bundle", tiny_checkpoint_2d, bundle, "--seed", "3"]).rc == 0
    files = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    assert files == ["LICENSE", "configs/inference.json", "configs/logging.conf",
                     "configs/metadata.json", "docs/README.md", "models/model.pt",
                     "models/model.safetensors"]
    assert file_sha256(bundle / "models" / "model.safetensors") == file_sha256(tiny_checkpoint_2d)

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    for key in ("version", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "task", "description", "authors", "copyright",
                "network_data_format", "intended_use", "references"):
        assert meta[key], key
    import monai

    assert meta["monai_version"] == monai.__version__.split("+")[0]
    assert meta["required_packages_version"]["medidiff"]
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["spatial_shape"] == [32, 40] and image["num_channels"] == 1 and image["is_patch_data"]
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"]["0"]
    settings = meta["medidiff"]
    assert settings["seed"] == 3 and settings["method"]["method"] == "ddim"
    assert settings["checkpoint"]["sha256"] == file_sha256(tiny_checkpoint_2d)
    assert "--seed 3" in settings["equivalent_command"]
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert config["seed"] == 3 and config["thresholds_path"] is None

    # MONAI's inference workflow finds every property it requires
    workflow = ConfigWorkflow(config_file=str(bundle / "configs" / "inference.json"),
                              workflow_type="inference", logging_file=False,
                              bundle_root=str(bundle), dataset_dir=str(RAS))
    workflow.initialize()
    assert workflow.check_properties() == []

    # the bare MONAI network of models/model.pt equals medidiff's network of the checkpoint
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    net = parser.get_parsed_content("network_def")
    parser.get_parsed_content("load_network")
    ours = build_network(load_inference(tiny_checkpoint_2d)).eval()
    x, t = torch.randn(2, 1, 32, 40, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 7])
    with torch.no_grad():
        assert torch.equal(net.eval()(x, t), ours(x, t))


def test_python_m_monai_bundle_run_3d(run_cli, tiny_checkpoint_3d, tmp_path):
    """The documented command line, in a fresh process (fire parses the overrides):
    a 3D model, without overlays, equals `medidiff anomaly`."""
    cli, bundle, out = tmp_path / "cli", tmp_path / "tiny3d", tmp_path / "out"
    assert run_cli(["anomaly", "--checkpoint", tiny_checkpoint_3d, "--input", PIR, "--out", cli,
                    "--no-overlay", *FAST]).rc == 0
    assert run_cli(["export-bundle", tiny_checkpoint_3d, bundle, *FAST]).rc == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "monai.bundle", "run",
           "--config_file", str(bundle / "configs" / "inference.json"),
           "--meta_file", str(bundle / "configs" / "metadata.json"),
           "--logging_file", str(bundle / "configs" / "logging.conf"),
           "--bundle_root", str(bundle), "--dataset_dir", str(PIR), "--output_dir", str(out),
           "--overlays", "false"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote anomaly maps of 1 scan(s)" in proc.stdout
    assert not (out / "tumor-001_overlay.png").exists()
    assert _max_diff(cli, out, ["tumor-001"], ("anomaly", "recon")) <= TOL
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [16, 16, 16]


def test_latent_model_bundle(run_cli, tiny_latent_run, tmp_path):
    """A latent model: the U-Net and the autoencoder as MONAI state dicts, and a bundle run
    that equals `medidiff anomaly` (method latent)."""
    import torch
    from monai.bundle import ConfigParser

    from medidiff.models.checkpoint import load_inference

    checkpoint = tiny_latent_run[1] / "model.safetensors"
    cli, bundle, out = tmp_path / "cli", tmp_path / "latent", tmp_path / "out"
    opts = ["--t-start", "300", "--steps", "1"]
    assert run_cli(["anomaly", "--checkpoint", checkpoint, "--input", RAS, "--out", cli,
                    "--no-overlay", *opts]).rc == 0
    res = run_cli(["export-bundle", checkpoint, bundle, "--no-overlay", *opts])
    assert res.rc == 0, res.err
    assert "--method latent" in res.out
    _run_bundle(bundle, out, str(RAS))
    assert _max_diff(cli, out, ["tumor-000"], ("anomaly", "recon")) <= TOL

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert set(meta["network_data_format"]["inputs"]) == {"latent", "timesteps"}
    assert meta["network_data_format"]["inputs"]["latent"]["spatial_shape"] == [16, 20, 16]
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    parser.get_parsed_content("load_network")
    parser.get_parsed_content("load_autoencoder")
    stored = load_inference(checkpoint).state_dict
    for prefix, key in (("unet.", "network_def"), ("autoencoder.", "autoencoder_def")):
        for name, value in parser.get_parsed_content(key).state_dict().items():
            assert torch.equal(value, stored[prefix + name]), name


def test_bad_checkpoints_are_one_line_and_leave_nothing(run_cli, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((ROOT / "medidiff" / "weights" / "brain_mri_2d.safetensors").read_bytes()[:5000])
    parent = tmp_path / "bundles"
    parent.mkdir()
    for ckpt, word in ((tmp_path / "missing.safetensors", "No such file"),
                       (garbage, "not a safetensors file"), (truncated, "truncated"),
                       ("brain_mri_9d", "No such file")):
        res = run_cli(["export-bundle", ckpt, parent / "b"])
        assert res.rc == 1 and res.err.count("\n") == 1, res.err
        assert res.err.startswith("medidiff: error:") and word in res.err, res.err
        assert list(parent.iterdir()) == []


def test_existing_out_thresholds_mismatch_and_failed_writes(run_cli, tiny_checkpoint_2d, tmp_path,
                                                              monkeypatch):
    bundle = tmp_path / "b"
    assert run_cli(["export-bundle", tiny_checkpoint_2d, bundle, *FAST]).rc == 0

    res = run_cli(["export-bundle", tiny_checkpoint_2d, bundle, *FAST])
    assert res.rc == 1 and "already exists" in res.err and "--overwrite" in res.err
    # --overwrite replaces a bundle (here: with another seed)
    assert run_cli(["export-bundle", tiny_checkpoint_2d, bundle, *FAST, "--seed", "5",
                    "--overwrite"]).rc == 0
    assert json.loads((bundle / "configs" / "inference.json").read_text())["seed"] == 5
    # ... but never a folder that is not a bundle
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    res = run_cli(["export-bundle", tiny_checkpoint_2d, other, "--overwrite"])
    assert res.rc == 1 and "not a bundle" in res.err and (other / "notes.txt").read_text() == "keep"
    (tmp_path / "file").write_text("x")
    res = run_cli(["export-bundle", tiny_checkpoint_2d, tmp_path / "file"])
    assert res.rc == 1 and "is a file" in res.err

    # thresholds calibrated with other settings are refused before anything is written
    thresholds = _thresholds(tiny_checkpoint_2d, tmp_path / "t.json")
    res = run_cli(["export-bundle", tiny_checkpoint_2d, tmp_path / "c", "--thresholds",
                   thresholds, "--method", "ddim", "--t-start", "8", "--steps", "2"])
    assert res.rc == 1 and "another method config" in res.err and res.err.count("\n") == 1
    assert not (tmp_path / "c").exists()

    # a failure while writing leaves no bundle, no temporary folder, and the old bundle intact
    from medidiff.bundle import export

    def boom(spec):
        raise OSError("disk full")

    monkeypatch.setattr(export, "license_text", boom)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = run_cli(["export-bundle", tiny_checkpoint_2d, tmp_path / "d"])
    assert res.rc == 1 and "disk full" in res.err
    res = run_cli(["export-bundle", tiny_checkpoint_2d, bundle, *FAST, "--overwrite"])
    assert res.rc == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert json.loads((bundle / "configs" / "inference.json").read_text())["seed"] == 5


def test_bundle_run_without_input_says_how(run_cli, tiny_checkpoint_2d, tmp_path):
    bundle = tmp_path / "b"
    assert run_cli(["export-bundle", tiny_checkpoint_2d, bundle, *FAST]).rc == 0
    from monai.bundle import run

    with pytest.raises(RuntimeError) as info:
        run(config_file=str(bundle / "configs" / "inference.json"), logging_file=False,
            bundle_root=str(bundle), output_dir=str(tmp_path / "o"))
    assert "--dataset_dir" in str(info.value.__cause__)
    with pytest.raises(RuntimeError) as info:
        _run_bundle(bundle, tmp_path / "o", str(RAS), overlays="maybe")
    assert "--overlays must be True or False" in str(info.value.__cause__)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_shipped_default_model_bundle_on_a_sample_scan(run_cli, tmp_path):
    """The shipped 2D default model with its default method, on one sample_data scan."""
    from medidiff.models.pretrained import DEFAULT_2D

    cli, bundle, out = tmp_path / "cli", tmp_path / DEFAULT_2D, tmp_path / "out"
    assert run_cli(["anomaly", "--input", RAS, "--out", cli, "--no-overlay"]).rc == 0
    res = run_cli(["export-bundle", DEFAULT_2D, bundle, "--no-overlay"])
    assert res.rc == 0, res.err
    assert (bundle / "docs" / "model_card.md").is_file()
    assert "medidiff contributors" in (bundle / "configs" / "metadata.json").read_text()
    _run_bundle(bundle, out, str(RAS))
    assert _max_diff(cli, out, ["tumor-000"], ("anomaly", "recon")) <= TOL
