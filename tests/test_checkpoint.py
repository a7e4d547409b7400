"""Tests for medidiff.models.checkpoint, loaded and training_state: safetensors weights, the
LoadedModel, and weights-only training state."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle
import random
import struct

import numpy as np
import pytest
import torch

import medidiff
from medidiff.models.checkpoint import (
    INFERENCE_FORMAT,
    InferenceCheckpoint,
    build_model_from_checkpoint,
    file_sha256,
    load_inference,
    load_state_dict_checked,
    save_inference,
)
from medidiff.errors import CheckpointError, OutputError
from medidiff.models.loaded import LoadedModel, load_model
from medidiff.models.training_state import (
    capture_rng_state,
    load_training_state,
    restore_rng_state,
    save_training_state,
)
from medidiff.models.unet import build_model, model_kwargs

CONFIG = {"train": {"max_steps": 4, "batch_size": 2, "lr": 1e-4}, "model": {"preset": "tiny"}}
PREPROCESSING = {
    "modality": "mri",
    "spacing": [1.0, 1.0, 1.0],
    "shape": [32, 32, 8],
    "orientation": "RAS",
    "lower_percentile": 1.0,
    "upper_percentile": 99.0,
}


def _trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter non-trivial values (MONAI zero-initialises some layers)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


@pytest.fixture()
def tiny2d():
    torch.manual_seed(0)
    return _trained_like(build_model(2, "tiny", num_class_embeds=2))


def _save(path, model, **kw):
    kw = {"config": CONFIG, "preprocessing": PREPROCESSING, **kw}
    return save_inference(path, model, model_kwargs=model_kwargs(2, "tiny", num_class_embeds=2), **kw)


def _save_with(tmp_path, model, config=CONFIG, extra=None):
    return save_inference(
        tmp_path / "m.safetensors", model,
        model_kwargs=model_kwargs(2, "tiny", num_class_embeds=2), config=config,
        preprocessing={}, extra=extra,
    )


class _Evil:
    """Unpickling this would create a marker file: the proof that code ran."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path(self.marker).touch, ())


# ------------------------------------------------------------------ inference weights


def test_inference_round_trip(tmp_path, tiny2d):
    path = tmp_path / "run" / "model.safetensors"  # folder created on save
    written = _save(path, tiny2d, extra={"step": 4, "ema_decay": 0.999})
    assert written == path and path.is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600
    assert not [p for p in path.parent.iterdir() if p.name != "model.safetensors"]  # no temp

    ckpt = load_inference(path)
    assert isinstance(ckpt, InferenceCheckpoint)
    expected = tiny2d.state_dict()
    assert set(ckpt.state_dict) == set(expected)
    for key, value in expected.items():
        assert torch.equal(ckpt.state_dict[key], value), key
    assert ckpt.model_kwargs == model_kwargs(2, "tiny", num_class_embeds=2)
    assert ckpt.config == CONFIG
    assert ckpt.preprocessing == PREPROCESSING
    assert ckpt.extra == {"step": 4, "ema_decay": 0.999}
    assert ckpt.version == medidiff.__version__
    assert ckpt.stored_dtype == "float32"
    assert ckpt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)

    # The metadata is plain safetensors metadata that any reader sees.
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == INFERENCE_FORMAT
    assert json.loads(meta["preprocessing"]) == PREPROCESSING

    loaded = build_model_from_checkpoint(path)
    assert isinstance(loaded, LoadedModel) and not loaded.model.training
    x_t, t, y = torch.randn(2, 1, 32, 32), torch.tensor([3, 600]), torch.tensor([0, 1])
    tiny2d.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(x_t, t, class_labels=y), tiny2d(x_t, t, class_labels=y)
        )
    assert build_model_from_checkpoint(ckpt).checkpoint is ckpt


