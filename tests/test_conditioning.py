"""Mask-conditioned models: config, label maps, guidance, init from a checkpoint, training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medidiff.config import Config
from medidiff.data.labels import NULL_VALUE, check_label_map, compose_label_map, lesion_values, one_hot
from medidiff.diffusion.guidance import concat_condition, drop_condition, mask_guided_model_fn
from medidiff.errors import CheckpointError, ConfigError, DataError
from medidiff.models.checkpoint import save_inference
from medidiff.models.init_weights import load_init_weights
from medidiff.models.unet import build_model, model_kwargs

LABELS = ["brain", "tumor", "ms"]


def _cond_config(**train) -> dict:
    return {
        "model": {"spatial_dims": 2, "preset": "tiny"},
        "conditioning": {"mask": "concat", "labels": LABELS, "dropout": 0.5},
        "train": {"max_steps": 2, "batch_size": 2, "checkpoint_every": 0, "preview_every": 0,
                  "log_every": 1, **train},
    }


# ---- config -----------------------------------------------------------------------------


def test_config_conditioning_round_trip() -> None:
    cfg = Config.from_dict(_cond_config())
    assert cfg.conditioning.mask == "concat" and cfg.conditioning.labels == LABELS
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("section, message", [
    ({"conditioning": {"mask": "concat"}}, "at least one label"),
    ({"conditioning": {"mask": "channels", "labels": ["a"]}}, "conditioning.mask"),
    ({"conditioning": {"labels": ["a"]}}, "needs conditioning.mask"),
    ({"conditioning": {"mask": "concat", "labels": ["a", "a"]}}, "distinct"),
    ({"conditioning": {"mask": "concat", "labels": ["a"], "dropout": 1.0}}, "dropout"),
    ({"stage": "controlnet", "conditioning": {"mask": "controlnet", "labels": ["a"]}}, "base.checkpoint"),
    ({"conditioning": {"mask": "controlnet", "labels": ["a"]}}, "go together"),
    ({"base": {"checkpoint": "x"}}, "stage: controlnet only"),
    ({"stage": "latent", "autoencoder": {"checkpoint": "a"},
      "conditioning": {"mask": "concat", "labels": ["a"]}}, "not implemented"),
    ({"train": {"oversample": {"ms": 2}}}, "mask-conditioned 2D"),
    ({"conditioning": {"mask": "concat", "labels": ["a"]}, "train": {"oversample": {"b": 2}}},
     "not among conditioning.labels"),
    ({"conditioning": {"mask": "concat", "labels": ["a"]}, "train": {"oversample": {"a": 0}}}, "integer >= 1"),
    ({"conditioning": {"mask": "concat", "labels": ["a"]}, "train": {"oversample": {"a": 1.5}}}, "integer >= 1"),
])
def test_config_conditioning_refusals(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(section)


# ---- label maps -------------------------------------------------------------------------


def test_compose_label_map_by_kind() -> None:
    brain = np.array([0, 1, 1, 1, 1])
    lesion = np.array([0, 0, 1, 1, 0])
    assert compose_label_map(LABELS, brain=brain, lesion=lesion, kind="tumor").tolist() == [0, 1, 2, 2, 1]
    assert compose_label_map(LABELS, brain=brain, lesion=lesion, kind="stroke").tolist() == [0, 1, 1, 1, 1]
    assert compose_label_map(["lesion"], brain=brain, lesion=lesion).tolist() == [0, 0, 1, 1, 0]
    assert lesion_values(LABELS) == [2, 3] and lesion_values(LABELS, "ms") == [3]
    with pytest.raises(DataError):
        compose_label_map(LABELS)


def test_one_hot_and_check() -> None:
    channels = one_hot(np.array([[0, 1], [2, 3]]), 3)
    assert channels.shape == (3, 2, 2) and channels.sum() == 3 and channels[2, 1, 1] == 1
    with pytest.raises(DataError, match="label value 4"):
        check_label_map(np.array([0, 4]), LABELS, "m.nii.gz")
    with pytest.raises(DataError, match="whole numbers"):
        check_label_map(np.array([0.5]), LABELS, "m.nii.gz")


# ---- guidance ---------------------------------------------------------------------------


def test_drop_condition_and_concat() -> None:
    cond = torch.ones(3, 2, 4, 4)
    dropped = drop_condition(cond, torch.tensor([True, False, True]))
    assert torch.all(dropped[0] == NULL_VALUE) and torch.all(dropped[1] == 1)
    x = torch.zeros(3, 1, 2, 2)
    joined = concat_condition(x, cond)  # resized 4x4 -> 2x2, nearest
    assert joined.shape == (3, 3, 2, 2) and torch.all(joined[:, 1:] == 1)


def test_mask_guidance_is_linear_in_w() -> None:
    # net output: the mean of the condition, so conditional = 1 and null = -1
    net = lambda x, t, c: x * 0 + c.mean(dim=(1, 2, 3), keepdim=True)  # noqa: E731
    cond = torch.ones(2, 2, 4, 4)
    x, t = torch.zeros(2, 1, 4, 4), torch.tensor([3, 3])
    for w, expected in ((0.0, -1.0), (1.0, 1.0), (3.0, -1.0 + 3.0 * 2.0)):
        assert torch.allclose(mask_guided_model_fn(net, cond, w)(x, t), torch.full_like(x, expected))


# ---- init from a checkpoint ---------------------------------------------------------------


def test_init_weights_zero_extra_channels(tmp_path: Path) -> None:
    old = build_model(2, "tiny").eval()
    path = tmp_path / "old.safetensors"
    save_inference(path, old, model_kwargs=model_kwargs(2, "tiny"), config={}, preprocessing={})
    kwargs = model_kwargs(2, "tiny", in_channels=4)
    new = build_model(2, "tiny", in_channels=4).eval()
    assert load_init_weights(new, kwargs, path) == 3
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        same = new(torch.cat([x, torch.randn(2, 3, 16, 16)], 1), t)
        assert torch.allclose(same, old(x, t), atol=1e-5)
    other = build_model(2, "tiny", in_channels=4, channels=[8, 32])
    with pytest.raises(CheckpointError, match="another architecture"):
        load_init_weights(other, model_kwargs(2, "tiny", in_channels=4, channels=[8, 32]), path)


# ---- training -----------------------------------------------------------------------------


def _dataset(n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(1, 16, 16, generator=g),
             "condition": torch.from_numpy(one_hot(np.random.default_rng(i).integers(0, 4, (16, 16)), 3))}
            for i in range(n)]


def test_trainer_concat_records_conditioning(tmp_path: Path) -> None:
    from medidiff.models.loaded import load_model
    from medidiff.training.trainer import Trainer

    cfg = Config.from_dict(_cond_config())
    result = Trainer(cfg, tmp_path / "run", dataset=_dataset(), progress=False, device="cpu").fit()
    loaded = load_model(result.model_path)
    assert loaded.conditioning.mask == "concat" and loaded.conditioning.labels == tuple(LABELS)
    assert loaded.unet_kwargs["in_channels"] == 4 and loaded.channels == 1
    cond = torch.from_numpy(one_hot(np.ones((16, 16), int), 3))[None]
    out = loaded.mask_model_fn(cond, guidance=2.0)(torch.randn(1, 1, 16, 16), torch.tensor([10]))
    assert out.shape == (1, 1, 16, 16)
    # anomaly scoring needs a healthy model without masks: one clear refusal
    from medidiff.anomaly.detector import AnomalyDetector
    from medidiff.errors import ConfigError

    with pytest.raises(ConfigError, match="mask-conditioned"):
        AnomalyDetector(result.model_path)


def test_trainer_concat_3d(tmp_path: Path) -> None:
    from medidiff.models.loaded import load_model
    from medidiff.training.trainer import Trainer

    raw = _cond_config()
    raw["model"]["spatial_dims"] = 3
    data = [{"image": torch.rand(1, 8, 8, 8),
             "condition": torch.from_numpy(one_hot(np.random.default_rng(i).integers(0, 4, (8, 8, 8)), 3))}
            for i in range(2)]
    result = Trainer(Config.from_dict(raw), tmp_path / "run", dataset=data, progress=False, device="cpu").fit()
    loaded = load_model(result.model_path)
    cond = data[0]["condition"][None]
    assert loaded.mask_model_fn(cond)(torch.randn(1, 1, 8, 8, 8), torch.tensor([3])).shape == (1, 1, 8, 8, 8)


def test_trainer_init_checkpoint_starts_at_old_model(tmp_path: Path) -> None:
    from medidiff.training.trainer import Trainer

    old = build_model(2, "tiny").eval()
    path = tmp_path / "old.safetensors"
    save_inference(path, old, model_kwargs=model_kwargs(2, "tiny"), config={}, preprocessing={})
    raw = _cond_config()
    raw["init"] = {"checkpoint": str(path)}
    trainer = Trainer(Config.from_dict(raw), tmp_path / "run", dataset=_dataset(), progress=False, device="cpu")
    weight = trainer.model.conv_in.conv.weight
    assert torch.equal(weight[:, :1], old.conv_in.conv.weight) and torch.all(weight[:, 1:] == 0)
    raw["init"] = {"checkpoint": str(tmp_path / "missing.safetensors")}
    with pytest.raises(CheckpointError, match="not found"):
        Trainer(Config.from_dict(raw), tmp_path / "run2", dataset=_dataset(), progress=False, device="cpu")


def test_slice_dataset_serves_label_maps(tmp_path: Path) -> None:
    from medidiff.data.datalist import DatalistEntry
    from medidiff.data.datasets import Preprocessing, build_dataset
    from medidiff.io import Volume, save_volume

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = np.zeros((16, 16, 8), np.float32)
    image[2:14, 2:14, 1:7] = np.linspace(1, 9, 6)
    brain = (image > 0).astype(np.uint8)
    lesion = np.zeros_like(brain)
    lesion[6:9, 6:9, 3:5] = 1
    paths = {}
    for name, arr in (("img", image), ("brain", brain), ("les", lesion)):
        paths[name] = save_volume(Volume(arr, affine), tmp_path / f"{name}.nii.gz")
    entry = DatalistEntry(image=paths["img"], mask=paths["brain"], segmentation=paths["les"],
                          extra={"kind": "ms"})
    ds = build_dataset([entry], Preprocessing(shape=(16, 16, 8)), spatial_dims=2, min_foreground=0.0,
                       condition_labels=LABELS)
    label_map = ds.label_map(0)
    assert set(np.unique(label_map)) == {0, 1, 3}  # background, brain, ms (value 3)
    item = ds[4]
    assert item["condition"].shape == (3, 16, 16)
    assert item["condition"][2].sum() > 0  # the lesion slice has the ms channel
    # train.oversample: the two ms slices three times each, the other six once
    order = ds.oversampled_indices({"ms": 3, "tumor": 5})
    lesion_rows = [i for i in range(len(ds)) if ds[i]["condition"][2].sum() > 0]
    assert lesion_rows == [3, 4] and len(order) == len(ds) + 2 * 2
    assert [int((order == i).sum()) for i in range(len(ds))] == [1, 1, 1, 3, 3, 1, 1, 1]
    with pytest.raises(ConfigError, match="stroke"):
        ds.oversampled_indices({"stroke": 2})
    # the trainer samples that order (2 steps) and refuses a dataset without label maps
    from medidiff.training.trainer import Trainer

    cfg = Config.from_dict(_cond_config(oversample={"ms": 3}))
    assert Trainer(cfg, tmp_path / "run", dataset=ds, progress=False, device="cpu").fit().steps == 2
    with pytest.raises(ConfigError, match="oversample"):
        Trainer(cfg, tmp_path / "run2", dataset=_dataset(), progress=False, device="cpu")
    assert not (tmp_path / "run2").exists()


# ---- ControlNet ----------------------------------------------------------------------------


def _base(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    path = tmp_path / "base.safetensors"
    save_inference(path, build_model(2, "tiny"), model_kwargs=model_kwargs(2, "tiny"),
                   config={"model": {"spatial_dims": 2, "preset": "tiny"}},
                   preprocessing={"shape": [16, 16, 8]})
    return path


def _controlnet_config(base: Path, **diffusion) -> Config:
    raw = _cond_config()
    raw["stage"] = "controlnet"
    raw["base"] = {"checkpoint": str(base)}
    raw["conditioning"]["mask"] = "controlnet"
    raw["diffusion"] = diffusion
    return Config.from_dict(raw)


def test_controlnet_trains_only_the_controlnet(tmp_path: Path) -> None:
    from medidiff.models.loaded import load_model
    from medidiff.training import build_trainer

    base_path = _base(tmp_path)
    base = load_model(base_path)
    trainer = build_trainer(_controlnet_config(base_path), tmp_path / "run", dataset=_dataset(),
                            progress=False, device="cpu")
    assert 0 < trainer.trainable_parameters() < sum(p.numel() for p in trainer.model.parameters())
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 500])
    cond = torch.stack([_dataset()[0]["condition"]] * 2)
    with torch.no_grad():  # zero convolutions: at step 0 the pair is the base model
        assert torch.allclose(trainer.model.eval()(x, t, cond), base.model(x, t), atol=1e-5)
    trainer.model.train()
    result = trainer.fit()
    loaded = load_model(result.model_path)
    assert loaded.checkpoint.network == "controlled_diffusion" and loaded.conditioning.mask == "controlnet"
    for k, v in base.model.state_dict().items():  # the base did not move
        assert torch.equal(loaded.model.unet.state_dict()[k], v)
    out = loaded.mask_model_fn(cond, guidance=1.5)(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_controlnet_refuses_a_mismatched_base(tmp_path: Path) -> None:
    from medidiff.training import build_trainer

    with pytest.raises(ConfigError, match="diffusion.schedule"):
        build_trainer(_controlnet_config(_base(tmp_path), schedule="cosine"), tmp_path / "r",
                      dataset=_dataset(), progress=False, device="cpu")
