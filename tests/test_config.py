"""Config loading and validation: unknown keys and wrong types are one-line errors."""

from __future__ import annotations

import pytest

from medidiff.config import Config
from medidiff.errors import ConfigError


def test_defaults_and_overrides():
    cfg = Config.from_dict({})
    assert cfg.model.spatial_dims == 2
    cfg2 = cfg.with_overrides(["train.max_steps=7", "train.lr=0.001", "data.patch_size=[8,8,8]"])
    assert cfg2.train.max_steps == 7 and cfg2.train.lr == pytest.approx(1e-3)
    assert cfg2.data.patch_size == [8, 8, 8]
    assert cfg.train.max_steps != 7  # frozen: the original is unchanged


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"train": {"max_stepz": 1}}, "train.max_stepz"),
        ({"train": {"max_steps": "ten"}}, "train.max_steps"),
        ({"train": {"lr": True}}, "train.lr"),
        ({"model": {"spatial_dims": 4}}, "model.spatial_dims"),
        ({"diffusion": {"noise": "pink"}}, "diffusion.noise"),
        ({"bogus": {}}, "bogus"),
        ({"train": {"ema_decay": 1.5}}, "train.ema_decay"),
        ({"data": {"patch_size": [8, "x", 8]}}, "data.patch_size"),
        ({"autoencoder": {"kind": "vqgan"}}, "autoencoder.kind"),
        ({"autoencoder": {"kind": "vq", "norm_num_groups": 8}}, "autoencoder.norm_num_groups"),
        ({"autoencoder": {"num_embeddings": 64}}, "autoencoder.num_embeddings"),
        ({"autoencoder": {"kind": "vq", "num_embeddings": 0}}, "autoencoder.num_embeddings"),
        ({"autoencoder": {"quantization_weight": -1.0}}, "autoencoder.quantization_weight"),
    ],
)
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        Config.from_dict(raw)
    assert key in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_round_trip(tmp_path):
    cfg = Config.from_dict({"name": "x", "train": {"batch_size": 3}})
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert Config.from_yaml(path) == cfg


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Config.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {max_steps: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        Config.from_yaml(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("train:\n  max_steps: 10\n  speed: 3\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml.*train.speed"):
        Config.from_yaml(wrong)
    with pytest.raises(ConfigError, match="section.key=value"):
        Config.from_yaml(wrong, ["nonsense"])


def test_shipped_configs_validate():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {"tiny_test.yaml", "brain_mri_2d.yaml", "brain_mri_3d.yaml", "ct_3d.yaml"}
    for p in configs:
        Config.from_yaml(p)


@pytest.mark.parametrize("schedule", ["linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"])
def test_every_documented_schedule_is_accepted(schedule):
    """docs/how_it_works.md lists these four; config validation used to refuse sigmoid_beta."""
    assert Config.from_dict({"diffusion": {"schedule": schedule}}).diffusion.schedule == schedule