def test_replace_extra_rewrites_the_header_only(tmp_path, tiny2d):
    """Adding a record (e.g. an input profile) to a shipped file keeps every tensor byte:
    the tensors' hash is unchanged, the file's is not, and safetensors still reads it."""
    from safetensors.torch import load_file

    from medidiff.models.checkpoint import replace_extra, tensors_sha256

    path = _save(tmp_path / "m.safetensors", tiny2d, extra={"step": 4}, half=True)
    before_tensors, before_file = tensors_sha256(path), file_sha256(path)
    raw = load_file(str(path))
    replace_extra(path, {"step": 4, "input_profile": {"format": "x", "values": list(range(50))}})
    assert tensors_sha256(path) == before_tensors and file_sha256(path) != before_file
    ckpt = load_inference(path)
    assert ckpt.extra["input_profile"]["values"][-1] == 49 and ckpt.stored_dtype == "float16"
    assert ckpt.config == CONFIG and ckpt.preprocessing == PREPROCESSING
    after = load_file(str(path))
    assert all(torch.equal(after[k], raw[k]) and after[k].dtype == raw[k].dtype for k in raw)
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0  # header stays aligned
    other = tmp_path / "other.bin"
    other.write_bytes(b"not a weights file at all")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        replace_extra(other, {})


def test_half_shrinks_file_and_loads_float32(tmp_path, tiny2d):
    full = _save(tmp_path / "full.safetensors", tiny2d)
    half = _save(tmp_path / "half.safetensors", tiny2d, half=True)
    n_bytes = sum(v.numel() * 4 for v in tiny2d.state_dict().values())
    # Tensor bytes halve; the JSON header is the same size in both files.
    assert full.stat().st_size - half.stat().st_size == pytest.approx(n_bytes / 2, rel=0.01)
    ckpt = load_inference(half)
    assert ckpt.stored_dtype == "float16"
    for key, value in tiny2d.state_dict().items():
        got = ckpt.state_dict[key]
        assert got.dtype == torch.float32
        # float16 keeps 11 significant bits: relative error <= 2**-11.
        torch.testing.assert_close(got, value, rtol=2**-11, atol=1e-7)


def test_save_accepts_state_dict_and_converts_paths(tmp_path, tiny2d):
    path = save_inference(
        tmp_path / "m.safetensors",
        tiny2d.state_dict(),
        model_kwargs=model_kwargs(2, "tiny", num_class_embeds=2),
        config={"data": {"root": pathlib.Path("/data/brains")}, "lr": np.float32(0.5)},
        preprocessing={},
    )
    assert load_inference(path).config == {"data": {"root": "/data/brains"}, "lr": 0.5}


def test_save_stores_float32_and_refuses_non_tensors(tmp_path, tiny2d):
    state = {k: v.to(torch.bfloat16) for k, v in tiny2d.state_dict().items()}
    path = save_inference(tmp_path / "m.safetensors", state,
                          model_kwargs=model_kwargs(2, "tiny", num_class_embeds=2),
                          config={}, preprocessing={})
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        assert handle.get_tensor("conv_in.conv.weight").dtype == torch.float32
    with pytest.raises(CheckpointError, match="'conv_in.conv.bias' is a list"):
        save_inference(tmp_path / "x.safetensors", {**state, "conv_in.conv.bias": [1.0]},
                       model_kwargs=model_kwargs(2, "tiny", num_class_embeds=2),
                       config={}, preprocessing={})


def test_save_refuses_non_json_metadata(tmp_path, tiny2d):
    with pytest.raises(CheckpointError, match="config"):
        _save_with(tmp_path, tiny2d, config={"fn": object()})
    with pytest.raises(CheckpointError, match="extra"):
        _save_with(tmp_path, tiny2d, extra={"x": float("nan")})
    assert not list(tmp_path.iterdir())


def test_save_replaces_existing_file_atomically(tmp_path, tiny2d):
    path = _save(tmp_path / "m.safetensors", tiny2d)
    first = file_sha256(path)
    _trained_like(tiny2d, seed=1)
    _save(path, tiny2d)
    assert file_sha256(path) != first
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_save_into_unwritable_place_raises_output_error(tmp_path, tiny2d):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="file"):
        _save(blocker / "m.safetensors", tiny2d)


