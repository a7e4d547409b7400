"""Lesion inpainting (RePaint), the lesion-shape model, paired-data folders and their CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medidiff.diffusion.repaint import repaint
from medidiff.diffusion.schedules import NoiseSchedule
from medidiff.errors import ConfigError, DataError
from medidiff.io import Volume, load_volume, save_volume
from medidiff.models.checkpoint import save_inference
from medidiff.models.unet import build_model, model_kwargs
from medidiff.synthesis.inpaint import Inpainter, blend_weights, synthesize_from_label_map
from medidiff.synthesis.lesion_shapes import LesionShapeModel
from medidiff.synthesis.pairs import read_pairs_manifest

LABELS = ["brain", "tumor", "ms"]
AFFINE = np.array([[1.5, 0, 0, -10], [0, 1.5, 0, -12], [0, 0, 2.0, 4], [0, 0, 0, 1]])


def _checkpoint(path: Path, conditional: bool, dims: int = 2) -> Path:
    config = {"model": {"spatial_dims": dims, "preset": "tiny"}, "diffusion": {"num_train_timesteps": 100}}
    extra_in = 0
    if conditional:
        config["conditioning"] = {"mask": "concat", "labels": LABELS, "dropout": 0.1}
        extra_in = len(LABELS)
    torch.manual_seed(0)
    model = build_model(dims, "tiny", in_channels=1 + extra_in)
    save_inference(path, model, model_kwargs=model_kwargs(dims, "tiny", in_channels=1 + extra_in), config=config,
                   preprocessing={"shape": [16, 16, 12], "spacing": [2.0, 2.0, 2.0]},
                   extra={"intensity_reference": {"a_min": 0.0, "a_max": 100.0}})
    return path


def _scan() -> tuple[Volume, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = np.zeros((20, 20, 10), np.float32)
    image[2:18, 3:17, 1:9] = 60 + 10 * rng.random((16, 14, 8))
    brain = (image > 0).astype(np.uint8)
    lesion = np.zeros_like(brain)
    lesion[8:12, 8:11, 4:6] = 1
    return Volume(image, AFFINE), brain, lesion


# ---- RePaint and blending ---------------------------------------------------------------------


def test_repaint_keeps_known_region_exactly_and_counts_nfe() -> None:
    schedule = NoiseSchedule.create("linear_beta", num_train_timesteps=50)
    x0 = torch.rand(2, 1, 8, 8)
    known = torch.ones(2, 1, 8, 8)
    known[:, :, 2:6, 2:6] = 0
    calls = []
    model_fn = lambda x, t: calls.append(1) or torch.zeros_like(x)  # noqa: E731
    result = repaint(model_fn, schedule, x0, known, steps=5, resample=3, seeds=[0, 1])
    assert torch.equal(result.sample[known > 0], x0[known > 0])
    assert result.nfe == len(calls) == 5 * 3 - 2
    assert not torch.allclose(result.sample[known == 0], x0[known == 0])
    again = repaint(model_fn, schedule, x0[1:], known[1:], steps=5, resample=3, seeds=[1])
    assert torch.equal(again.sample, result.sample[1:])  # per-sample seeds: batch-independent


def test_repaint_refusals() -> None:
    schedule = NoiseSchedule.create("linear_beta", num_train_timesteps=10)
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ConfigError, match="resample"):
        repaint(lambda a, t: a, schedule, x, x, steps=2, resample=0, seeds=[0])
    with pytest.raises(ConfigError, match="one seed per sample"):
        repaint(lambda a, t: a, schedule, x, x, steps=2, seeds=[0, 1])


def test_blend_weights() -> None:
    mask = np.zeros((9, 9, 3), bool)
    mask[4, 4, 1] = True
    w = blend_weights(mask, 2)
    assert w[4, 4, 1] == 1 and 0 < w[4, 6, 1] < w[4, 5, 1] < 1 and w[4, 7, 1] == 0
    assert np.array_equal(blend_weights(mask, 0) > 0, mask)


# ---- the inpainter ----------------------------------------------------------------------------


@pytest.mark.parametrize("conditional", [True, False])
def test_inpaint_changes_only_the_dilated_mask(tmp_path: Path, conditional: bool) -> None:
    ckpt = _checkpoint(tmp_path / "m.safetensors", conditional)
    scan, brain, lesion = _scan()
    inpainter = Inpainter(ckpt, device="cpu", steps=3, resample=2, margin=1)
    result = inpainter.inpaint(scan, lesion, seed=3, kind="tumor" if conditional else None,
                               brain=scan.with_array(brain))
    out = result.image.array
    outside = blend_weights(lesion, 1) == 0
    assert np.abs(out[outside] - scan.array[outside]).max() <= 1e-6
    assert np.abs(out[lesion > 0] - scan.array[lesion > 0]).max() > 1e-3
    assert np.array_equal(result.label.array, lesion) and result.label.array.dtype == np.uint8
    assert np.allclose(result.image.affine, AFFINE)
    again = inpainter.inpaint(scan, lesion, seed=3, kind="tumor" if conditional else None,
                              brain=scan.with_array(brain))
    assert np.array_equal(again.image.array, out)  # seeded


def test_inpaint_3d_model(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "m3.safetensors", True, dims=3)
    scan, brain, lesion = _scan()
    result = Inpainter(ckpt, device="cpu", steps=2, resample=2, margin=1).inpaint(
        scan, lesion, seed=0, kind="ms", brain=scan.with_array(brain))
    outside = blend_weights(lesion, 1) == 0
    assert np.abs(result.image.array[outside] - scan.array[outside]).max() <= 1e-6
    assert result.nfe == 3


def test_inpaint_refusals(tmp_path: Path) -> None:
    cond = Inpainter(_checkpoint(tmp_path / "c.safetensors", True), device="cpu", steps=2, resample=1)
    scan, _, lesion = _scan()
    with pytest.raises(DataError, match="empty"):
        cond.inpaint(scan, np.zeros_like(lesion), seed=0, kind="tumor")
    with pytest.raises(DataError, match="by kind"):
        cond.inpaint(scan, lesion, seed=0)
    with pytest.raises(DataError, match="not a label"):
        cond.inpaint(scan, lesion, seed=0, kind="stroke")
    with pytest.raises(ConfigError, match="mask-conditioned"):
        Inpainter(_checkpoint(tmp_path / "u.safetensors", False), device="cpu", guidance=2.0)


def test_synthesize_from_label_map(tmp_path: Path) -> None:
    inpainter = Inpainter(_checkpoint(tmp_path / "c.safetensors", True), device="cpu", steps=2, resample=1)
    _, brain, lesion = _scan()
    label_map = Volume((brain + lesion).astype(np.uint8), AFFINE)  # 1 brain, 2 tumor
    pair = synthesize_from_label_map(inpainter, label_map, seed=0)
    assert pair.image.shape == label_map.shape and np.allclose(pair.image.affine, AFFINE)
    assert np.array_equal(pair.label.array, lesion)
    with pytest.raises(DataError, match="label value 5"):
        synthesize_from_label_map(inpainter, label_map.with_array(brain * 5), seed=0)


# ---- lesion shapes ------------------------------------------------------------------------------


def test_lesion_shape_model_draws_inside_the_brain() -> None:
    brain = np.zeros((30, 30, 30), np.uint8)
    brain[3:27, 3:27, 3:27] = 1
    lesion = np.zeros_like(brain)
    lesion[12:17, 12:16, 12:15] = 1
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    model = LesionShapeModel.from_arrays([("tumor", lesion, brain, affine), ("ms", lesion, brain, affine)])
    assert model.kinds == ("ms", "tumor")
    assert model.volumes_ml("tumor")[0] == pytest.approx(60 * 0.008)
    target = Volume(brain, affine)
    a, b = model.draw("tumor", target, seed=5), model.draw("tumor", target, seed=5)
    assert np.array_equal(a.mask, b.mask) and a.mask.any() and not (a.mask > brain).any()
    assert 0.1 < a.volume_ml < 2.0
    assert model.draw("any", target, seed=1).kind in model.kinds
    with pytest.raises(ConfigError, match="not among the fitted kinds"):
        model.draw("stroke", target, seed=0)
    with pytest.raises(DataError, match="empty brain"):
        model.draw("tumor", Volume(np.zeros_like(brain), affine), seed=0)


# ---- the CLI -------------------------------------------------------------------------------------


def _cohort(tmp_path: Path) -> Path:
    """Two healthy scans and a lesion datalist (two labelled cases) in a dataset.json."""
    scan, brain, lesion = _scan()
    root = tmp_path / "data"
    entries = {"training": [], "training_lesions": []}
    for i in range(2):
        save_volume(scan, root / f"img/sub-{i}.nii.gz")
        save_volume(scan.with_array(brain), root / f"brain/sub-{i}.nii.gz")
        entries["training"].append({"image": f"./img/sub-{i}.nii.gz", "mask": f"./brain/sub-{i}.nii.gz"})
        save_volume(scan.with_array(lesion), root / f"les/tumor-{i}.nii.gz")
        entries["training_lesions"].append({"image": f"./img/sub-{i}.nii.gz", "label": f"./les/tumor-{i}.nii.gz",
                                            "mask": f"./brain/sub-{i}.nii.gz", "kind": "tumor"})
    (root / "dataset.json").write_text(json.dumps(entries))
    return root


def test_cli_inpaint_random_masks_resume_and_manifest(tmp_path: Path, run_cli) -> None:
    root = _cohort(tmp_path)
    ckpt = _checkpoint(tmp_path / "c.safetensors", True)
    out = tmp_path / "pairs"
    args = ["inpaint", "--checkpoint", str(ckpt), "--input", str(root / "dataset.json"),
            "--random-masks", "any", "--per-scan", "2", "--lesion-datalist", str(root / "dataset.json"),
            "--steps", "2", "--resample", "1", "--out", str(out), "--no-progress", "--device", "cpu"]
    first = run_cli(args)
    assert first.rc == 0, first.err
    rows = read_pairs_manifest(out / "manifest.csv")
    assert [r["name"] for r in rows] == ["sub-0-000", "sub-0-001", "sub-1-000", "sub-1-001"]
    assert [r["seed"] for r in rows] == ["0", "1", "2", "3"]
    assert all(r["mask_source"] == "random:tumor" and r["kind"] == "tumor" for r in rows)
    for r in rows:
        label = load_volume(out / r["label"])
        assert float(r["lesion_ml"]) == pytest.approx(label.array.sum() * 1.5 * 1.5 * 2.0 / 1000, abs=1e-3)
        image = load_volume(out / r["image"])
        assert np.allclose(image.affine, AFFINE, atol=1e-5) and image.shape == (20, 20, 10)
    assert (out / "montage.png").is_file()
    (out / "sub-1-001_synth.nii.gz").unlink()  # interrupted: one pair missing
    second = run_cli(args)
    assert second.rc == 0 and "1 pair(s) painted, 3 already present" in second.out
    assert len(read_pairs_manifest(out / "manifest.csv")) == 4
    changed = run_cli([("3" if a == "2" and args[i - 1] == "--steps" else a) for i, a in enumerate(args)])
    assert changed.rc != 0 and "other settings" in changed.err


def test_cli_inpaint_given_mask(tmp_path: Path, run_cli) -> None:
    scan, brain, lesion = _scan()
    save_volume(scan, tmp_path / "s.nii.gz")
    save_volume(scan.with_array(lesion), tmp_path / "m.nii.gz")
    ckpt = _checkpoint(tmp_path / "u.safetensors", False)
    res = run_cli(["inpaint", "--checkpoint", str(ckpt), "--input", str(tmp_path / "s.nii.gz"), "--mask",
                   str(tmp_path / "m.nii.gz"), "--steps", "2", "--resample", "1", "--out", str(tmp_path / "o"),
                   "--no-progress", "--device", "cpu"])
    assert res.rc == 0, res.err
    out = load_volume(tmp_path / "o" / "s_synth.nii.gz").array
    outside = blend_weights(lesion, 2) == 0
    assert np.abs(out[outside] - scan.array[outside]).max() <= 1e-6
    row = read_pairs_manifest(tmp_path / "o" / "manifest.csv")[0]
    assert row["mask_source"].endswith("m.nii.gz") and row["source_scan"].endswith("s.nii.gz")


def test_cli_refusals(tmp_path: Path, run_cli) -> None:
    cond = _checkpoint(tmp_path / "c.safetensors", True)
    plain = _checkpoint(tmp_path / "u.safetensors", False)
    scan, brain, lesion = _scan()
    save_volume(scan.with_array((brain + lesion).astype(np.uint8)), tmp_path / "map.nii.gz")
    res = run_cli(["synthesize", "--checkpoint", str(cond), "--num", "1", "--out", str(tmp_path / "a")])
    assert res.rc != 0 and "mask-conditioned model: give --mask" in res.err and "Traceback" not in res.err
    res = run_cli(["synthesize", "--checkpoint", str(plain), "--mask", str(tmp_path / "map.nii.gz"),
                   "--out", str(tmp_path / "b")])
    assert res.rc != 0 and "unconditional model" in res.err and len(res.err.strip().splitlines()) == 1
    res = run_cli(["synthesize", "--checkpoint", str(cond), "--mask", str(tmp_path / "map.nii.gz"),
                   "--out", str(tmp_path / "c"), "--steps", "2", "--no-progress", "--device", "cpu"])
    assert res.rc == 0, res.err
    assert load_volume(tmp_path / "c" / "map_synth.nii.gz").shape == (20, 20, 10)
    res = run_cli(["inpaint", "--checkpoint", str(cond), "--input", str(tmp_path / "map.nii.gz"),
                   "--mask", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d")])
    assert res.rc != 0 and "no such file or folder" in res.err
    res = run_cli(["synthesize", "--checkpoint", str(plain), "--out", str(tmp_path / "e")])
    assert res.rc != 0 and "--num is required" in res.err


def test_write_pairs_shards_over_ranks(tmp_path: Path) -> None:
    from medidiff.runtime.distributed import DistInfo
    from medidiff.synthesis.inpaint import PairedScan
    from medidiff.synthesis.pairs import PairJob, write_pairs

    made = []

    def make(job):
        made.append(job.name)
        v = Volume(np.full((4, 4, 4), job.seed, np.float32), np.eye(4))
        return PairedScan(v, v.with_array(np.ones((4, 4, 4), np.uint8)), np.ones((4, 4, 4), bool), 1, 0.0)

    jobs = [PairJob(name=f"p{i}", seed=i, mask_source="random:ms", kind="ms") for i in range(5)]
    write_pairs(jobs, make, tmp_path, settings={}, info=DistInfo(rank=1, world_size=2))
    assert made == ["p1", "p3"]
    summary = write_pairs(jobs, make, tmp_path, settings={}, info=DistInfo(rank=0, world_size=2))
    assert made == ["p1", "p3", "p0", "p2", "p4"]
    rows = read_pairs_manifest(summary.manifest)  # rank 0's manifest lists every finished pair
    assert [r["name"] for r in rows] == [f"p{i}" for i in range(5)]
    assert load_volume(tmp_path / "p3_synth.nii.gz").array.max() == 3  # seeded per pair


def test_inpaint_with_a_controlnet_model(tmp_path: Path) -> None:
    """A ControlNet over a frozen healthy base paints through the same Inpainter as a
    concat model: only the dilated mask changes."""
    from medidiff.config import Config
    from medidiff.data.labels import one_hot
    from medidiff.training import build_trainer

    base = _checkpoint(tmp_path / "base.safetensors", conditional=False)
    cfg = Config.from_dict({
        "stage": "controlnet", "base": {"checkpoint": str(base)},
        "model": {"spatial_dims": 2, "preset": "tiny"}, "diffusion": {"num_train_timesteps": 100},
        "conditioning": {"mask": "controlnet", "labels": LABELS, "dropout": 0.1},
        "train": {"max_steps": 2, "batch_size": 2, "checkpoint_every": 0, "preview_every": 0, "log_every": 1}})
    rng = np.random.default_rng(0)
    data = [{"image": torch.rand(1, 16, 16), "condition": torch.from_numpy(one_hot(rng.integers(0, 4, (16, 16)), 3))}
            for _ in range(4)]
    model = build_trainer(cfg, tmp_path / "run", dataset=data, progress=False, device="cpu").fit().model_path
    scan, brain, lesion = _scan()
    result = Inpainter(model, device="cpu", steps=3, resample=1, margin=1).inpaint(
        scan, lesion, seed=0, kind="ms", brain=scan.with_array(brain))
    outside = blend_weights(lesion, 1) == 0
    assert np.abs(result.image.array[outside] - scan.array[outside]).max() <= 1e-6
    assert np.abs(result.image.array[lesion > 0] - scan.array[lesion > 0]).max() > 1e-3
