"""Synthesis: geometry, naming, per-sample seeding, sharding, resume, conditional sampling."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medidiff.models.checkpoint import file_sha256, load_inference, save_inference
from medidiff.runtime.distributed import DistInfo
from medidiff.errors import ConfigError, OutputError
from medidiff.io.volume import load_volume
from medidiff.synthesis.folder import MANIFEST_COLUMNS, synthesize_to_folder
from medidiff.synthesis.synthesizer import Synthesizer

STEPS = 2


def _manifest(folder: Path) -> list[dict[str, str]]:
    with (folder / "manifest.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _count_calls(synth: Synthesizer) -> list[int]:
    calls = [0]
    synth.model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _resave(ckpt_path: Path, out: Path, *, preprocessing=None, extra=None) -> Path:
    """A copy of a checkpoint with other recorded preprocessing / extra (same weights)."""
    ck = load_inference(ckpt_path)
    return save_inference(
        out, ck.state_dict, model_kwargs=ck.model_kwargs, config=ck.config,
        preprocessing=ck.preprocessing if preprocessing is None else preprocessing,
        extra=ck.extra if extra is None else extra,
    )


# ---- geometry, naming, intensities -------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_output_geometry_naming_and_manifest(dims, request, tmp_path):
    ckpt = request.getfixturevalue("tiny_checkpoint_2d" if dims == 2 else "tiny_checkpoint_3d")
    synth = Synthesizer(ckpt, device="cpu", steps=STEPS, batch_size=2)
    summary = synthesize_to_folder(synth, tmp_path / "out", 3, seed=5)

    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("synth_*")) == [f"synth_0000{i}.nii.gz" for i in range(3)]
    assert summary.generated == (0, 1, 2) and summary.skipped == ()
    prep = load_inference(ckpt).preprocessing
    x, y, z = prep["shape"]
    spacing = np.asarray(prep["spacing"], dtype=float)
    shape = (x, y, 1) if dims == 2 else (x, y, z)
    # closed form: RAS diagonal affine, grid centre at the world origin
    expected = np.diag([*spacing, 1.0])
    expected[:3, 3] = -spacing * (np.asarray(shape) - 1) / 2
    ref = load_inference(ckpt).extra["intensity_reference"]
    direct = {s.index: s.array for s in synth.generate(range(3), seed=5)}
    for i in range(3):
        vol = load_volume(out / f"synth_0000{i}.nii.gz")
        assert vol.shape == shape
        assert vol.orientation == "RAS"
        np.testing.assert_allclose(vol.affine, expected, atol=1e-4)
        # intensities: the model's [0, 1] mapped linearly to the training scale
        native = ref["a_min"] + direct[i] * (ref["a_max"] - ref["a_min"])
        np.testing.assert_allclose(vol.array.reshape(direct[i].shape), native, rtol=1e-5, atol=1e-4)

    rows = _manifest(out)
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    assert [r["file"] for r in rows] == [f"synth_0000{i}.nii.gz" for i in range(3)]
    assert [int(r["seed"]) for r in rows] == [5, 6, 7]
    assert {r["kind"] for r in rows} == {"2d-slice" if dims == 2 else "3d-volume"}
    assert {r["sampler"] for r in rows} == {"ddim"} and {r["steps"] for r in rows} == {str(STEPS)}
    assert {r["intensity"] for r in rows} == {"native"}
    assert all(float(r["seconds"]) > 0 for r in rows)
    assert (out / "montage.png").stat().st_size > 0
    config = json.loads((out / "synthesis_config.json").read_text(encoding="utf-8"))
    assert config["checkpoint_sha256"] == file_sha256(ckpt)
    assert (config["sampler"], config["steps"], config["seed"]) == ("ddim", STEPS, 5)


def test_2d_slice_keeps_in_plane_spacing_and_slice_thickness(tiny_checkpoint_2d, tmp_path):
    prep = dict(load_inference(tiny_checkpoint_2d).preprocessing, spacing=[1.0, 2.0, 3.5])
    ckpt = _resave(tiny_checkpoint_2d, tmp_path / "aniso.safetensors", preprocessing=prep)
    synth = Synthesizer(ckpt, device="cpu", steps=STEPS)
    [sample] = list(synth.generate([0]))
    assert sample.array.shape == (32, 40)
    assert sample.volume.shape == (32, 40, 1)
    assert sample.volume.spacing == pytest.approx((1.0, 2.0, 3.5))
    np.testing.assert_allclose(sample.volume.affine[:3, 3], [-15.5, -39.0, 0.0])


def test_without_intensity_reference_stays_on_model_scale(tiny_checkpoint_2d, tmp_path):
    extra = {k: v for k, v in load_inference(tiny_checkpoint_2d).extra.items() if k != "intensity_reference"}
    ckpt = _resave(tiny_checkpoint_2d, tmp_path / "noref.safetensors", extra=extra)
    synth = Synthesizer(ckpt, device="cpu", steps=STEPS)
    synthesize_to_folder(synth, tmp_path / "out", 2)
    assert {r["intensity"] for r in _manifest(tmp_path / "out")} == {"model_0_1"}
    direct = next(synth.generate([1]))
    vol = load_volume(tmp_path / "out" / "synth_00001.nii.gz")
    np.testing.assert_allclose(vol.array[:, :, 0], direct.array, atol=1e-5)  # batch 4 vs 1
    assert 0.0 <= vol.array.min() and vol.array.max() <= 1.0  # x_0 clipped to the data range


# ---- seeding, sharding, resume -----------------------------------------------------------


def test_same_seed_same_sample_whatever_the_batch(tiny_checkpoint_2d):
    big = {s.index: s for s in Synthesizer(tiny_checkpoint_2d, device="cpu", steps=3, batch_size=4)
           .generate(range(4), seed=11)}
    one = {s.index: s for s in Synthesizer(tiny_checkpoint_2d, device="cpu", steps=3, batch_size=1)
           .generate([3, 0, 2], seed=11)}
    for i in (0, 2, 3):
        assert one[i].seed == big[i].seed == 11 + i
        # same noise; batched kernels may round differently in the last bits (~1e-7)
        np.testing.assert_allclose(one[i].array, big[i].array, atol=1e-5)
    assert np.abs(big[0].array - big[1].array).max() > 1e-2  # different seeds differ


def test_sharding_covers_each_index_exactly_once(tiny_checkpoint_2d, tmp_path):
    synth = Synthesizer(tiny_checkpoint_2d, device="cpu", steps=STEPS, batch_size=2)
    out, world = tmp_path / "out", 3
    generated = {}
    for rank in range(world):  # simulated ranks (no process group): rank 0 first writes the config
        summary = synthesize_to_folder(synth, out, 7, seed=1, info=DistInfo(rank=rank, world_size=world))
        generated[rank] = summary.generated
    assert generated == {0: (0, 3, 6), 1: (1, 4), 2: (2, 5)}
    assert sorted(i for g in generated.values() for i in g) == list(range(7))
    # a plain resume finds everything present and rebuilds the manifest over all ranks' files
    calls = _count_calls(synth)
    summary = synthesize_to_folder(synth, out, 7, seed=1)
    assert summary.generated == () and calls[0] == 0
    assert [int(r["index"]) for r in _manifest(out)] == list(range(7))
    # a rank's file equals the single-process sample of that index
    [ref] = list(synth.generate([5], seed=1))
    vol = load_volume(out / "synth_00005.nii.gz")
    np.testing.assert_allclose(vol.array[:, :, 0], ref.volume.array[:, :, 0], rtol=1e-5, atol=1e-3)


def test_resume_skips_complete_files(tiny_checkpoint_2d, tmp_path):
    out = tmp_path / "out"
    synth = Synthesizer(tiny_checkpoint_2d, device="cpu", steps=STEPS, batch_size=1)
    synthesize_to_folder(synth, out, 3, seed=2)
    first_rows = {r["index"]: r for r in _manifest(out)}
    (out / "synth_00001.nii.gz").unlink()  # as if interrupted before it was written
    (out / ".synth_00001.nii.gz.abc.tmp.nii.gz").write_bytes(b"partial")  # a killed writer's leftover
    mtimes = {i: (out / f"synth_0000{i}.nii.gz").stat().st_mtime_ns for i in (0, 2)}

    calls = _count_calls(synth)
    summary = synthesize_to_folder(synth, out, 5, seed=2)
    assert summary.generated == (1, 3, 4) and summary.skipped == (0, 2)
    assert calls[0] == 3 * STEPS  # batch 1: one network call per step per missing sample
    assert {i: (out / f"synth_0000{i}.nii.gz").stat().st_mtime_ns for i in (0, 2)} == mtimes
    rows = _manifest(out)
    assert [r["index"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert rows[0] == first_rows["0"] and rows[2] == first_rows["2"]  # kept rows, timings included
    assert not list(out.glob(".synth_*"))

    # a lost manifest is rebuilt from the files (seeds known; timings unknown)
    (out / "manifest.csv").unlink()
    calls[0] = 0
    synthesize_to_folder(synth, out, 5, seed=2)
    rows = _manifest(out)
    assert calls[0] == 0
    assert [int(r["seed"]) for r in rows] == [2, 3, 4, 5, 6] and rows[0]["seconds"] == ""


def test_other_configuration_refused_without_overwrite(tiny_checkpoint_2d, tmp_path):
    out = tmp_path / "out"
    synth = Synthesizer(tiny_checkpoint_2d, device="cpu", steps=STEPS)
    synthesize_to_folder(synth, out, 2, seed=0)
    before = load_volume(out / "synth_00000.nii.gz").array
    with pytest.raises(OutputError, match="seed 0 -> 1.*--overwrite"):
        synthesize_to_folder(synth, out, 2, seed=1)
    other = Synthesizer(tiny_checkpoint_2d, device="cpu", sampler="dpm++2m", steps=STEPS)
    with pytest.raises(OutputError, match="sampler 'ddim' -> 'dpm\\+\\+2m'"):
        synthesize_to_folder(other, out, 2, seed=0)
    summary = synthesize_to_folder(synth, out, 2, seed=1, overwrite=True)
    assert summary.generated == (0, 1)
    assert not np.array_equal(load_volume(out / "synth_00000.nii.gz").array, before)
    assert json.loads((out / "synthesis_config.json").read_text(encoding="utf-8"))["seed"] == 1


def test_unknown_folder_content_refused(tiny_checkpoint_2d, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "synth_00000.nii.gz").write_bytes(b"x")
    synth = Synthesizer(tiny_checkpoint_2d, device="cpu", steps=STEPS)
    with pytest.raises(OutputError, match="no synthesis_config.json"):
        synthesize_to_folder(synth, out, 1)


def test_bad_arguments(tiny_checkpoint_2d):
    with pytest.raises(ConfigError, match="--sampler"):
        Synthesizer(tiny_checkpoint_2d, device="cpu", sampler="x0")
    with pytest.raises(ConfigError, match="--steps"):
        Synthesizer(tiny_checkpoint_2d, device="cpu", steps=1001)
    with pytest.raises(ConfigError, match="--batch-size"):
        Synthesizer(tiny_checkpoint_2d, device="cpu", batch_size=0)
    assert Synthesizer(tiny_checkpoint_2d, device="cpu", sampler="ddpm", steps=None).steps == 1000


# ---- class-conditional sampling ----------------------------------------------------------


def test_labels_change_the_output(tiny_checkpoint_2d_conditional):
    ckpt = tiny_checkpoint_2d_conditional
    assert load_inference(ckpt).extra["class_names"] == ["a", "b"]
    out = {}
    for label, guidance in (("a", None), ("b", None), (1, None), ("a", 3.0)):
        synth = Synthesizer(ckpt, device="cpu", steps=3, label=label, guidance=guidance)
        out[(label, guidance)] = next(synth.generate([0], seed=4)).array
    assert np.abs(out[("a", None)] - out[("b", None)]).max() > 1e-4
    np.testing.assert_array_equal(out[(1, None)], out[("b", None)])  # index 1 is class "b"
    assert np.abs(out[("a", 3.0)] - out[("a", None)]).max() > 1e-4


def test_guidance_zero_is_exactly_the_unconditional_path(tiny_checkpoint_2d_conditional):
    from medidiff.diffusion import sample

    ckpt = tiny_checkpoint_2d_conditional
    uncond = Synthesizer(ckpt, device="cpu", steps=3, batch_size=2)
    guided0 = Synthesizer(ckpt, device="cpu", steps=3, batch_size=2, label="b", guidance=0.0)
    a = [s.array for s in uncond.generate(range(2), seed=9)]
    b = [s.array for s in guided0.generate(range(2), seed=9)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # independently: the sampler driven by the network on the null class (last embedding row)
    model = uncond.model
    null = model.num_class_embeds - 1
    assert null == 2  # 2 real classes + the null class
    result = sample(
        lambda x, t: model(x, timesteps=t, class_labels=torch.full((x.shape[0],), null)),
        uncond.schedule, (2, 1, 32, 40), sampler="ddim", steps=3, seeds=[9, 10],
        clip_range=(0.0, 1.0),
    )
    np.testing.assert_array_equal(result.sample[:, 0].numpy(), np.stack(a))


def test_label_errors(tiny_checkpoint_2d, tiny_checkpoint_2d_conditional):
    with pytest.raises(ConfigError, match="unconditional model"):
        Synthesizer(tiny_checkpoint_2d, device="cpu", label="a")
    with pytest.raises(ConfigError, match="needs --label"):
        Synthesizer(tiny_checkpoint_2d, device="cpu", guidance=2.0)
    with pytest.raises(ConfigError, match="not a class.*known labels: 0=a, 1=b"):
        Synthesizer(tiny_checkpoint_2d_conditional, device="cpu", label="tumour")
    with pytest.raises(ConfigError, match="out of range 0 .. 1"):
        Synthesizer(tiny_checkpoint_2d_conditional, device="cpu", label=2)
    with pytest.raises(ConfigError, match="guidance must be a number >= 0"):
        Synthesizer(tiny_checkpoint_2d_conditional, device="cpu", label="a", guidance=-1.0)


def test_conditional_manifest_records_label_and_guidance(tiny_checkpoint_2d_conditional, tmp_path):
    synth = Synthesizer(tiny_checkpoint_2d_conditional, device="cpu", steps=STEPS, label="a", guidance=2.5)
    synthesize_to_folder(synth, tmp_path / "out", 2, montage=False)
    rows = _manifest(tmp_path / "out")
    assert {(r["label"], r["guidance"]) for r in rows} == {("a", "2.5")}
    config = json.loads((tmp_path / "out" / "synthesis_config.json").read_text(encoding="utf-8"))
    assert (config["label"], config["label_index"], config["guidance"]) == ("a", 0, 2.5)