def test_mismatch_error_names_keys_and_shapes(tmp_path, tiny2d):
    path = _save(tmp_path / "m.safetensors", tiny2d)
    other = build_model(2, "tiny", channels=(16, 32), num_class_embeds=2, norm_num_groups=8)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_checked(other, load_inference(path).state_dict, source=str(path))
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert "shape mismatches" in message
    assert "conv_in.conv.weight: model expects (16, 1, 3, 3), file has (8, 1, 3, 3)" in message
    # Missing and unexpected keys are counted too (no class embedding in the target).
    no_class = build_model(2, "tiny")
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \(class_embedding.weight\)"):
        load_state_dict_checked(no_class, tiny2d.state_dict(), source="weights")
    state = dict(tiny2d.state_dict())
    del state["conv_in.conv.bias"]
    with pytest.raises(CheckpointError, match=r"1 missing keys \(conv_in.conv.bias\)"):
        load_state_dict_checked(tiny2d, state, source="weights")


def test_ddp_prefix_gets_a_hint(tiny2d):
    state = {f"module.{k}": v for k, v in tiny2d.state_dict().items()}
    with pytest.raises(CheckpointError, match="'module.' prefix"):
        load_state_dict_checked(build_model(2, "tiny", num_class_embeds=2), state, "ddp.pt")


def test_save_refuses_kwargs_that_do_not_describe_the_weights(tmp_path, tiny2d):
    with pytest.raises(CheckpointError, match="do not describe these weights") as info:
        save_inference(
            tmp_path / "m.safetensors", tiny2d,
            model_kwargs=model_kwargs(2, "tiny", channels=(16, 32), num_class_embeds=2),
            config={}, preprocessing={},
        )
    assert "conv_in.conv.weight: model expects (16, 1, 3, 3), file has (8, 1, 3, 3)" in str(
        info.value
    )
    with pytest.raises(CheckpointError, match="model_kwargs are invalid"):
        save_inference(tmp_path / "m.safetensors", tiny2d, model_kwargs={}, config={},
                       preprocessing={})
    assert not list(tmp_path.iterdir())


def test_checkpoint_with_other_architecture_fails_on_build(tmp_path, tiny2d):
    """A file whose stored kwargs disagree with its weights (written by hand here)."""
    from safetensors.torch import save_file

    meta = {
        "format": INFERENCE_FORMAT, "medidiff_version": medidiff.__version__,
        "model_kwargs": json.dumps(model_kwargs(2, "tiny", channels=(16, 32))),
        "config": "{}", "preprocessing": "{}", "extra": "{}",
    }
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in tiny2d.state_dict().items()}, str(path), meta)
    with pytest.raises(CheckpointError, match="m.safetensors.*1 unexpected.*shape mismatches"):
        build_model_from_checkpoint(path)


@pytest.mark.parametrize("damage", ["zero", "truncated_data", "truncated_header", "garbage",
                                    "bad_json"])
def test_corrupt_files_raise_checkpoint_error(tmp_path, tiny2d, damage):
    good = _save(tmp_path / "good.safetensors", tiny2d).read_bytes()
    header_len = struct.unpack("<Q", good[:8])[0]
    content = {
        "zero": b"",
        "truncated_data": good[: len(good) - 100],
        "truncated_header": good[: 8 + header_len // 2],
        "garbage": bytes(range(256)) * 4,
        "bad_json": good[:8] + b"{" + b"x" * (header_len - 1) + good[8 + header_len :],
    }[damage]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_inference(bad)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_inference(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not a file"):
        load_inference(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_training_state(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="nope"):
        file_sha256(tmp_path / "nope")


def test_plain_safetensors_without_metadata_refused(tmp_path, tiny2d):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in tiny2d.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="without medidiff metadata"):
        load_inference(path)


def test_newer_and_foreign_formats_refused(tmp_path):
    from safetensors.torch import save_file

    meta = {"format": "medidiff-inference-7", "medidiff_version": "9.0.0"}
    for key in ("model_kwargs", "config", "preprocessing", "extra"):
        meta[key] = "{}"
    path = tmp_path / "future.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="newer medidiff.*9.0.0.*upgrade"):
        load_inference(path)
    save_file({"w": torch.zeros(2)}, str(path), metadata={**meta, "format": "acme-1"})
    with pytest.raises(CheckpointError, match="unknown checkpoint format 'acme-1'"):
        load_inference(path)


def test_nan_weights_refused(tmp_path, tiny2d):
    with torch.no_grad():
        tiny2d.conv_in.conv.weight[0, 0, 0, 0] = float("nan")
    path = _save(tmp_path / "nan.safetensors", tiny2d)
    with pytest.raises(CheckpointError, match="conv_in.conv.weight.*NaN"):
        load_inference(path)


# ------------------------------------------------------------ no code runs on any load


@pytest.mark.parametrize("writer", ["pickle", "torch_save", "torch_save_wrapped"])
def test_pickle_with_code_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "code_ran"
    evil = _Evil(marker)
    path = tmp_path / f"evil_{writer}.bin"
    if writer == "pickle":
        path.write_bytes(pickle.dumps(evil, protocol=2))
    elif writer == "torch_save":
        torch.save(evil, path)
    else:  # looks like medidiff training state, with the payload inside
        torch.save({"format": "medidiff-training-1", "state": {"model": evil}}, path)
    # Sanity check on the probe itself: a plain unpickle would create the marker.
    assert not marker.exists()

    with pytest.raises(CheckpointError, match="refused"):
        load_training_state(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_inference(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        build_model_from_checkpoint(path)
    assert not marker.exists()


def test_evil_probe_really_runs_code_when_unpickled(tmp_path):
    """Guards the test above: the payload does create the marker under plain pickle."""
    marker = tmp_path / "code_ran"
    pickle.loads(pickle.dumps(_Evil(marker)))
    assert marker.exists()


# --------------------------------------------------------------- training state + RNG


def test_rng_capture_restore_is_exact():
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    np.random.randn()  # leave a cached Gaussian in numpy's legacy state
    random.gauss(0, 1)
    state = capture_rng_state()
    first = (torch.rand(5), [random.random() for _ in range(5)], np.random.randn(5),
             random.gauss(0, 1), np.random.randint(0, 1000, 5))
    restore_rng_state(state)
    second = (torch.rand(5), [random.random() for _ in range(5)], np.random.randn(5),
              random.gauss(0, 1), np.random.randint(0, 1000, 5))
    assert torch.equal(first[0], second[0])
    assert first[1] == second[1]
    np.testing.assert_array_equal(first[2], second[2])
    assert first[3] == second[3]
    np.testing.assert_array_equal(first[4], second[4])


def _adamw_after_one_step(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    x_t = torch.randn(2, 1, 32, 32)
    model(x_t, torch.tensor([1, 2]), class_labels=torch.tensor([0, 1])).square().mean().backward()
    optimizer.step()
    return optimizer


def test_training_state_round_trip(tmp_path, tiny2d):
    optimizer = _adamw_after_one_step(tiny2d)
    ema = _trained_like(build_model(2, "tiny", num_class_embeds=2), seed=5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    state = {
        "model": tiny2d.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "step": 1234,
        "epoch": 5,
        "config": CONFIG,
        "rng": capture_rng_state(),
    }
    expected = (torch.rand(3), random.random(), np.random.rand())

    path = save_training_state(tmp_path / "checkpoints" / "step_001234.pt", state)
    assert [p.name for p in path.parent.iterdir()] == ["step_001234.pt"]
    loaded = load_training_state(path)

    assert loaded["step"] == 1234 and loaded["epoch"] == 5 and loaded["config"] == CONFIG
    assert loaded["scaler"] == scaler.state_dict()
    for key in ("model", "ema"):
        for name, value in state[key].items():
            assert torch.equal(loaded[key][name], value), (key, name)

    # The optimizer state restores into a fresh AdamW and matches exactly.
    fresh_model = build_model(2, "tiny", num_class_embeds=2)
    fresh_model.load_state_dict(loaded["model"])
    fresh = torch.optim.AdamW(fresh_model.parameters(), lr=0.5)
    fresh.load_state_dict(loaded["optimizer"])
    original = optimizer.state_dict()
    restored = fresh.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    assert len(restored["state"]) == len(original["state"]) > 0
    for index, slots in original["state"].items():
        for slot, value in slots.items():
            assert torch.equal(restored["state"][index][slot], value), (index, slot)

    # RNG restored from the file replays the same draws.
    restore_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_training_state_refuses_unsafe_values_before_writing(tmp_path):
    with pytest.raises(CheckpointError, match=r"state\['config'\]\['lr'\].*numpy"):
        save_training_state(tmp_path / "s.pt", {"config": {"lr": np.float64(1e-4)}})
    with pytest.raises(CheckpointError, match=r"state\['rng'\].*random.Random"):
        save_training_state(tmp_path / "s.pt", {"rng": random.Random(0)})
    assert not list(tmp_path.iterdir())


def test_training_state_damaged_or_wrong_kind(tmp_path, tiny2d):
    good = save_training_state(tmp_path / "s.pt", {"step": 1, "w": torch.ones(1000)})
    data = good.read_bytes()
    for name, content in {"zero.pt": b"", "cut.pt": data[: len(data) // 2],
                          "junk.pt": b"not a checkpoint at all"}.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=name):
            load_training_state(tmp_path / name)
    weights = _save(tmp_path / "model.safetensors", tiny2d)
    with pytest.raises(CheckpointError, match="inference weights"):
        load_training_state(weights)
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not medidiff training state"):
        load_training_state(tmp_path / "foreign.pt")
    torch.save({"format": "medidiff-training-3", "medidiff_version": "2.0", "state": {}},
               tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="newer medidiff"):
        load_training_state(tmp_path / "newer.pt")


def test_restore_rng_rejects_malformed():
    with pytest.raises(CheckpointError, match="RNG state"):
        restore_rng_state({"torch_cpu": torch.zeros(3, dtype=torch.uint8)})


def test_sniff_safetensors_header_length_starting_with_0x80():
    """A safetensors header of 12160 bytes encodes its length as 0x80 0x2f ...: not pickle."""
    from medidiff.models.checkpoint import _sniff

    header = b"{" + b" " * 12158 + b"}"
    head = (12160).to_bytes(8, "little") + header[:1]
    assert head[:1] == b"\x80"
    assert _sniff(head, size=8 + 12160 + 16) == "safetensors"
    assert _sniff(b"\x80\x04\x95" + b"\x00" * 10) == "pickle"


def test_load_model_parses_the_records_once_into_typed_fields(tmp_path, tiny2d):
    from medidiff.config import Config
    from medidiff.data.transforms import Preprocessing
    from medidiff.diffusion.noise import NoiseSpec
    from medidiff.diffusion.schedules import NoiseSchedule

    config = {"model": {"preset": "tiny", "num_class_embeds": 1},
              "diffusion": {"schedule": "sigmoid_beta", "num_train_timesteps": 50,
                            "prediction_type": "v_prediction", "noise": "simplex",
                            "simplex_octaves": 3},
              "train": {"cond_drop_prob": 0.2}}
    path = _save(tmp_path / "m.safetensors", tiny2d, config=config,
                 extra={"step": 9, "class_names": ["a"],
                        "intensity_reference": {"a_min": 1.0, "a_max": 2.0}})
    loaded = load_model(path)
    assert isinstance(loaded, LoadedModel) and not loaded.model.training
    assert loaded.config == Config.from_dict(config)
    assert loaded.preprocessing == Preprocessing.from_dict(PREPROCESSING)
    assert loaded.spatial_dims == 2 and loaded.input_shape == (32, 32)
    assert torch.equal(loaded.schedule.betas, NoiseSchedule.create("sigmoid_beta", 50).betas)
    assert loaded.noise_spec == NoiseSpec("simplex", octaves=3)
    assert loaded.prediction_type == "v_prediction"
    # the "+1 null class" rule: 1 class, 2 embeddings (tiny2d), the last row is the null class
    assert loaded.conditioning.num_classes == 1 and loaded.conditioning.null_label == 1
    assert loaded.conditioning.class_names == ("a",)
    assert loaded.conditioning.cond_drop_prob == pytest.approx(0.2)
    assert loaded.provenance.step == 9 and loaded.provenance.path == path
    assert loaded.provenance.sha256 == file_sha256(path)
    assert loaded.intensity_reference == {"a_min": 1.0, "a_max": 2.0}
    assert loaded.autoencoder is None
    assert load_model(loaded.checkpoint).checkpoint is loaded.checkpoint


def test_load_model_names_the_file_of_an_invalid_record(tmp_path, tiny2d):
    path = _save(tmp_path / "m.safetensors", tiny2d, config={"train": {"max_stepz": 1}})
    with pytest.raises(CheckpointError, match="m.safetensors.*train.max_stepz"):
        load_model(path)
